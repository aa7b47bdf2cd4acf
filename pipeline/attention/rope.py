"""Rotary position embedding in the Wan / SANA-Video convention (interleaved pairs).

rope = (cos, sin), each (1, N, 1, D) float, token-major like the sequence; pairs (x[2i], x[2i+1])
rotate by the angle whose cos is cos[..., 2i] and sin is sin[..., 2i+1] (diffusers' layout)."""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
               out: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., N, H, D) -> rotated x, same dtype (computed in rope's dtype, rounded once on the write).

    out: where to write it (x's shape, any strides with a unit last stride): context parallelism passes
    its all-to-all send buffer, so rotating is the packing copy. Without a gradient the two halves are
    written straight into out; with one (training), out of place through a buffer of rope's dtype."""
    cos, sin = rope
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (..., N, H, D/2) each
    c, s = cos[..., 0::2], sin[..., 1::2]
    if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad):
        rotated = torch.empty_like(x, dtype=torch.promote_types(x.dtype, cos.dtype))
        rotated[..., 0::2] = x1 * c - x2 * s
        rotated[..., 1::2] = x1 * s + x2 * c
        rotated = rotated.type_as(x)
        return rotated if out is None else out.copy_(rotated)
    out = torch.empty_like(x) if out is None else out
    pairs = out.unflatten(-1, (-1, 2))
    torch.sub(x1 * c, x2 * s, out=pairs[..., 0])
    torch.add(x1 * s, x2 * c, out=pairs[..., 1])
    return out


def slice_rope(rope: tuple[torch.Tensor, torch.Tensor], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rope of tokens [start, end) (context-parallel shards)."""
    return rope[0][:, start:end], rope[1][:, start:end]
