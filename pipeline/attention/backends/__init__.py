"""Kernel selection. A method gets one AttentionBackend and calls its primitives; nothing here is
process-global. Layout contract: dense primitives take and return (B, N, H, D)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.attention.backends.aligned import split_key_attention, split_keys
from pipeline.attention.backends.blockmask import SegmentMask, block_sparse_attention
from pipeline.attention.backends.segments import DEFAULT_MIN_TOKENS, dense_lse, segment_attention


@dataclass
class AttentionBackend:
    """Primitives on one device. `sdpa_order` is the SDPA kernel preference (first that runs wins)."""

    name: str
    device: torch.device
    sdpa_order: tuple[SDPBackend, ...]
    segment_min_tokens: int = DEFAULT_MIN_TOKENS  # segments: one dense call per segment from this mean length up

    def dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              key_tile: int | None = None) -> torch.Tensor:
        """Full attention; q (B, Nq, H, D), k/v (B, Nk, H, D) -> (B, Nq, H, D). On CUDA in half
        precision without autograd, >= 8,192 keys that are not whole 128-key tiles run as the whole
        tiles plus the rest, merged exactly (aligned.py: ~8% of cuDNN's rate); key_tile forces it."""
        b, nq, h, d = q.shape
        whole = split_keys(k.shape[1], q, torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)),
                           key_tile)
        if whole:
            o, _ = split_key_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), whole, scale)
            return o.view(b, nq, h, d)
        with sdpa_kernel(list(self.sdpa_order)):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return o.transpose(1, 2)

    def dense_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
                  scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Full attention with its lse, forward only: q (B, Nq, H, D), k/v (B, Nk, H, D), bias an additive
        (B or 1, H or 1, Nq, Nk) term on the scaled logits in q's dtype -> o (B, Nq, H, D), lse (B, Nq, H)
        fp32. cuDNN on CUDA in half precision (memory-efficient where cuDNN refuses a bias)."""
        o, lse = dense_lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, bias)
        return o.transpose(1, 2), lse.transpose(1, 2)

    def block_sparse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: Sequence[SegmentMask],
                     scale: float | None = None, path: str = "auto") -> torch.Tensor:
        """Attention where query i sees key j iff every SegmentMask allows it (exact per token);
        (B, N, H, D) in and out. CUDA: dense calls over gathered keys for large segments, else
        FlexAttention over 128-blocks; CPU: SDPA with the mask. Rule: backends/blockmask.py."""
        return block_sparse_attention(q, k, v, masks, scale, path, self.sdpa_order)

    def segments(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                 return_lse: bool = False, counts: Sequence[int] | None = None, scale: float | None = None,
                 path: str = "auto", out_scale: torch.Tensor | None = None):
        """Attention inside each segment of a packed sequence (varlen): q, k, v (T, H, D), cu_seqlens
        (S + 1,) int32 -> o (T, H, D) [, lse (H, T) fp32]; out_scale (T,) or (T, H) multiplies o
        (fused into the packing where it can be). Kernel rule: backends/segments.py."""
        return segment_attention(q, k, v, cu_seqlens, scale, return_lse, counts, path, self.segment_min_tokens,
                                 self.sdpa_order, out_scale)


def select_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> AttentionBackend:
    """The backend for `name` (auto | sdpa | cpu) on `device`; raises ValueError with the reason."""
    device = torch.device(device)
    if device.type == "cuda":
        order = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH)
        if name not in ("auto", "sdpa"):
            raise ValueError(f"attention.backend: {name!r} is not available on {device}")
        return AttentionBackend("sdpa", device, order)
    if name not in ("auto", "sdpa", "cpu"):
        raise ValueError(f"attention.backend: {name!r} needs a CUDA device (got {device})")
    # CPU: the flash kernel for CPU handles no mask; MATH covers the rest.
    return AttentionBackend("cpu", device, (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH))
