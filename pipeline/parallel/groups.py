"""Process groups for context parallelism: from a rendezvous to a ParallelContext.

One place creates torch.distributed groups, whoever starts the processes: the WorkerGroup's Ray
actors (rank 0 publishes an address and a free port, every rank joins) and `torchrun` (the same
four numbers come from its environment, `Rendezvous.from_env`). The result is a ParallelContext
passed explicitly to everything that communicates; nothing here is process-global beyond what
torch.distributed itself keeps.

NCCL on GPU: a finite timeout, asynchronous error handling (a rank whose peer died fails instead
of hanging in a collective, so the group can be rebuilt) and an eager, device-bound communicator
(device_id). NVLink multicast (NVLS) stays off: it is not needed for the all-to-alls used here and
it is not available on every machine this runs on. gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeline.parallel.rendezvous import BACKENDS, Rendezvous, free_port  # noqa: F401  (re-exported)

@dataclass(frozen=True)
class ParallelContext:
    """One rank's view of its context-parallel group. world == 1 with group None: no communication."""

    rank: int
    world: int
    group: dist.ProcessGroup | None
    device: torch.device

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "ParallelContext":
        return cls(0, 1, None, torch.device(device))

    @property
    def backend(self) -> str:
        return "none" if self.group is None else dist.get_backend(self.group)

    def peer(self, rank: int) -> int:
        """The global rank of group rank `rank` (point-to-point ops address global ranks)."""
        return dist.get_global_rank(self.group, rank)


def init_group(rdzv: Rendezvous, device: torch.device | str = "cpu") -> ParallelContext:
    """Join the group described by `rdzv` on `device` (call on every rank at once).

    On CUDA the device must already be this rank's (torch.cuda.set_device or an explicit index):
    the NCCL communicator is bound to it here."""
    device = torch.device(device)
    backend = rdzv.backend_for(device)
    if backend == "nccl":
        if device.type != "cuda":
            raise ValueError(f"parallel.backend: nccl needs a CUDA device (got {device})")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        os.environ["NCCL_NVLS_ENABLE"] = "0"
    dist.init_process_group(backend, init_method=rdzv.init_method, rank=rdzv.rank, world_size=rdzv.world,
                            timeout=timedelta(seconds=rdzv.timeout_s),
                            device_id=device if backend == "nccl" else None)
    return ParallelContext(rdzv.rank, rdzv.world, dist.group.WORLD, device)


def close_group(ctx: ParallelContext) -> None:
    """Leave the group (idempotent)."""
    if ctx.group is not None and dist.is_initialized():
        dist.destroy_process_group()
