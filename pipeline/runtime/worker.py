"""Worker: one rank of a context-parallel group, as plain Python (actors/worker.py makes it an actor).

A group of P workers shares one video's token sequence. They start in phases, driven by the
WorkerGroup, so that nothing touches CUDA before the device is chosen:
    1. set_device(visible_devices, index)   CUDA_VISIBLE_DEVICES for the node's group GPUs, then the
                                            rank's own device (before the process group: NCCL binds
                                            its communicator to it)
    2. join_group(rendezvous)               torch.distributed over gloo (CPU) or NCCL (GPU); rank 0
                                            first builds random-weight presets (fetch_weights)
    3. load_model()                         weights, attention methods, context parallelism
Then `denoise_block` runs in lockstep on every rank; `ping` and `check_group` are health checks.

A worker keeps the video's carried state from block to block, and also writes it to the video's
checkpoint after each block: a rebuilt group (new processes) or a resumed video reads it back from
there and gets the same frames an uninterrupted run would have.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from pipeline.runtime.checkpoint import fingerprint


class WorkerLost(RuntimeError):
    """A rank of the group died (process, node or actor gone): the group must be rebuilt.

    A torch.distributed group cannot be repaired member by member (a restarted process is not in
    the communicator), so the whole group is torn down and built again; the work it was doing
    (one block) is re-run from the last checkpointed state."""


class ResourceTimeout(RuntimeError):
    """The cluster did not offer a worker group's resources in time; str() says what to change."""


@dataclass(frozen=True)
class Placement:
    """Where a worker process runs, as the cluster manager sees it."""

    node_id: str
    node_ip: str
    gpu_ids: tuple[str, ...]  # accelerator ids assigned to this worker on its node (empty on CPU)
    pid: int

    def sort_key(self) -> tuple:
        """Ranks go by node, then GPU: neighbours in rank order are neighbours on the node."""
        gpus = tuple(int(g) if g.isdigit() else g for g in self.gpu_ids)
        return (self.node_ip, self.node_id, gpus, self.pid)


@dataclass
class RankOutput:
    latents: Any  # (1, C, T_b, h, w) fp32 CPU clean latents of the whole block on rank 0; None elsewhere
    seconds: float  # denoising time of the block on this rank
    state_s: float  # writing this rank's carried state to the checkpoint


def select_device(visible_devices: str | None, index: int | None) -> str:
    """Make the group's GPUs on this node visible and select this process's one; None: CPU.

    All processes of a group on a node see all of the group's GPUs there (as vLLM and Ray Train do)
    rather than only their own: NCCL then finds its peers' devices for P2P/NVLink transport, and
    device indices agree across ranks. Must run before anything initialises CUDA in this process."""
    if visible_devices is None:
        # A CPU worker on a GPU node: Ray leaves zero-GPU actors all GPUs visible; hide them so
        # nothing here (model.device=auto) takes a GPU the cluster gave to another worker.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return "cpu"
    import torch

    if torch.cuda.is_initialized():  # CUDA reads CUDA_VISIBLE_DEVICES once, when it starts
        raise RuntimeError("select_device: CUDA started in this process before its devices were chosen")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices
    torch.cuda.set_device(index)
    return f"cuda:{index}"


class Worker:
    """One rank. `cfg` is the batch's Config: model, attention and parallel are fixed for its life."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.device = "cpu"
        self.ctx = None  # ParallelContext once joined
        self.bundle = self.adapter = self.run_model = None
        self.step, self.steps = 0, 0
        self._video = None  # ((fingerprint, name), denoiser, plan, checkpoint) of the video being denoised

    # --- phases -----------------------------------------------------------------------------------
    def publish_rendezvous(self, host: str) -> int:
        """Rank 0: a port free on its node, where it will serve the group's store."""
        from pipeline.parallel.rendezvous import free_port

        return free_port(host)

    def set_device(self, visible_devices: str | None, index: int | None) -> str:
        from pipeline.attention.cudnn_env import use_avoid_recompile  # imports torch; starts no CUDA

        # Before CUDA starts, as jobs/bench_parallel.py does (torch reads it once, at the first cuDNN SDPA
        # call): GPU ranks of a method whose cuDNN shapes follow the data; a value already set is kept.
        use_avoid_recompile(self.cfg.attention, "cpu" if visible_devices is None else "cuda")
        self.device = select_device(visible_devices, index)
        return self.device

    def import_model_code(self) -> None:
        """Import what load_model needs (diffusers' and transformers' model classes of the family, the
        adapters, the parallel wrappers) now, on every rank at once. Otherwise rank 0 pays for the
        imports in fetch_weights and the other ranks in load_model afterwards: the same seconds twice
        on the start-up's critical path (9.05 s + 17.68 s for weights and model on 2x H200, of which
        ~9 s imports). Nothing here touches CUDA."""
        from pipeline.models import build_adapter, load_model  # noqa: F401
        from pipeline.models.loader import component_classes
        from pipeline.parallel import parallelize  # noqa: F401

        component_classes(self.cfg.model.family, None)  # the lazy modules behind diffusers' and transformers' names

    def fetch_weights(self) -> str:
        """Random-weight presets: build and save the weights now, before the process group exists
        (transformers' save_pretrained writes nothing on ranks > 0 once torch.distributed is up)."""
        if self.cfg.model.path:
            return self.cfg.model.path
        from pipeline.models.random_weights import random_weights_dir

        return str(random_weights_dir(self.cfg.model))

    def join_group(self, rendezvous) -> int:
        """`rendezvous` is this rank's pipeline.parallel.rendezvous.Rendezvous; None: a group of one, which
        needs no process group at all."""
        from pipeline.parallel.groups import ParallelContext, init_group

        self.ctx = ParallelContext.single(self.device) if rendezvous is None else init_group(rendezvous, self.device)
        return self.ctx.rank

    def load_model(self) -> None:
        from pipeline.models import build_adapter, load_model

        self.bundle = load_model(self.cfg.model, self.device)
        self.adapter = build_adapter(self.bundle, self.cfg.attention)
        if self.ctx.world > 1:
            from pipeline.parallel import parallelize

            self.run_model = parallelize(self.adapter, self.ctx, ring=self.cfg.parallel.ring)

    # --- work -------------------------------------------------------------------------------------
    def denoise_block(self, cfg, block: int, restore: bool) -> RankOutput:
        """Denoise block `block` of video `cfg`. The carried state is this process's own, continued from
        the video's previous block, unless `restore`: then it is read from the checkpoint (block-1's;
        none at block 0), as after a rebuild or when a video resumes. Unless it was the last block,
        the state after it goes to the checkpoint too, from this rank (it can be large: a rolling KV
        cache), before the scheduler commits the block."""
        import torch

        denoiser, plan, checkpoint = self._prepare(cfg)
        rank = self.ctx.rank
        if restore:
            denoiser.states.reset()
            if block > 0:
                denoiser.states.load_tensors(checkpoint.load_state(block - 1, rank), self.device)
        self.step, self.steps = 0, int(cfg.sampling.steps)
        t0 = time.perf_counter()
        latents = denoiser.denoise_block(plan, plan.blocks[block], progress=self._on_step)
        if latents.is_cuda:
            torch.cuda.synchronize(latents.device)
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        if block + 1 < len(plan.blocks):
            checkpoint.save_state(block, rank, denoiser.states.to_tensors())
        return RankOutput(latents=latents.cpu() if rank == 0 else None, seconds=seconds,
                          state_s=time.perf_counter() - t1)

    def _prepare(self, cfg):
        """Denoiser (prompts, seed, carried state), plan and checkpoint of video `cfg`, made once per video."""
        from pipeline.runtime.checkpoint import BlockCheckpoint
        from pipeline.sampling.denoise import Denoiser
        from pipeline.sampling.plan import ShotPlan
        from pipeline.storage import open_store

        key = fingerprint(cfg), cfg.video.name
        if self._video is None or self._video[0] != key:
            plan = ShotPlan.from_config(cfg, self.bundle.transformer.config.in_channels)
            denoiser = Denoiser(self.adapter, self.bundle, cfg, self.run_model)
            self._video = (key, denoiser, plan, BlockCheckpoint(open_store(cfg.storage), cfg.video.name, cfg))
        return self._video[1:]

    def _on_step(self, block: int, step: int, steps: int) -> None:
        self.step, self.steps = step, steps

    def step_progress(self) -> tuple[int, int]:
        return self.step, self.steps

    # --- health -----------------------------------------------------------------------------------
    def ping(self) -> int:
        return self.ctx.rank if self.ctx is not None else -1

    def check_group(self) -> int:
        """One all-reduce over the group: returns the sum of ranks (P * (P - 1) / 2) when all are alive."""
        import torch
        import torch.distributed as dist

        if self.ctx.group is None:
            return 0
        t = torch.tensor([self.ctx.rank], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, group=self.ctx.group)
        return int(t.item())

    def close(self) -> None:
        from pipeline.parallel.groups import close_group

        if self.ctx is not None:
            close_group(self.ctx)
            self.ctx = None
