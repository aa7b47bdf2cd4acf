"""Block-sparse attention as dense calls over gathered keys (one SegmentMask with large segments).

Query i sees key j iff allowed[b, h, q_segment[i], k_segment[j]]. For one item, a (batch row, head,
query segment), the keys form a union of whole key segments, so the item is a dense attention of
its queries over its gathered keys: exact, no partial blocks, the dense kernel's speed (cuDNN on
CUDA). Items with the same (query count, key count) run as one batched dense call with batch =
items and one head. Rows that see no key return 0, like the other block-sparse paths.

Layout: q, k and v are first copied segment-major and head-major, (B, H, N, D) with the tokens of
a segment side by side, so every (batch row, head, segment) is one contiguous run. The copies for
the dense calls then move whole runs: rows of g tokens, g the gcd of the segment sizes (a MoC
chunk of whole latent frames: g = 1,560 tokens, 390 KiB rows). On the H100, gathering 256-byte
(token, head) rows ran at ~840 GB/s (15.3 of MoC's 57.7 ms at 150k tokens); long rows move at
close to the memory's bandwidth. The outputs go back the same way (through the inverse token
permutation unless the segments are already runs in token order, SegmentMask.sorted_runs).

Cost against FlexAttention (the rule in blockmask.choose_block_sparse_path): per item the copies
move ~8 L D bytes (K and V written, then read by the kernel) for 4 s L D FLOPs, s query tokens and
L keys: 2 / s bytes per FLOP. At ~600 TFLOP/s and ~2.5 TB/s (H100) that is ~480 / s of the kernel
time, under half of it from s = 1024 tokens per query segment, while FlexAttention ran MoC at 0.2
to 0.6 of cuDNN's rate in the H100 run (106-316 TFLOP/s against dense at 527-636).

Plan: the layout copies are queued first; then one device->host copy of the small tables (allowed,
segment sizes), items grouped on the host, one host->device copy of the plan. Memory stays
bounded: a group's items run in slabs of at most SLAB_BYTES of gathered rows, each slab a power of
two of items, so that the shapes the kernel sees stay few across calls (cuDNN builds and caches an
execution plan per shape; routing that changes every step would otherwise rebuild plans every call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.attention.backends.aligned import split_key_attention, split_keys
from pipeline.attention.backends.rows import last_dim_words, put_rows, segment_counts, take_rows

if TYPE_CHECKING:
    from pipeline.attention.backends.blockmask import SegmentMask

SLAB_BYTES = 1 << 31  # gathered q, k, v and o rows per dense call (2 GiB)


def _slab_sizes(items: int, cap: int) -> list[int]:
    """items split into powers of two, each <= cap (itself a power of two), largest first."""
    sizes = []
    while items:
        take = min(cap, 1 << (items.bit_length() - 1))
        sizes.append(take)
        items -= take
    return sizes


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


@dataclass(frozen=True)
class Slab:
    """One batched dense call over `items` items of s query and L key tokens each (the next `items`
    items of the plan's table)."""

    items: int
    s: int
    L: int


def plan_items(allowed: torch.Tensor, q_counts: torch.Tensor, k_counts: torch.Tensor, row_bytes: int,
               slab_bytes: int = SLAB_BYTES) -> tuple[list[Slab], torch.Tensor]:
    """Host-side plan. allowed (B, H, Sq, Sk) bool, q_counts (Sq,), k_counts (Sk,) int64, all on the CPU;
    row_bytes: bytes of one (token, head) row of q. Returns the slabs and one int64 table of 3 G + 2 E
    values: the G items' batch rows, heads and query segments (G values each, slab by slab), then the
    E key segments of every item, item by item, then the item each of those entries belongs to.

    In numpy: the GPU waits for this plan (it follows a device->host copy), and numpy's calls on
    tables of a few thousand entries cost ~1 us where torch's CPU ops cost ~10 (7 ms -> <1 ms for
    MoC's 12 heads x 48 chunks)."""
    seen_all = allowed.numpy()
    qc, kc = q_counts.numpy(), k_counts.numpy()
    keys = seen_all.astype(np.int64) @ kc  # (B, H, Sq): key tokens per item
    queries = np.broadcast_to(qc, keys.shape)
    items = np.argwhere((queries > 0) & (keys > 0))  # (G, 3) row-major: batch row, head, query segment
    if len(items) == 0:
        return [], torch.zeros(0, dtype=torch.long)
    s_of, l_of = queries[tuple(items.T)], keys[tuple(items.T)]
    order = np.lexsort((l_of, s_of))  # by (s, L), stable: items of a shape keep their row-major order
    items, s_of, l_of = items[order], s_of[order], l_of[order]
    seen = seen_all[tuple(items.T)]  # (G, Sk)
    owner, segs = np.nonzero(seen)  # entries: (item, key segment), item by item
    bounds = np.flatnonzero((np.diff(s_of) != 0) | (np.diff(l_of) != 0)) + 1
    slabs = []
    for lo_item, hi_item in zip(np.r_[0, bounds], np.r_[bounds, len(items)]):
        s, length = int(s_of[lo_item]), int(l_of[lo_item])
        cap = max(1, slab_bytes // (row_bytes * 2 * (s + length)))
        cap = 1 << (cap.bit_length() - 1)
        slabs += [Slab(take, s, length) for take in _slab_sizes(int(hi_item - lo_item), cap)]
    table = np.concatenate([items.T.reshape(-1), segs, owner]).astype(np.int64)
    return slabs, torch.from_numpy(table)


def _segment_major(x: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """(B, N, H, D) -> (B, H, N, D) contiguous, tokens in `order` (None: as they are)."""
    w = last_dim_words(x)
    if order is not None:
        w = w.index_select(1, order)  # whole (token) rows: the fast gather
    return w.transpose(1, 2).contiguous().view(x.dtype)


def _token_major(o_sm: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """The inverse of _segment_major: (B, H, N, D) in segment order -> (B, N, H, D) in token order."""
    w = last_dim_words(o_sm).transpose(1, 2).contiguous()
    if order is not None:
        w = torch.empty_like(w).index_copy_(1, order, w)
    return w.view(o_sm.dtype)


def _run_rows(base: torch.Tensor, runs: torch.Tensor, total: int) -> torch.Tensor:
    """Row indices of consecutive runs: run r covers rows base[r] .. base[r] + runs[r] - 1; total = runs.sum()."""
    dev = base.device
    which = torch.repeat_interleave(torch.arange(runs.numel(), device=dev), runs, output_size=total)
    return base[which] + torch.arange(total, device=dev) - _exclusive_cumsum(runs)[which]


def gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: "SegmentMask",
                       scale: float | None = None, sdpa_order: Sequence[SDPBackend] = (SDPBackend.MATH,),
                       slab_bytes: int = SLAB_BYTES, key_tile: int | None = None) -> torch.Tensor:
    """Attention where query i sees key j iff mask allows it; (B, N, H, D) in and out (forward only).
    key_tile: None for the rule of aligned.py, 0 never splits, a size forces the split (tests)."""
    b, nq, h, d = q.shape
    nk = k.shape[1]
    sq, sk = mask.allowed.shape[2:]
    dev = q.device
    q_counts = segment_counts(mask.q_segment, sq)
    k_counts = segment_counts(mask.k_segment, sk)
    q_order, k_order = (None, None) if mask.sorted_runs else (  # segment-major positions -> tokens
        torch.argsort(mask.q_segment, stable=True), torch.argsort(mask.k_segment, stable=True))
    qs, ks, vs = _segment_major(q, q_order), _segment_major(k, k_order), _segment_major(v, k_order)  # queued first
    allowed = mask.allowed.expand(b, h, sq, sk)
    host = torch.cat([allowed.reshape(-1).long(), q_counts, k_counts]).cpu()  # one device->host copy
    allowed_h = host[:allowed.numel()].view(b, h, sq, sk).bool()
    q_counts_h, k_counts_h = host[allowed.numel():allowed.numel() + sq], host[allowed.numel() + sq:]
    slabs, table = plan_items(allowed_h, q_counts_h, k_counts_h, d * q.element_size(), slab_bytes)
    if not slabs:
        return torch.zeros_like(q)
    if q.is_cuda:  # from pinned memory: a pageable host->device copy would wait for the stream
        table = table.pin_memory()
    table = table.to(dev, non_blocking=True)  # one host->device copy
    g_items = sum(slab.items for slab in slabs)
    entries = (table.numel() - 3 * g_items) // 2
    batch, head, qseg = table[:g_items], table[g_items:2 * g_items], table[2 * g_items:3 * g_items]
    segs, owner = table[3 * g_items:3 * g_items + entries], table[3 * g_items + entries:]
    # rows of gq (gk) tokens: every segment's run is whole rows (gcd of the sizes; 0 sizes drop out)
    gq, gk = (math.gcd(*c.tolist()) for c in (q_counts_h, k_counts_h))
    q_rows, k_rows, v_rows = (x.view(-1, g * d) for x, g in ((qs, gq), (ks, gk), (vs, gk)))
    o_sm = torch.zeros_like(qs)  # rows that see no key stay 0
    o_rows = o_sm.view(-1, gq * d)
    # the rows of every slab at once (a handful of launches, not a handful per slab)
    plane = batch * h + head  # (G,): each item's (B, H) plane
    item_q = _run_rows(plane * (nq // gq) + (_exclusive_cumsum(q_counts) // gq)[qseg], q_counts[qseg] // gq,
                       sum(slab.items * slab.s for slab in slabs) // gq)
    lengths = k_counts[segs] // gk
    item_k = _run_rows(plane[owner] * (nk // gk) + (_exclusive_cumsum(k_counts) // gk)[segs], lengths,
                       sum(slab.items * slab.L for slab in slabs) // gk)
    q_at = np.cumsum([0] + [slab.items * slab.s // gq for slab in slabs])  # each slab's first row
    k_at = np.cumsum([0] + [slab.items * slab.L // gk for slab in slabs])
    # The biggest calls first: while the GPU runs them, the host queues the small ones, whose
    # launches (cuDNN's host side is ~0.1 ms a call) would otherwise leave the GPU waiting.
    for i in sorted(range(len(slabs)), key=lambda i: -slabs[i].items * slabs[i].s * slabs[i].L):
        take, s, length = slabs[i].items, slabs[i].s, slabs[i].L
        rows_q = item_q[q_at[i]:q_at[i + 1]]
        qg = take_rows(q_rows, rows_q).view(take, 1, s, d)
        kg, vg = (take_rows(x, item_k[k_at[i]:k_at[i + 1]]).view(take, 1, length, d) for x in (k_rows, v_rows))
        whole = split_keys(length, q, False, key_tile)
        if whole:  # not whole key tiles: two calls merged exactly, the big one at cuDNN's full rate
            o, _ = split_key_attention(qg, kg, vg, whole, scale)  # (take * s, 1, D) rows
        else:
            with sdpa_kernel(list(sdpa_order)):
                o = F.scaled_dot_product_attention(qg, kg, vg, scale=scale)  # (take, 1, s, D)
        put_rows(o_rows, rows_q, o.reshape(-1, gq * d))
    return _token_major(o_sm, q_order)
