"""Rotary position embedding in the Wan / SANA-Video convention (interleaved pairs).

rope = (cos, sin), each (1, N, 1, D) float, token-major like the sequence; pairs (x[2i], x[2i+1])
rotate by the angle whose cos is cos[..., 2i] and sin is sin[..., 2i+1] (diffusers' layout)."""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x (B, N, H, D) -> rotated x, same dtype (computed in rope's dtype)."""
    cos, sin = rope
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, N, H, D/2) each
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, cos.dtype))
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


def slice_rope(rope: tuple[torch.Tensor, torch.Tensor], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rope of tokens [start, end) (context-parallel shards)."""
    return rope[0][:, start:end], rope[1][:, start:end]
