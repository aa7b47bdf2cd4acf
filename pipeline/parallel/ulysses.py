"""Ulysses context parallelism around any attention method of the registry.

Each rank holds a contiguous shard of L tokens (pad included, see shard.py) for all H heads.
One all-to-all of the stacked q, k, v turns (B, L, H, D) into (B, P * L, H / P, D): the whole
sequence for this rank's H / P heads. The pad is stripped, the method runs unchanged on the full
layout (MoC chunks, STGA windows, lite's skip tiles all see every token for their heads), the
output is re-padded and one all-to-all brings it back to (B, L, H, D).

MoGA routing is per token and shared by all heads, so it is computed before the exchange on the
local tokens (meta.routing holds (B, L) groups and gates) and all-gathered here (one float pair per
token): every rank then sorts the full sequence identically. Stateful methods (lite) keep their
state per rank, for their own heads, in the StateSlot the sampler gives this rank.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from pipeline.attention.base import AttentionMeta, AttentionMethod, Routing
from pipeline.parallel.groups import ParallelContext
from pipeline.parallel.shard import all_gather_seq, pad_to, plan_of_shard


def check_heads(heads: int, world: int) -> None:
    """One line when Ulysses cannot shard `heads` over `world` ranks."""
    if heads % world:
        divisors = ", ".join(str(p) for p in range(1, heads + 1) if heads % p == 0)
        raise ValueError(f"parallel.degree: {world} does not divide the {heads} attention heads (Ulysses shards "
                         f"heads over ranks; use one of {divisors})")


def seq_to_heads(tensors: tuple[torch.Tensor, ...], ctx: ParallelContext) -> list[torch.Tensor]:
    """One all-to-all for all `tensors`: each (B, L, H, D) token shard -> (B, P * L, H / P, D)."""
    p = ctx.world
    b, n, h, d = tensors[0].shape
    check_heads(h, p)
    send = torch.empty((p, len(tensors), b, n, h // p, d), dtype=tensors[0].dtype, device=tensors[0].device)
    for i, t in enumerate(tensors):
        send[:, i] = t.reshape(b, n, p, h // p, d).permute(2, 0, 1, 3, 4)  # head group j goes to rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=ctx.group)
    del send
    # recv[j, i]: tensor i of rank j's tokens, for this rank's heads; rank order = sequence order
    return [recv[:, i].transpose(0, 1).reshape(b, p * n, h // p, d) for i in range(len(tensors))]


def heads_to_seq(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """The inverse exchange: (B, P * L, H / P, D) -> (B, L, H, D)."""
    p = ctx.world
    b, total, hp, d = x.shape
    n = total // p
    send = x.reshape(b, p, n, hp, d).transpose(0, 1).contiguous()  # (P, B, L, H/P, D): tokens of rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=ctx.group)
    del send
    return recv.permute(1, 2, 0, 3, 4).reshape(b, n, p * hp, d)  # heads of rank j at head group j


def gather_routing(routing: Routing, ctx: ParallelContext, num_tokens: int) -> Routing:
    """Local (B, L) groups and gates -> the whole sequence's (B, N), in one all-gather."""
    packed = torch.stack([routing.groups.to(torch.float32), routing.gate.to(torch.float32)], -1)  # (B, L, 2)
    full = all_gather_seq(packed, ctx, dim=1)[:, :num_tokens]  # group ids < 2^24 are exact in fp32
    return Routing(groups=full[..., 0].round().to(routing.groups.dtype), gate=full[..., 1].to(routing.gate.dtype),
                   num_groups=routing.num_groups)


class UlyssesAttention:
    """`method` over a context-parallel group: the same forward(q, k, v, meta) -> o contract, with q, k, v
    and o this rank's token shard (B, L, H, D) and meta describing the whole (unpadded) sequence."""

    def __init__(self, method: AttentionMethod, ctx: ParallelContext):
        if not method.supports_context_parallel:
            raise ValueError(f"attention.method: {method.name} does not support context parallelism")
        self.method, self.ctx = method, ctx
        self.name = method.name
        self.needs_routing, self.applies_rope, self.has_state = method.needs_routing, method.applies_rope, method.has_state

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        b, n_local, h, _ = q.shape
        ctx, num_tokens = self.ctx, meta.layout.num_tokens
        check_heads(h, ctx.world)
        plan_of_shard(meta.layout, ctx.world, n_local)  # refuses a shard that is not a cut of the layout
        q, k, v = (t[:, :num_tokens] for t in seq_to_heads((q, k, v), ctx))  # (B, N, H/P, D) each
        o = self.method(q, k, v, self._full_meta(meta, n_local))  # (B, N, H/P, D)
        return heads_to_seq(pad_to(o, n_local * ctx.world, 1), ctx)  # (B, L, H, D)

    def _full_meta(self, meta: AttentionMeta, n_local: int) -> AttentionMeta:
        """meta for the whole sequence: gathered routing and rope (stats and state slot are shared)."""
        num_tokens = meta.layout.num_tokens
        changes = {}
        if meta.routing is not None:
            if meta.routing.groups.shape[1] != n_local:
                raise ValueError(f"ulysses: meta.routing holds {meta.routing.groups.shape[1]} tokens, expected "
                                 f"this rank's {n_local} (route before the all-to-all, on local tokens)")
            changes["routing"] = gather_routing(meta.routing, self.ctx, num_tokens)
        if meta.rope is not None and self.method.applies_rope and meta.rope[0].shape[1] == n_local:
            cos_sin = all_gather_seq(torch.stack(meta.rope), self.ctx, dim=2)[:, :, :num_tokens]  # (2, 1, N, 1, D)
            changes["rope"] = (cos_sin[0], cos_sin[1])
        return replace(meta, **changes) if changes else meta

    def flops(self, meta: AttentionMeta, shape: tuple[int, int, int, int]) -> float:
        """What this rank's forward computed (its H / P heads over the whole sequence)."""
        b, _, h, d = shape
        return self.method.flops(meta, (b, meta.layout.num_tokens, h // self.ctx.world, d))

    def __call__(self, q, k, v, meta):
        return self.forward(q, k, v, meta)

    def __repr__(self) -> str:
        return f"UlyssesAttention({self.method!r}, world={self.ctx.world})"
