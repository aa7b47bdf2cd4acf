"""Context parallelism for linear attention ("state" strategy): no K/V exchange at all.

Each rank keeps its own tokens and all heads. It sums v k~^T and phi(k) over its tokens per layout
block (LinearAttention.block_sums), one all-reduce makes those the whole sequence's per-block
sums, and each rank finishes its own queries with them (LinearAttention.attend). Traffic per layer
is B * nb * H * D * (D + 1) floats, whatever the sequence length.

Why a per-block all-reduce rather than an exclusive prefix scan over ranks: under block-causal
attention a query sees every key of its own block (bidirectional inside the block) plus all
earlier blocks. An exclusive scan gives a rank only the sums of the ranks before it, which is
exact only when shard boundaries fall on block boundaries; when a shard cuts a block, the queries
at the start of that block also need the keys of the same block held by the next rank. Summing
per block across ranks and then prefix-summing over blocks locally (attend's cumsum) is exact for
any cut. For bidirectional attention the blocks are summed locally first, so one block's worth is
reduced.

A rank that holds only pad (fewer latent frames than ranks) contributes zero sums and still
commits the same carried state as the others, so the state stays replicated.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from pipeline.attention.base import AttentionMeta, AttentionMethod
from pipeline.attention.linear import BlockSums
from pipeline.parallel.groups import ParallelContext
from pipeline.parallel.shard import pad_to, plan_for


def all_reduce_sums(sums: BlockSums, ctx: ParallelContext) -> BlockSums:
    """S and z summed over the group in one all-reduce."""
    b, nb, h, d, _ = sums.S.shape
    flat = torch.cat([sums.S.reshape(b, -1), sums.z.reshape(b, -1)], 1)
    dist.all_reduce(flat, group=ctx.group)
    s, z = flat.split([nb * h * d * d, nb * h * d], 1)
    return BlockSums(s.reshape(b, nb, h, d, d), z.reshape(b, nb, h, d))


class StateParallelAttention:
    """A linear-attention method (cp_strategy "state") over a context-parallel group: q, k, v and o are
    this rank's token shard (B, L, H, D); meta describes the whole sequence; meta.rope holds the rope of
    the shard (L tokens, pad included) or of the whole sequence."""

    def __init__(self, method: AttentionMethod, ctx: ParallelContext, by_frames: bool):
        if method.cp_strategy != "state":
            raise ValueError(f"StateParallelAttention: {method.name} has cp_strategy {method.cp_strategy!r}")
        self.method, self.ctx, self.by_frames = method, ctx, by_frames
        self.name = method.name
        self.needs_routing, self.applies_rope, self.has_state = method.needs_routing, method.applies_rope, method.has_state

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        b, n_local, h, d = q.shape
        plan = plan_for(meta.layout, self.ctx.world, self.by_frames)
        if n_local != plan.local_len:
            raise ValueError(f"state parallel: a shard of {n_local} tokens is not this plan's {plan.local_len}")
        start, end = plan.token_range(self.ctx.rank)
        held = end - start
        if meta.rope is None:
            raise ValueError("state parallel: meta.rope is None (linear attention rotates inside)")
        whole_rope = meta.rope[0].shape[1] == plan.num_tokens and held  # else the shard's own rope
        lo = start if whole_rope else 0
        # A rank with only pad still runs attend on one (pad) query so that it commits the state like the others.
        rows = max(held, 1)
        local = replace(meta, rope=(meta.rope[0][:, lo:lo + rows], meta.rope[1][:, lo:lo + rows]),
                        token_range=(start, end) if held else (0, 1))
        if held:
            sums = self.method.block_sums(k[:, :held], v[:, :held], local)
        else:
            nb = len(meta.layout.block_frames)
            sums = BlockSums(q.new_zeros(b, nb, h, d, d, dtype=torch.float32),
                             q.new_zeros(b, nb, h, d, dtype=torch.float32))
        if not self.method.cfg.linear.causal:  # bidirectional attend only uses the sum over blocks
            sums = BlockSums(sums.S.sum(1, keepdim=True), sums.z.sum(1, keepdim=True))
        sums = all_reduce_sums(sums, self.ctx)
        o = self.method.attend(q[:, :rows], sums, local)  # (B, rows, H, D)
        return pad_to(o[:, :held], n_local, 1)  # (B, L, H, D), zeros for pad

    def flops(self, meta: AttentionMeta, shape: tuple[int, int, int, int]) -> float:
        return self.method.flops(meta, shape)

    def __call__(self, q, k, v, meta):
        return self.forward(q, k, v, meta)

    def __repr__(self) -> str:
        return f"StateParallelAttention({self.method!r}, world={self.ctx.world})"
