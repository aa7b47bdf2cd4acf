"""Ring attention for dense layers: for P ranks when P does not divide the head count.

Ulysses needs heads % P == 0. Ring attention does not shard heads: each rank keeps its queries
(B, L, H, D) and the K/V shards travel around the ring (rank r sends to r + 1 and receives from
r - 1, the next shard in flight while the current one is attended). Partial results over disjoint
key sets are merged exactly by log-sum-exp:

    lse = logaddexp(lse_a, lse_b),  o = exp(lse_a - lse) * o_a + exp(lse_b - lse) * o_b

Pad keys (the tail of the last shards) are cut off before each partial attention, so they never
count. Dense only: a sparse method's mask does not decompose over key shards without per-shard
masks (see docs/parallel.md). Partial attention with LSE: cuDNN (or flash) SDPA on CUDA; an fp32
matmul-softmax on CPU, where the ring exists for tests.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from pipeline.attention.base import AttentionMeta, AttentionMethod
from pipeline.parallel.groups import ParallelContext
from pipeline.parallel.shard import plan_of_shard


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Nq, H, D), k/v (B, Nk, H, D) -> (o (B, Nq, H, D) fp32, lse (B, H, Nq) fp32)."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
    if q.is_cuda:
        try:
            o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, False, False)[:2]
            return o.transpose(1, 2).float(), lse.reshape(lse.shape[:3]).float()
        except RuntimeError:  # cuDNN refuses the shape or dtype: flash has the same contract
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, False, False)[:2]
            return o.transpose(1, 2).float(), lse.float()
    s = qt.float() @ kt.float().transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, Nq, Nk)
    lse = torch.logsumexp(s, -1)
    return ((s - lse[..., None]).exp() @ vt.float()).transpose(1, 2), lse


def merge(acc: tuple[torch.Tensor, torch.Tensor] | None, part: tuple[torch.Tensor, torch.Tensor]):
    """Exact combination of two attentions over disjoint key sets (see the module docstring)."""
    if acc is None:
        return part
    (o_a, lse_a), (o_b, lse_b) = acc, part
    lse = torch.logaddexp(lse_a, lse_b)  # (B, H, N)
    w_a, w_b = ((x - lse).exp().transpose(1, 2)[..., None] for x in (lse_a, lse_b))  # (B, N, H, 1)
    return o_a * w_a + o_b * w_b, lse


class RingAttention:
    """Dense attention over a context-parallel group by K/V rotation; q, k, v and o are this rank's
    token shard (B, L, H, D), meta describes the whole sequence."""

    name = "dense"
    cp_strategy = "ring"
    supports_context_parallel = True
    needs_routing = applies_rope = has_state = False

    def __init__(self, method: AttentionMethod, ctx: ParallelContext):
        if method.name != "dense":
            raise ValueError(f"parallel.ring: ring attention runs dense layers only, not {method.name} "
                             f"(use a degree that divides the head count for Ulysses)")
        self.method, self.ctx = method, ctx

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        ctx = self.ctx
        plan = plan_of_shard(meta.layout, ctx.world, q.shape[1])
        kv = torch.stack([k, v]).contiguous()  # (2, B, L, H, D): one message per ring step
        acc = None
        for step in range(ctx.world):
            owner = (ctx.rank - step) % ctx.world  # whose keys kv holds now
            pending = []
            if step < ctx.world - 1:
                incoming = torch.empty_like(kv)
                pending = dist.batch_isend_irecv([
                    dist.P2POp(dist.isend, kv, ctx.peer((ctx.rank + 1) % ctx.world), ctx.group),
                    dist.P2POp(dist.irecv, incoming, ctx.peer((ctx.rank - 1) % ctx.world), ctx.group)])
            real = plan.real_len(owner)
            if real:
                acc = merge(acc, attention_with_lse(q, kv[0, :, :real], kv[1, :, :real]))
            for work in pending:
                work.wait()
            if pending:
                kv = incoming
        return acc[0].to(q.dtype)  # (B, L, H, D)

    def flops(self, meta: AttentionMeta, shape: tuple[int, int, int, int]) -> float:
        b, n, h, d = shape
        return 4.0 * d * b * h * n * meta.layout.num_tokens

    def __call__(self, q, k, v, meta):
        return self.forward(q, k, v, meta)

    def __repr__(self) -> str:
        return f"RingAttention(world={self.ctx.world})"
