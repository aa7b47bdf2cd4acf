"""Worker: one rank of a context-parallel group, as plain Python (actors/worker.py makes it an actor).

A group of P workers shares one video's token sequence. They start in phases, driven by the
WorkerGroup, so that nothing touches CUDA before the device is chosen:
    1. set_device(visible_devices, index)   CUDA_VISIBLE_DEVICES for the node's group GPUs, then the
                                            rank's own device (before the process group: NCCL binds
                                            its communicator to the current device)
    2. join_group(rendezvous, rank, world)  torch.distributed over gloo (CPU) or NCCL (GPU)
    3. load_model()                         weights, attention processors, context parallelism
Then `denoise_block` runs in lockstep on every rank; `ping` and `check_group` are health checks.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta


class WorkerLost(RuntimeError):
    """A rank of the group died (process, node or actor gone): the group must be rebuilt.

    A torch.distributed group cannot be repaired member by member (a restarted process is not in
    the communicator), so the whole group is torn down and built again; the work it was doing
    (one block) is re-run from the state the scheduler holds."""


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


def free_port(host: str) -> int:
    """A TCP port free on `host` right now (the rendezvous binds it moments later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tcp_address(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


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

    os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices
    torch.cuda.set_device(index)
    return f"cuda:{index}"


class Worker:
    """One rank. `parallel` is the ParallelConfig; `model` the ModelConfig (loaded in phase 3)."""

    def __init__(self, parallel, model):
        self.parallel, self.model_cfg = parallel, model
        self.rank, self.world_size = -1, 0
        self.device = "cpu"
        self.group = None  # torch.distributed ProcessGroup once joined

    # --- phase 0: rendezvous (rank 0 only) --------------------------------------------------------
    def publish_rendezvous(self, host: str) -> str:
        """Rank 0 picks the address every rank joins: its node's IP and a port free there."""
        return tcp_address(host, free_port(host))

    # --- phase 1: device --------------------------------------------------------------------------
    def set_device(self, visible_devices: str | None, index: int | None) -> str:
        self.device = select_device(visible_devices, index)
        return self.device

    # --- phase 2: process group -------------------------------------------------------------------
    def backend(self) -> str:
        if self.parallel.backend != "auto":
            return self.parallel.backend
        return "nccl" if self.device.startswith("cuda") else "gloo"

    def join_group(self, rendezvous: str, rank: int, world_size: int) -> int:
        import torch.distributed as dist

        if self.device.startswith("cuda"):
            # Fail instead of hanging when a peer dies mid-collective; the group is then rebuilt.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(self.backend(), init_method=rendezvous, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=self.parallel.timeout_s))
        self.rank, self.world_size = rank, world_size
        self.group = dist.group.WORLD
        return rank

    # --- health -----------------------------------------------------------------------------------
    def ping(self) -> int:
        return self.rank

    def check_group(self) -> int:
        """One all-reduce over the group: returns the sum of ranks (P * (P - 1) / 2) when all are alive."""
        import torch
        import torch.distributed as dist

        t = torch.tensor([self.rank], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, group=self.group)
        return int(t.item())

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self.group = None
