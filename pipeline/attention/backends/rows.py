"""Row gathers and scatters that move whole rows as 8-byte words, and rows counted per segment.

index_select / index_copy_ on CUDA spend index arithmetic on every element; a bf16 row of H * D
values is H * D elements of 2 bytes. Viewing each row as int64 words moves the same bytes with a
quarter of the elements (bit-exact: nothing is converted). Used by every permutation of q, k, v
and o (MoGA groups, STGA windows, moga+stga, the gathered block-sparse path) and by the gathered
path's head-major copies (last_dim_words).

The word view is not differentiable, so when a gradient is needed these fall back to the plain
index ops (which have backward formulas).
"""

from __future__ import annotations

import torch

_WORD = torch.int64


def _as_words(x: torch.Tensor) -> torch.Tensor | None:
    """x (T, ...) contiguous -> (T, W) int64 view of the same bytes, or None when it has no such view."""
    if x.dim() == 0 or not x.is_contiguous() or x.dtype == _WORD:
        return None
    row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 0
    if row_bytes == 0 or row_bytes % 8 or (x.storage_offset() * x.element_size()) % 8:
        return None
    return x.view(x.shape[0], -1).view(_WORD)


def last_dim_words(x: torch.Tensor) -> torch.Tensor:
    """x viewed as int64 words along its last dimension (same shape otherwise), or x itself when its
    layout allows no such view. A transposing copy of bf16 then moves 4x fewer elements: torch's
    strided copy costs per element, not per byte."""
    if x.dtype == _WORD or x.dim() == 0 or x.stride(-1) != 1 or (x.shape[-1] * x.element_size()) % 8:
        return x
    try:
        return x.view(_WORD)
    except RuntimeError:  # a storage offset or stride that is not a whole number of words
        return x


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] along dim 0: x (T, ...), index (R,) int64 -> (R, ...)."""
    words = None if _needs_grad(x) else _as_words(x)
    if words is None:
        return x.index_select(0, index)
    return words.index_select(0, index).view(x.dtype).view(index.numel(), *x.shape[1:])


def put_rows(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """out[index] = src along dim 0, in place (index without repeats); returns out."""
    same = src.dtype == out.dtype and src.shape[1:] == out.shape[1:]
    out_words = _as_words(out) if same and not _needs_grad(out, src) else None
    src_words = None if out_words is None else _as_words(src.contiguous())
    if out_words is None or src_words is None:
        return out.index_copy_(0, index, src)
    out_words.index_copy_(0, index, src_words)
    return out


def segment_counts(segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """(num_segments,) int64: how many entries of `segment` (integer ids in [0, num_segments)) hold each id.

    torch.bincount's CUDA kernel reads the ids' min and max back to the host to size its output
    (two stream syncs per call); with the size known, a scatter-add counts without any."""
    index = segment.reshape(-1).long()
    counts = torch.zeros(num_segments, dtype=torch.int64, device=segment.device)
    return counts.scatter_add_(0, index, torch.ones_like(index))
