"""Context parallelism (docs/parallel.md): process groups, sequence shards, Ulysses all-to-all around
every attention method, the state strategy for linear attention, SANA's temporal-conv halo, and
parallelize(adapter, ctx) applying all of it to a model from outside."""

from __future__ import annotations

from pipeline.parallel.dit import ParallelDiT, parallel_attention, parallelize
from pipeline.parallel.groups import ParallelContext, Rendezvous, close_group, free_port, init_group
from pipeline.parallel.shard import ShardPlan, gather, plan_for, shard
from pipeline.parallel.state import StateParallelAttention
from pipeline.parallel.ulysses import UlyssesAttention, check_heads

__all__ = ["ParallelContext", "ParallelDiT", "Rendezvous", "ShardPlan", "StateParallelAttention", "UlyssesAttention",
           "check_heads", "close_group", "free_port", "gather", "init_group", "parallel_attention", "parallelize",
           "plan_for", "shard"]
