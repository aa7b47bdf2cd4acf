"""Block-sparse attention from segment masks: exact per token, sparse per block.

A SegmentMask says which query segments may see which key segments: query i sees key j iff
allowed[b, h, q_segment[i], k_segment[j]]. Segments are arbitrary token sets (MoC chunks, Lite
tiles, STGA windows); a call takes one or more masks and ANDs them.

Kernels (choose_block_sparse_path):
- "gather" (CUDA, half precision, one mask, no autograd, >= GATHER_MIN_TOKENS query tokens per
  segment on average; MoC chunks, whole-frame STGA windows): every (batch row, head, query segment)
  is a dense call over its gathered keys (backends/gathered.py): exact, cuDNN's speed, the copies
  cost ~480 / s of the kernel time for s query tokens per segment (see there).
- "flex" (other CUDA cases): the masks become a FlexAttention BlockMask over 128 x 128 blocks. A
  block holding no allowed pair is never visited; a block whose every pair is allowed runs without
  the mask_mod; every other block (a chunk boundary inside it, a partial last block) runs with the
  token-level mask_mod, so the result is exact, never an approximation by blocks.
- "masked" (CPU; CUDA without flex): SDPA with the expanded boolean mask, a slab of query rows at a
  time. Correct and simple; CPU flex has no backward and compiles slowly.

Layout contract: q, k, v and the output are (B, N, H, D) like every attention primitive.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.attention.backends.gathered import gathered_attention
from pipeline.attention.backends.rows import segment_counts

FLEX_BLOCK = 128  # FlexAttention's sparse block (q and kv), its default and the H100 sweet spot
GATHER_MIN_TOKENS = 1024  # "gather" from this many query tokens per segment (mean) up
PATHS = ("auto", "gather", "flex", "masked")
_SLAB_ELEMENTS = 1 << 24  # CPU path: mask elements per slab of query rows (16 MiB of bool)


@dataclass(frozen=True)
class SegmentMask:
    """Query i may see key j iff allowed[b, h, q_segment[i], k_segment[j]].

    allowed may have size 1 in its batch or head dimension (the same mask for every row/head)."""

    q_segment: torch.Tensor  # (Nq,) int64 in [0, Sq)
    k_segment: torch.Tensor  # (Nk,) int64 in [0, Sk)
    allowed: torch.Tensor  # (B or 1, H or 1, Sq, Sk) bool
    # True when the caller knows both segment maps are non-decreasing (each segment one run of
    # tokens, in segment order: MoC chunks): the gather path then skips its token permutations.
    sorted_runs: bool = False

    def __post_init__(self) -> None:
        if self.allowed.dim() != 4 or self.allowed.dtype != torch.bool:
            raise ValueError(f"SegmentMask.allowed must be a 4-d bool tensor, got {tuple(self.allowed.shape)} "
                             f"{self.allowed.dtype}")
        if self.q_segment.dim() != 1 or self.k_segment.dim() != 1:
            raise ValueError("SegmentMask segments must be 1-d token -> segment maps")

    def token_mask(self, rows: slice = slice(None)) -> torch.Tensor:
        """(B or 1, H or 1, rows, Nk) bool: the mask of query rows `rows` against every key."""
        return self.allowed[:, :, self.q_segment[rows]][:, :, :, self.k_segment]


def _expanded_mask(masks: Sequence[SegmentMask], rows: slice) -> torch.Tensor:
    out = masks[0].token_mask(rows)
    for m in masks[1:]:
        out = out & m.token_mask(rows)
    return out


# ---------------------------------------------------------------------------------------------
# Counting what is computed
# ---------------------------------------------------------------------------------------------


def count_pairs(masks: Sequence[SegmentMask], batch: int, heads: int) -> float:
    """Allowed (query, key) pairs summed over batch rows and heads, exact (one or two masks).

    One mask: sum over segment pairs of allowed * |q segment| * |k segment|. Two masks: with the
    joint segment counts Cq[s1, s2] (tokens in segment s1 of mask 1 and s2 of mask 2), the count
    is sum(A1 * (Cq @ A2 @ Ck^T)) per (b, h)."""
    first = masks[0]
    dev = first.allowed.device
    if len(masks) == 1:
        cq = segment_counts(first.q_segment, first.allowed.shape[2]).double()
        ck = segment_counts(first.k_segment, first.allowed.shape[3]).double()
        per = (first.allowed.double() * cq[:, None] * ck[None, :]).sum((-1, -2))  # (B|1, H|1)
    elif len(masks) == 2:
        second = masks[1]
        s2q, s2k = second.allowed.shape[2], second.allowed.shape[3]
        joint_q = torch.zeros(first.allowed.shape[2] * s2q, dtype=torch.float64, device=dev)
        joint_q.index_add_(0, first.q_segment * s2q + second.q_segment,
                           torch.ones(first.q_segment.numel(), dtype=torch.float64, device=dev))
        joint_k = torch.zeros(first.allowed.shape[3] * s2k, dtype=torch.float64, device=dev)
        joint_k.index_add_(0, first.k_segment * s2k + second.k_segment,
                           torch.ones(first.k_segment.numel(), dtype=torch.float64, device=dev))
        cq, ck = joint_q.view(-1, s2q), joint_k.view(-1, s2k)  # (S1q, S2q), (S1k, S2k)
        cross = cq @ second.allowed.double() @ ck.T  # (B|1, H|1, S1q, S1k)
        per = (first.allowed.double() * cross).sum((-1, -2))
    else:
        raise ValueError(f"count_pairs takes one or two masks, got {len(masks)}")
    return float(per.expand(batch, heads).sum())


def block_lists(masks: Sequence[SegmentMask], nq: int, nk: int, block_q: int, block_k: int,
                batch: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(visit, full), each (B, H, ceil(nq/block_q), ceil(nk/block_k)) bool.

    full: every pair of the block is allowed by every mask (no mask_mod needed). visit: the block
    may hold an allowed pair: exact for one mask, and for several masks the AND of each mask's
    answer (a superset: extra blocks only cost time, the mask_mod keeps the result exact)."""
    dev = masks[0].allowed.device
    nqb, nkb = -(-nq // block_q), -(-nk // block_k)
    visit = torch.ones(batch, heads, nqb, nkb, dtype=torch.bool, device=dev)
    full = torch.ones_like(visit)
    for m in masks:
        # incidence[b, s] = 1 where block b holds a token of segment s
        inc_q = torch.zeros(nqb, m.allowed.shape[2], device=dev)
        inc_q[torch.arange(nq, device=dev) // block_q, m.q_segment] = 1.0
        inc_k = torch.zeros(nkb, m.allowed.shape[3], device=dev)
        inc_k[torch.arange(nk, device=dev) // block_k, m.k_segment] = 1.0
        allowed = m.allowed.float()
        visit &= (inc_q @ allowed @ inc_k.T) > 0  # some pair of the block allowed
        full &= (inc_q @ (1.0 - allowed) @ inc_k.T) == 0  # no pair of the block forbidden
    return visit, full


# ---------------------------------------------------------------------------------------------
# CUDA: FlexAttention
# ---------------------------------------------------------------------------------------------


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _mask_mod(masks: Sequence[SegmentMask]) -> Callable:
    """The token-level rule as a FlexAttention mask_mod (b, h, q_idx, kv_idx) -> bool."""
    tables = [(m.q_segment, m.k_segment, m.allowed, m.allowed.shape[0] > 1, m.allowed.shape[1] > 1)
              for m in masks]

    def mask_mod(b, h, q_idx, kv_idx):
        ok = None
        for q_seg, k_seg, allowed, per_batch, per_head in tables:
            hit = allowed[b if per_batch else 0, h if per_head else 0, q_seg[q_idx], k_seg[kv_idx]]
            ok = hit if ok is None else ok & hit
        return ok

    return mask_mod


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, indices) in BlockMask's format: per (b, h, q block) the listed kv blocks first."""
    count = blocks.sum(-1, dtype=torch.int32)  # (B, H, nQB)
    order = torch.sort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).indices
    return count, order.to(torch.int32)  # (B, H, nQB, nKB)


def flex_block_mask(masks: Sequence[SegmentMask], nq: int, nk: int, batch: int, heads: int,
                    block: int = FLEX_BLOCK, for_backward: bool = True):
    """A FlexAttention BlockMask for the AND of `masks`: partial blocks carry the mask_mod.
    for_backward=False skips the transposed (q-side) lists only the backward pass reads."""
    from torch.nn.attention.flex_attention import BlockMask

    visit, full = block_lists(masks, nq, nk, block, block, batch, heads)
    partial_count, partial_index = _ordered(visit & ~full)
    full_count, full_index = _ordered(full)
    return BlockMask.from_kv_blocks(partial_count, partial_index, full_count, full_index,
                                    BLOCK_SIZE=block, mask_mod=_mask_mod(masks), seq_lengths=(nq, nk),
                                    compute_q_blocks=for_backward)


@functools.cache
def _compiled_flex() -> Callable:
    """flex_attention compiled once per process (eager flex materialises the score matrix)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_block_sparse(q, k, v, masks: Sequence[SegmentMask], scale: float | None = None,
                      compiled: bool = True, block: int = FLEX_BLOCK) -> torch.Tensor:
    """FlexAttention over the masks' BlockMask; (B, N, H, D) in and out."""
    from torch.nn.attention.flex_attention import flex_attention

    b, nq, h, _ = q.shape
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    block_mask = flex_block_mask(masks, nq, k.shape[1], b, h, block, for_backward=grad)
    attend = _compiled_flex() if compiled else flex_attention
    o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale)
    return o.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Fallback: SDPA with the expanded mask
# ---------------------------------------------------------------------------------------------


def masked_sdpa(q, k, v, masks: Sequence[SegmentMask], scale: float | None = None,
                sdpa_order: Sequence[SDPBackend] = (SDPBackend.MATH,)) -> torch.Tensor:
    """Exact masked attention, query rows in slabs so the boolean mask stays small."""
    b, nq, h, _ = q.shape
    nk = k.shape[1]
    rows = max(1, _SLAB_ELEMENTS // (b * h * nk))
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # (B, H, Nk, D)
    out = torch.empty_like(q)
    with sdpa_kernel(list(sdpa_order)):
        for start in range(0, nq, rows):
            sl = slice(start, min(start + rows, nq))
            mask = _expanded_mask(masks, sl)  # (B|1, H|1, rows, Nk)
            o = F.scaled_dot_product_attention(q[:, sl].transpose(1, 2), kt, vt, attn_mask=mask, scale=scale)
            out[:, sl] = o.transpose(1, 2)
    return out


def choose_block_sparse_path(masks: Sequence[SegmentMask], nq: int, device: torch.device, dtype: torch.dtype,
                             needs_grad: bool) -> str:
    """The kernel path for these masks (the rule in the module docstring); decided by sizes only."""
    if device.type != "cuda":
        return "masked"
    half = dtype in (torch.float16, torch.bfloat16)
    if len(masks) == 1 and half and not needs_grad and nq >= GATHER_MIN_TOKENS * masks[0].allowed.shape[2]:
        return "gather"
    return "flex" if flex_available() else "masked"


def block_sparse_attention(q, k, v, masks: Sequence[SegmentMask], scale: float | None = None, path: str = "auto",
                           sdpa_order: Sequence[SDPBackend] = (SDPBackend.MATH,)) -> torch.Tensor:
    """Attention where query i sees key j iff every mask allows it; (B, N, H, D) in and out.

    Rows with no allowed key return 0 (no path produces NaN for them)."""
    if not masks:
        raise ValueError("block_sparse_attention needs at least one SegmentMask")
    if path == "auto":
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        path = choose_block_sparse_path(masks, q.shape[1], q.device, q.dtype, needs_grad)
    if path == "gather":
        if len(masks) != 1:
            raise ValueError(f"block_sparse: the gather path takes one mask, got {len(masks)}")
        return gathered_attention(q, k, v, masks[0], scale, sdpa_order)
    if path == "flex":
        return flex_block_sparse(q, k, v, masks, scale)
    if path == "masked":
        return masked_sdpa(q, k, v, masks, scale, sdpa_order)
    raise ValueError(f"block_sparse: unknown path {path!r} (known: {', '.join(PATHS)})")
