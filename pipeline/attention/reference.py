"""Masked dense attention in fp32: the reference every method is tested against."""

from __future__ import annotations

import math

import torch


def reference_attention(q, k, v, mask: torch.Tensor | None = None, scale: float | None = None,
                        return_lse: bool = False, precision: torch.dtype = torch.float32):
    """o = softmax(q k^T * scale + log(mask)) v, in fp32 (or `precision`); rows with no allowed key give 0.

    q (B, Nq, H, D), k/v (B, Nk, H, D); mask bool, broadcastable to (B, H, Nq, Nk).
    Returns o (B, Nq, H, D) in q's dtype, and lse (B, H, Nq) in `precision` (-inf for empty rows)."""
    dtype = q.dtype
    q, k, v = (t.to(precision).transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale  # (B, H, Nq, Nk)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Nq)
    p = torch.exp(s - lse.unsqueeze(-1).clamp_min(torch.finfo(precision).min))
    p = torch.nan_to_num(p, nan=0.0)
    o = (p @ v).transpose(1, 2).to(dtype)
    return (o, lse) if return_lse else o
