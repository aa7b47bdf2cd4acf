"""Attention inside segments of a packed sequence (varlen): MoGA groups, STGA windows, their cells.

q, k, v are (T, H, D) with the tokens of segment s at rows cu_seqlens[s]:cu_seqlens[s+1]; a query
attends to every key of its own segment and nothing else (q and k share cu_seqlens). Zero-length
segments are allowed (an empty MoGA group). Optionally returns lse (H, T) fp32, the log-sum-exp of
each query's scaled logits, so that partial attentions over disjoint key sets can be merged exactly.

Kernel rule (`choose_path`), measured on H100 (torch 2.11): gather + one cuDNN SDPA call per MoGA
group reached 550 TFLOP/s effective where torch's varlen_attn reached ~350, and 1-frame windows
batched into one cuDNN call ~500. So:
  1. "batched": every segment has the same length -> one dense call on (S, n, H, D) (no launches
     per segment, cuDNN's best shape);
  2. "per_segment": the mean non-empty segment holds >= min_tokens tokens (few large groups) ->
     one dense call per segment on its contiguous (1, n, H, D) slice (no padding, no copies);
  3. "varlen": many small segments -> flash-attn's flash_attn_varlen_func when installed (the
     `flash` extra), else torch.nn.attention.varlen.varlen_attn (CUDA, half precision);
  4. anything else (CPU, fp32 on CUDA, no varlen kernel) -> "per_segment".
Zero-length segments never reach a kernel (dropped from the varlen offsets, skipped per segment).
Autograd: "batched" and "per_segment" run through SDPA, which has a backward; when a gradient is
needed the rule never picks "varlen". With return_lse under autograd, the kernels' lse outputs are
not differentiable, so a custom Function runs the forward on the kernels and a backward written out
in matmuls (query rows in slabs) that takes the gradient of both o and lse (see _SegmentsWithLse).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.attention.backends.aligned import split_key_attention, split_keys

PATHS = ("auto", "batched", "per_segment", "varlen")
DEFAULT_MIN_TOKENS = 2048  # per-segment dense calls from this mean segment length up
_SLAB_ELEMENTS = 1 << 24  # backward: logits per slab of query rows (64 MiB in fp32)


@functools.cache
def flash_attn_varlen():
    """flash-attn's varlen function when the optional extra is installed, else None."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def torch_varlen():
    """(varlen_attn, AuxRequest) from torch.nn.attention.varlen when this torch has it, else None."""
    try:
        from torch.nn.attention.varlen import AuxRequest, varlen_attn
    except ImportError:
        return None
    return varlen_attn, AuxRequest


def cu_seqlens_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """(S,) segment lengths -> (S + 1,) int32 offsets."""
    return F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)


def choose_path(counts: Sequence[int], device: torch.device, dtype: torch.dtype, needs_grad: bool,
                min_tokens: int = DEFAULT_MIN_TOKENS) -> str:
    """The kernel path for these segment lengths (the rule in the module docstring)."""
    nonempty = [c for c in counts if c > 0]
    if not nonempty or len(set(counts)) == 1:
        return "batched"
    if sum(nonempty) >= min_tokens * len(nonempty) or needs_grad:
        return "per_segment"
    half = dtype in (torch.float16, torch.bfloat16)
    if device.type == "cuda" and half and (flash_attn_varlen() is not None or torch_varlen() is not None):
        return "varlen"
    return "per_segment"


# ---------------------------------------------------------------------------------------------
# Dense calls on (B, H, N, D) views
# ---------------------------------------------------------------------------------------------


def dense_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-only attention with its lse: q (B, H, Nq, D), k/v (B, H, Nk, D) -> o (B, H, Nq, D),
    lse (B, H, Nq) fp32. bias: an additive (B or 1, H or 1, Nq, Nk) term on the scaled logits, in
    q's dtype. CUDA: cuDNN, else flash (half precision, no bias) or memory-efficient (fp32, or a
    bias cuDNN refuses); CPU: the CPU flash kernel. These ops do not differentiate lse (see
    _SegmentsWithLse)."""
    n = q.shape[2]
    if q.device.type == "cuda":
        out = None
        if q.dtype in (torch.float16, torch.bfloat16):
            try:
                out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, True, 0.0, False, False,
                                                                         scale=scale)
            except RuntimeError as err:  # a shape, bias or build cuDNN refuses: flash or memory-efficient take it
                if bias is None:
                    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
                else:  # slower than cuDNN: say so once, a benchmark should not hide it
                    warnings.warn(f"dense_lse: cuDNN refused an attention bias of {tuple(bias.shape)} "
                                  f"({str(err).splitlines()[0][:200]}); using the memory-efficient kernel")
        if out is None:
            out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, scale=scale)
    else:
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)
    o, lse = out[0], out[1]
    return o, lse.reshape(lse.shape[0], lse.shape[1], -1)[..., :n].float()


def _sdpa(q, k, v, scale, sdpa_order):
    with sdpa_kernel(list(sdpa_order)):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


# ---------------------------------------------------------------------------------------------
# Forward paths, (T, H, D) in and out
# ---------------------------------------------------------------------------------------------


def _empty(q, return_lse):
    t, h, d = q.shape
    return q.new_zeros(t, h, d), (q.new_full((h, t), float("-inf"), dtype=torch.float32) if return_lse else None)


def _batched(q, k, v, counts, scale, return_lse, sdpa_order, key_tile=None):
    t, h, d = q.shape
    n = counts[0] if counts else 0
    if n == 0:
        return _empty(q, return_lse)
    qb, kb, vb = (x.view(len(counts), n, h, d).transpose(1, 2) for x in (q, k, v))  # (S, H, n, D) views
    whole = split_keys(n, q, _needs_grad(q, k, v), key_tile)
    if whole:
        o, lse = split_key_attention(qb, kb, vb, whole, scale, return_lse=return_lse)  # o: (T, H, D) rows
        return o, (lse.permute(1, 0, 2).reshape(h, t) if return_lse else None)
    if return_lse:
        o, lse = dense_lse(qb, kb, vb, scale)
        return o.transpose(1, 2).reshape(t, h, d), lse.permute(1, 0, 2).reshape(h, t)
    return _sdpa(qb, kb, vb, scale, sdpa_order).transpose(1, 2).reshape(t, h, d), None


def _per_segment(q, k, v, counts, scale, return_lse, sdpa_order, out_scale=None, key_tile=None):
    """One dense call per non-empty segment. out_scale (T, 1 or H, 1) in q's dtype: multiplies o while
    the segments' outputs are packed (the packing is a copy anyway, so the product costs no pass).
    A segment whose length is not whole key tiles runs as two calls merged exactly (aligned.py)."""
    t, h, d = q.shape
    outs, lses, start = [], [], 0
    packed = None if out_scale is None else q.new_empty(t, h, d)
    needs_grad = _needs_grad(q, k, v)
    for n in counts:
        if n == 0:
            continue
        qs, ks, vs = (x[start:start + n].unsqueeze(0).transpose(1, 2) for x in (q, k, v))  # (1, H, n, D) views
        whole = split_keys(n, q, needs_grad, key_tile)
        if whole:
            dst = None if packed is None else packed[start:start + n]
            o, lse = split_key_attention(qs, ks, vs, whole, scale, out=dst, return_lse=return_lse,
                                         out_scale=None if packed is None else out_scale[start:start + n])
            if return_lse:
                lses.append(lse[0])
            if packed is None:
                outs.append(o)
            start += n
            continue
        if return_lse:
            o, lse = dense_lse(qs, ks, vs, scale)
            lses.append(lse[0])  # (H, n)
        else:
            o = _sdpa(qs, ks, vs, scale, sdpa_order)
        o = o[0].transpose(0, 1)  # (n, H, D)
        if packed is not None:
            torch.mul(o, out_scale[start:start + n], out=packed[start:start + n])
        else:
            outs.append(o)
        start += n
    if start == 0:
        return _empty(q, return_lse)
    if packed is not None:
        o = packed
    else:
        o = torch.cat(outs, 0) if len(outs) > 1 else outs[0].contiguous()
    return o, (torch.cat(lses, 1) if return_lse else None)


def _varlen(q, k, v, cu, counts, scale, return_lse):
    if not any(counts):
        return _empty(q, return_lse)
    longest = max(counts)
    if 0 in counts:  # the kernels get no empty segments: drop them (the packing is the same)
        # from pinned memory: a pageable host-to-device copy would wait for the stream (a sync per call)
        nonempty = torch.tensor([c for c in counts if c], pin_memory=q.is_cuda)
        cu = cu_seqlens_from_counts(nonempty.to(q.device, non_blocking=True))
    flash = flash_attn_varlen()
    if flash is not None:
        out = flash(q, k, v, cu, cu, longest, longest, softmax_scale=scale, return_attn_probs=return_lse)
        if not return_lse:
            return out, None
        o, lse = out[0], out[1]
        if lse.shape != (q.shape[1], q.shape[0]):  # older flash-attn pads lse per segment
            raise RuntimeError(f"flash_attn_varlen_func returned lse {tuple(lse.shape)}, expected (H, T)")
        return o, lse.float()
    varlen_attn, aux_request = torch_varlen()
    if return_lse:
        o, lse = varlen_attn(q, k, v, cu, cu, longest, longest, return_aux=aux_request(lse=True), scale=scale)
        return o, lse.float()
    return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale), None


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in tensors)


def _forward(q, k, v, cu, counts, scale, return_lse, path, sdpa_order, out_scale=None, key_tile=None):
    """(o, lse or None). out_scale is applied here only on the per-segment path (fused into the
    packing); the caller applies it for the other paths."""
    if path == "batched":
        return _batched(q, k, v, counts, scale, return_lse, sdpa_order, key_tile)
    if path == "per_segment":
        return _per_segment(q, k, v, counts, scale, return_lse, sdpa_order, out_scale, key_tile)
    if path == "varlen":
        return _varlen(q, k, v, cu, counts, scale, return_lse)
    raise ValueError(f"segments: unknown path {path!r} (known: {', '.join(PATHS)})")


# ---------------------------------------------------------------------------------------------
# Autograd with lse: kernels forward, matmul backward
# ---------------------------------------------------------------------------------------------


def _segment_backward(q, k, v, o, lse, do, dlse, scale):
    """Gradients of one segment given o and lse: q/k/v/o/do (n, H, D), lse/dlse (H, n).

    With p = exp(s - lse): dv = p^T do; ds = p * (do v^T - rowsum(do * o) + dlse); dq = ds k scale;
    dk = ds^T q scale. fp32 accumulation, query rows in slabs."""
    n, h, _ = q.shape
    kf, vf = k.float().transpose(0, 1), v.float().transpose(0, 1)  # (H, n, D)
    dq = torch.empty(n, h, q.shape[2], dtype=torch.float32, device=q.device)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    rows = max(1, _SLAB_ELEMENTS // (h * n))
    for a in range(0, n, rows):
        sl = slice(a, min(a + rows, n))
        qs, dos = q[sl].float().transpose(0, 1), do[sl].float().transpose(0, 1)  # (H, r, D)
        p = torch.exp(qs @ kf.transpose(1, 2) * scale - lse[:, sl, None])  # (H, r, n)
        dv += p.transpose(1, 2) @ dos
        delta = (dos * o[sl].float().transpose(0, 1)).sum(-1)  # (H, r)
        if dlse is not None:
            delta = delta - dlse[:, sl]
        ds = p * (dos @ vf.transpose(1, 2) - delta[..., None])
        dq[sl] = (ds @ kf * scale).transpose(0, 1)
        dk += ds.transpose(1, 2) @ qs * scale
    return dq, dk.transpose(0, 1), dv.transpose(0, 1)


class _SegmentsWithLse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, counts, scale, path, sdpa_order):
        with torch.no_grad():
            o, lse = _forward(q, k, v, cu, counts, scale, True, path, sdpa_order)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.counts, ctx.scale = counts, scale
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        grads = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (q, k, v)]
        start = 0
        for n in ctx.counts:
            if n == 0:
                continue
            sl = slice(start, start + n)
            parts = _segment_backward(q[sl], k[sl], v[sl], o[sl], lse[:, sl], do[sl],
                                      None if dlse is None else dlse[:, sl], ctx.scale)
            for g, part in zip(grads, parts):
                g[sl] = part
            start += n
        return grads[0].to(q.dtype), grads[1].to(k.dtype), grads[2].to(v.dtype), None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# The primitive
# ---------------------------------------------------------------------------------------------


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      scale: float | None = None, return_lse: bool = False, counts: Sequence[int] | None = None,
                      path: str = "auto", min_tokens: int = DEFAULT_MIN_TOKENS,
                      sdpa_order: Sequence[SDPBackend] = (SDPBackend.MATH,), out_scale: torch.Tensor | None = None,
                      key_tile: int | None = None):
    """Attention inside each segment. q, k, v (T, H, D); cu_seqlens (S + 1,) int32 with
    cu_seqlens[-1] == T. counts: the S lengths as Python ints when the caller has them (else one
    .tolist() here). out_scale (T,) or (T, H): o is multiplied by it (in o's dtype, broadcast over D;
    MoGA's gate), fused into the packing of the per-segment path; lse is that of the unscaled o.
    Returns o (T, H, D), and lse (H, T) fp32 with return_lse (always finite: every query sees at
    least itself). key_tile: None for the rule of aligned.py (whole 128-key tiles plus the rest on
    CUDA in half precision without a gradient), 0 never splits, a size forces the split (tests)."""
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"segments: q, k, v must be equal (T, H, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    counts = list(counts) if counts is not None else (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if sum(counts) != q.shape[0]:
        raise ValueError(f"segments: segment lengths sum to {sum(counts)}, q holds {q.shape[0]} tokens")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if path == "auto":
        path = choose_path(counts, q.device, q.dtype, needs_grad, min_tokens)
    if out_scale is not None:
        out_scale = out_scale.to(q.dtype).reshape(q.shape[0], -1, 1)  # (T, 1 or H, 1)
    fused = out_scale is not None and path == "per_segment" and not (
        needs_grad or (torch.is_grad_enabled() and out_scale.requires_grad))
    if return_lse and needs_grad:
        o, lse = _SegmentsWithLse.apply(q, k, v, cu_seqlens, counts, scale, path, tuple(sdpa_order))
    else:
        o, lse = _forward(q, k, v, cu_seqlens, counts, scale, return_lse, path, sdpa_order,
                          out_scale if fused else None, key_tile)
    if out_scale is not None and not fused:
        o = o * out_scale
    return (o, lse) if return_lse else o
