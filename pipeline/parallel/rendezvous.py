"""Where and as whom a process joins its context-parallel group, and a free port to serve it on.

Plain data, no torch: the scheduler builds one Rendezvous per rank and sends it to the workers
without importing torch (its process starts on the job's critical path); pipeline.parallel.groups
turns it into a process group.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

BACKENDS = ("auto", "nccl", "gloo")


def free_port(host: str) -> int:
    """A TCP port free on `host` right now (the rendezvous binds it moments later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Rendezvous:
    """Where and as whom one process joins its group: rank 0 serves the store at address:port."""

    address: str
    port: int
    rank: int
    world: int
    backend: str = "auto"  # auto: nccl on a CUDA device, gloo otherwise
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"parallel.backend: unknown backend {self.backend!r} (known: {', '.join(BACKENDS)})")
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"parallel: rank {self.rank} is not in a group of {self.world}")
        if not self.timeout_s > 0:
            raise ValueError(f"parallel.timeout_s: must be > 0 (got {self.timeout_s}); a collective may not wait forever")

    @classmethod
    def from_env(cls, backend: str = "auto", timeout_s: float = 600.0) -> "Rendezvous":
        """What torchrun sets: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE."""
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if k not in os.environ]
        if missing:
            raise ValueError(f"parallel: {', '.join(missing)} not set (run under torchrun, or pass a Rendezvous)")
        return cls(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["RANK"]),
                   int(os.environ["WORLD_SIZE"]), backend, timeout_s)

    @property
    def init_method(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"tcp://{host}:{self.port}"

    def backend_for(self, device) -> str:
        """device: a torch.device."""
        if self.backend != "auto":
            return self.backend
        return "nccl" if device.type == "cuda" else "gloo"
