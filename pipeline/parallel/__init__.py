"""Context parallelism (docs/parallel.md): process groups, sequence shards, Ulysses all-to-all around
every attention method, the state strategy for linear attention, SANA's temporal-conv halo, and
parallelize(adapter, ctx) applying all of it to a model from outside.

Names load on first use: `pipeline.parallel.rendezvous` (plain data) can be imported by a process
that never touches torch (the scheduler) without pulling in the rest."""

from __future__ import annotations

import importlib

_WHERE = {
    "ParallelDiT": "dit", "parallel_attention": "dit", "parallelize": "dit",
    "ParallelContext": "groups", "close_group": "groups", "init_group": "groups",
    "Rendezvous": "rendezvous", "free_port": "rendezvous",
    "ShardPlan": "shard", "gather": "shard", "plan_for": "shard",  # shard(): pipeline.parallel.shard.shard
    "StateParallelAttention": "state",
    "UlyssesAttention": "ulysses", "check_heads": "ulysses",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'pipeline.parallel' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipeline.parallel.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return __all__
