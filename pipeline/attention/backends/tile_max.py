"""LiteAttention's tile margins without the logits in memory: one Triton kernel, two passes over K.

    margin[b, h, t, u] = max over rows i of q tile t of (max_{j in k tile u} s_ij - max_j s_ij) * log2(e)

(s_ij = q_i . k_j * scale; lite.py has the meaning). The torch path forms the logits in slabs of
query rows and reduces them: ~4 bytes of memory traffic per (query, key) pair and head, which made
a full lite step 5.5-6.5x a dense step on the H100. Here each program holds one q tile of one
(batch row, head) in registers and walks the k tiles twice: first for every row's max over all
keys, then for each k tile's row maxima against it. The logits stay on chip (fp32 accumulation of
the bf16 products); the cost is two Q K^T products, about one dense attention's FLOPs, and the
output (B, H, nQT, nKT) is all that is written.

Full attention only (no base mask); CUDA with Triton, tiles that are powers of two >= 16, a head
dim that is a power of two <= 256; everything else takes the torch path in lite.py.
"""

from __future__ import annotations

import functools
import math

import torch


@functools.cache
def _triton_kernel():
    """The compiled kernel, or None when Triton is not importable (CPU wheels of torch)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def tile_margin_kernel(q_ptr, k_ptr, out_ptr, N, H, NKT, scale_log2e,
                           sqb, sqn, sqh, skb, skn, skh, sob, soh, sot,
                           D: tl.constexpr, TQ: tl.constexpr, TK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)  # int64 offsets: B * N * H * D passes 2^31 at ~580k tokens
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        rows = t * TQ + tl.arange(0, TQ)
        row_ok = rows < N
        dims = tl.arange(0, D)
        q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :], mask=row_ok[:, None], other=0.0)
        k_base = k_ptr + b * skb + h * skh + dims[:, None]
        row_max = tl.full([TQ], float("-inf"), tl.float32)
        for u in range(0, NKT):  # pass 1: every row's max over all keys
            cols = u * TK + tl.arange(0, TK)
            col_ok = cols < N
            k = tl.load(k_base + cols[None, :] * skn, mask=col_ok[None, :], other=0.0)  # (D, TK)
            s = tl.where(col_ok[None, :], tl.dot(q, k), float("-inf"))
            row_max = tl.maximum(row_max, tl.max(s, 1))
        out = out_ptr + b * sob + h * soh + t * sot
        for u in range(0, NKT):  # pass 2: each k tile's row maxima against the row's max
            cols = u * TK + tl.arange(0, TK)
            col_ok = cols < N
            k = tl.load(k_base + cols[None, :] * skn, mask=col_ok[None, :], other=0.0)
            s = tl.where(col_ok[None, :], tl.dot(q, k), float("-inf"))
            diff = tl.where(row_ok, (tl.max(s, 1) - row_max) * scale_log2e, float("-inf"))
            tl.store(out + u, tl.max(diff, 0))

    return tile_margin_kernel


def _power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def fused_tile_margins_available(q: torch.Tensor, tile: tuple[int, int]) -> bool:
    """Whether fused_tile_margins takes q (B, N, H, D) and these tiles."""
    d = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _triton_kernel() is not None
            and all(_power_of_two(x) and x >= 16 for x in tile) and _power_of_two(d) and 16 <= d <= 256
            and not (torch.is_grad_enabled() and q.requires_grad))


def fused_tile_margins(q: torch.Tensor, k: torch.Tensor, tile: tuple[int, int], scale: float) -> torch.Tensor:
    """margin (B, H, nQT, nKT) fp32 in log2 units for full attention; q, k (B, N, H, D) on CUDA."""
    b, n, h, d = q.shape
    tq, tk = tile
    nqt, nkt = -(-n // tq), -(-n // tk)
    q, k = q.contiguous(), k.contiguous()  # the kernel reads D as the unit-stride dimension
    out = torch.empty(b, h, nqt, nkt, device=q.device, dtype=torch.float32)
    if n:
        _triton_kernel()[(nqt, b * h)](q, k, out, n, h, nkt, scale / math.log(2.0),
                                       q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                                       out.stride(0), out.stride(1), out.stride(2),
                                       D=d, TQ=tq, TK=tk, num_warps=8, num_stages=3)
    return out
