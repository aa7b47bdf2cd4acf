"""Run a function on P gloo ranks in fresh processes (torch.multiprocessing), for the context-parallel
tests: the same init_group the Ray actors and torchrun use, over 127.0.0.1."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from pipeline.parallel.groups import Rendezvous, close_group, free_port, init_group


def spawn(world: int, fn, *args) -> None:
    """Run fn(ctx, *args) on `world` gloo ranks; a failing rank fails the caller."""
    mp.spawn(run_rank, args=(world, free_port("127.0.0.1"), fn, args), nprocs=world, join=True)


def run_rank(rank: int, world: int, port: int, fn, args) -> None:
    """Rank `rank` of `world`: join the gloo group at 127.0.0.1:port, run fn(ctx, *args), leave together."""
    torch.set_num_threads(1)
    ctx = init_group(Rendezvous("127.0.0.1", port, rank, world, "gloo", timeout_s=60))
    try:
        fn(ctx, *args)
        # Leave together: a rank tearing gloo down while its peer is still in a collective can make
        # the peer's transport thread abort the process (seen once under load: SIGABRT at exit).
        torch.distributed.barrier()
    finally:
        close_group(ctx)
