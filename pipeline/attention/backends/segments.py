"""Packed variable-length segments: attention inside each segment of a packed (T, H, D) tensor.

Segment s of the queries holds rows [cu_q[s], cu_q[s+1]) and attends to rows [cu_k[s], cu_k[s+1])
of the keys (the same packing when keys are not given). A query segment with no keys gets o = 0 and
lse = -inf, so it drops out of any log-sum-exp merge.

Kernels (the backend picks one per call, see AttentionBackend.segments):
- "dense": one dense SDPA call per non-empty segment (cuDNN on CUDA, the flash kernel for CPU on
  CPU). The only CPU path, and on an H100 the fastest for a few large segments (MoGA's groups).
- "varlen": torch.nn.attention.varlen.varlen_attn, one call for every segment (CUDA, fp16/bf16).
- "flash_attn": flash_attn.flash_attn_varlen_func (the optional flash-attn package).

Packing helpers: pack_by_id sorts tokens by an integer segment id (stable, so a segment keeps
sequence order) and returns the permutation and the Segments of the sorted order.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

LSE_DTYPE = torch.float32
VARLEN_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Segments:
    """Lengths of consecutive segments of a packed tensor, on the device and on the host."""

    cu_seqlens: torch.Tensor  # (S + 1,) int32 on the tensors' device: segment s is [cu[s], cu[s+1])
    lengths: torch.Tensor  # (S,) int64 on the CPU: the same lengths (slicing, max, pair counts)

    @classmethod
    def from_counts(cls, counts: torch.Tensor) -> "Segments":
        """counts (S,) on any device; one device-to-host copy."""
        cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        return cls(cu, counts.detach().to("cpu", torch.int64))

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor | list[int], device: torch.device | str) -> "Segments":
        """Host lengths (S,) -> Segments with cu_seqlens on `device`."""
        host = torch.as_tensor(lengths, dtype=torch.int64).cpu()
        cu = F.pad(host.cumsum(0), (1, 0)).to(torch.int32)
        return cls(cu.to(device, non_blocking=True), host)

    @property
    def count(self) -> int:
        return int(self.lengths.numel())

    @property
    def total(self) -> int:
        return int(self.lengths.sum())

    @property
    def max_len(self) -> int:
        return int(self.lengths.max()) if self.count else 0

    def starts(self) -> list[int]:
        """Host offsets of every segment (the dense path slices with them)."""
        return F.pad(self.lengths.cumsum(0), (1, 0))[:-1].tolist()


def pack_by_id(ids: torch.Tensor, num_ids: int) -> tuple[torch.Tensor, Segments]:
    """ids (T,) int64 in [0, num_ids) -> (perm (T,), Segments over the num_ids ids, empty ones kept).

    x[perm] lists the tokens of id 0, then id 1, ..., each in its original order."""
    perm = torch.sort(ids, stable=True).indices
    return perm, Segments.from_counts(torch.bincount(ids, minlength=num_ids))


def pair_count(q_seg: Segments, k_seg: Segments | None = None) -> float:
    """(query, key) pairs the segments compute (per head), exact as a float."""
    k_len = q_seg.lengths if k_seg is None else k_seg.lengths
    return float((q_seg.lengths.double() * k_len.double()).sum())


# ---------------------------------------------------------------------------------------------
# Availability of the optional kernels
# ---------------------------------------------------------------------------------------------


@functools.cache
def torch_varlen() -> Callable | None:
    """torch.nn.attention.varlen.varlen_attn, or None on a torch without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def flash_attn_varlen() -> Callable | None:
    """flash_attn.flash_attn_varlen_func (pip install longreel[flash]), or None."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def _varlen_takes_scale() -> bool:
    fn = torch_varlen()
    return fn is not None and "scale" in inspect.signature(fn).parameters


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


def _token_major_lse(lse: torch.Tensor, tokens: int, heads: int) -> torch.Tensor:
    """Kernel lse -> (T, H) fp32. Varlen kernels return (H, T); some versions (T, H)."""
    if tuple(lse.shape) == (heads, tokens):
        return lse.transpose(0, 1).float()
    if tuple(lse.shape) == (tokens, heads):
        return lse.float()
    raise RuntimeError(f"varlen kernel returned lse of shape {tuple(lse.shape)} for {tokens} tokens x {heads} heads")


def _rows_without_keys(q_seg: Segments, k_seg: Segments, device: torch.device) -> torch.Tensor | None:
    """(Tq,) bool: query rows whose segment has no keys; None when there are none."""
    empty = (k_seg.lengths == 0) & (q_seg.lengths > 0)
    if not bool(empty.any()):
        return None
    return torch.repeat_interleave(empty, q_seg.lengths).to(device)


def varlen_segments(q, k, v, q_seg: Segments, k_seg: Segments, scale: float | None, return_lse: bool,
                    kernel: str):
    """One varlen call for every segment; (T, H, D) packed in, o (Tq, H, D) [and lse (Tq, H)] out."""
    tq, h, d = q.shape
    if scale is not None and not (kernel == "varlen" and _varlen_takes_scale()) and kernel != "flash_attn":
        q = q * (scale * d ** 0.5)  # the kernel's default 1/sqrt(D) then gives `scale`
        scale = None
    if kernel == "flash_attn":
        o, lse, _ = flash_attn_varlen()(q, k, v, q_seg.cu_seqlens, k_seg.cu_seqlens, q_seg.max_len, k_seg.max_len,
                                         softmax_scale=scale, return_attn_probs=True)
    else:
        from torch.nn.attention.varlen import AuxRequest

        extra = {"scale": scale} if scale is not None else {}
        o, lse = torch_varlen()(q, k, v, q_seg.cu_seqlens, k_seg.cu_seqlens, q_seg.max_len, k_seg.max_len,
                                return_aux=AuxRequest(lse=True), **extra)
    lse = _token_major_lse(lse, tq, h)
    no_keys = _rows_without_keys(q_seg, k_seg, q.device) if k_seg is not q_seg else None
    if no_keys is not None:  # flash kernels leave lse = +inf there; make them neutral
        o = o.masked_fill(no_keys[:, None, None], 0.0)
        lse = lse.masked_fill(no_keys[:, None], float("-inf"))
    return (o, lse) if return_lse else o


def dense_segments(q, k, v, q_seg: Segments, k_seg: Segments, scale: float | None, return_lse: bool,
                   dense: Callable, dense_lse: Callable):
    """One dense call per non-empty segment (zero-length calls are never made: some kernels fault).

    dense(q, k, v, scale) and dense_lse(q, k, v, scale) take and return (B, N, H, D) (+ lse (B, H, N))."""
    _, h, d = q.shape
    outs, lses = [], []
    for qa, nq, ka, nk in zip(q_seg.starts(), q_seg.lengths.tolist(), k_seg.starts(), k_seg.lengths.tolist()):
        if nq == 0:
            continue
        if nk == 0:
            outs.append(q.new_zeros(nq, h, v.shape[-1]))
            lses.append(torch.full((nq, h), float("-inf"), dtype=LSE_DTYPE, device=q.device))
            continue
        qs, ks, vs = q[qa:qa + nq, None].transpose(0, 1), k[ka:ka + nk, None].transpose(0, 1), v[ka:ka + nk, None].transpose(0, 1)
        if return_lse:
            o, lse = dense_lse(qs, ks, vs, scale)  # (1, nq, H, D), (1, H, nq)
            lses.append(lse[0].transpose(0, 1))
        else:
            o = dense(qs, ks, vs, scale)
        outs.append(o[0])
    if not outs:
        o = q.new_zeros(0, h, v.shape[-1])
        lse = torch.zeros(0, h, dtype=LSE_DTYPE, device=q.device)
    else:
        o = torch.cat(outs) if len(outs) > 1 else outs[0].contiguous()
        lse = (torch.cat(lses) if len(lses) > 1 else lses[0]) if return_lse else None
    return (o, lse) if return_lse else o


# ---------------------------------------------------------------------------------------------
# Merging partial attentions over disjoint key sets
# ---------------------------------------------------------------------------------------------


def merge_lse(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the union of two disjoint key sets from the two partial results.

    o (..., H, D), lse (..., H) fp32, token-major. o = w_a o_a + w_b o_b with w = exp(lse - lse_ab);
    a side with lse = -inf (no keys) gets weight 0; both -inf gives o = 0, lse = -inf. fp32 math,
    o in o_a's dtype. The lse inputs carry no gradient (fused kernels do not differentiate it)."""
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a - finite)[..., None]
    w_b = torch.exp(lse_b - finite)[..., None]
    o = o_a.float() * w_a + o_b.float() * w_b
    return o.to(o_a.dtype), lse
