"""The weighted merge of partial attentions that moga+stga ends with, as one pass over memory.

    out[i] = wa[s] * a[s] - wc[s] * c[s] + wb[i] * b[i],   s = src[i]

a and c (the group and cell branches) are in sorted order, b (the window branch) and out in sequence
order; src (the permutation's inverse) says where row i of the sequence sits in sorted order. Rows
are (H, D); the weights (H,) per row in fp32, broadcast over D.

In torch this is a scale of a (a pass), the cell correction (a pass), the unpermute (a pass) and the
window term (a pass): seven reads or writes of a (T, H, D) tensor, 3.2 GB at 150k tokens, H = 12,
D = 128 in bf16. The Triton kernel reads a, b (and c) once and writes out once, in fp32 arithmetic.
It runs on CUDA when Triton imports and no gradient is needed; otherwise the torch passes run (the
same formula; the weights are rounded to the tensors' dtype first, as torch's mixed ops do).
"""

from __future__ import annotations

import functools

import torch

from pipeline.attention.backends.rows import take_rows


@functools.cache
def _triton_kernel():
    """The compiled kernel, or None when Triton is not importable (CPU wheels of torch)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def merge_kernel(out_ptr, a_ptr, wa_ptr, c_ptr, wc_ptr, b_ptr, wb_ptr, src_ptr, H, D,
                     HAS_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        i = tl.program_id(0).to(tl.int64)
        s = tl.load(src_ptr + i)  # int64
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        hmask = h < H
        mask = hmask & (d < D)
        offs = h * D + d
        acc = tl.load(a_ptr + s * H * D + offs, mask=mask, other=0.0).to(tl.float32) * \
            tl.load(wa_ptr + s * H + h, mask=hmask, other=0.0)
        if HAS_C:
            acc -= tl.load(c_ptr + s * H * D + offs, mask=mask, other=0.0).to(tl.float32) * \
                tl.load(wc_ptr + s * H + h, mask=hmask, other=0.0)
        acc += tl.load(b_ptr + i * H * D + offs, mask=mask, other=0.0).to(tl.float32) * \
            tl.load(wb_ptr + i * H + h, mask=hmask, other=0.0)
        tl.store(out_ptr + i * H * D + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    return merge_kernel, triton.next_power_of_2


def fused_available(*tensors: torch.Tensor) -> bool:
    """Whether merge_rows takes the one-pass kernel for these tensors."""
    return (all(t.is_cuda for t in tensors) and _triton_kernel() is not None
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def merge_rows(a: torch.Tensor, wa: torch.Tensor, b: torch.Tensor, wb: torch.Tensor, src: torch.Tensor,
               c: torch.Tensor | None = None, wc: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """a, c (T, H, D) and wa, wc (T, H) fp32 in sorted order; b (T, H, D) and wb (T, H) fp32 in sequence
    order; src (T,) int64 -> out (T, H, D) in sequence order, b's dtype (formula: module docstring).
    out: a contiguous (T, H, D) tensor of b's dtype to write into (e.g. a slice of a packed buffer)."""
    t, h, d = b.shape
    if a.shape != b.shape or wa.shape != (t, h) or wb.shape != (t, h) or src.shape != (t,):
        raise ValueError(f"merge_rows: a {tuple(a.shape)}, b {tuple(b.shape)}, wa {tuple(wa.shape)}, "
                         f"wb {tuple(wb.shape)}, src {tuple(src.shape)} do not fit (T, H, D) / (T, H) / (T,)")
    tensors = [a, wa, b, wb] + ([c, wc] if c is not None else [])
    if fused_available(*tensors):
        kernel, next_pow2 = _triton_kernel()
        a, b, wa, wb = a.contiguous(), b.contiguous(), wa.float().contiguous(), wb.float().contiguous()
        has_c = c is not None
        c, wc = (c.contiguous(), wc.float().contiguous()) if has_c else (a, wa)  # unread when HAS_C is False
        if out is None:
            out = torch.empty_like(b)
        elif not out.is_contiguous() or out.shape != b.shape or out.dtype != b.dtype:
            raise ValueError(f"merge_rows: out must be a contiguous {tuple(b.shape)} {b.dtype} tensor")
        if t:
            kernel[(t,)](out, a, wa, c, wc, b, wb, src.contiguous(), h, d, HAS_C=has_c,
                         BLOCK_H=next_pow2(h), BLOCK_D=next_pow2(d), num_warps=4)
        return out
    dtype = b.dtype
    acc = a * wa.to(dtype)[..., None]
    if c is not None:
        acc = torch.addcmul(acc, c, wc.to(dtype)[..., None], value=-1)
    merged = torch.addcmul(take_rows(acc, src), b, wb.to(dtype)[..., None])
    return merged if out is None else out.copy_(merged)
