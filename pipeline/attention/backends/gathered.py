"""Block-sparse attention as dense calls over gathered keys (one SegmentMask with large segments).

Query i sees key j iff allowed[b, h, q_segment[i], k_segment[j]]. For one item, a (batch row, head,
query segment), the keys form a union of whole key segments, so the item is a dense attention of
its queries over its gathered keys: exact, no partial blocks, the dense kernel's speed (cuDNN on
CUDA). Items with the same (query count, key count) run as one batched dense call with batch =
items and one head, on Q/K/V rows gathered as 8-byte words (backends/rows.py); the outputs go back
by a row scatter. Rows that see no key return 0, like the other block-sparse paths.

Cost against FlexAttention (the rule in blockmask.choose_block_sparse_path): per item the copies
move ~8 L D bytes (K and V written, then read by the kernel) for 4 s L D FLOPs, s query tokens and
L keys: 2 / s bytes per FLOP. At ~600 TFLOP/s and ~2.5 TB/s (H100) that is ~480 / s of the kernel
time, under half of it from s = 1024 tokens per query segment, while FlexAttention ran MoC at 0.2
to 0.6 of cuDNN's rate in the H100 run (106-316 TFLOP/s against dense at 527-636).

Plan: one device->host copy of the small tables (allowed, segment sizes), items grouped on the host,
one host->device copy of the plan. Memory stays bounded: a group's items run in slabs of at most
SLAB_BYTES of gathered rows, each slab a power of two of items, so that the shapes the kernel sees
stay few across calls (cuDNN builds and caches an execution plan per shape; routing that changes
every step would otherwise rebuild plans every call).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.attention.backends.rows import put_rows, segment_counts, take_rows

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


def plan_items(allowed: torch.Tensor, q_counts: torch.Tensor, k_counts: torch.Tensor, row_bytes: int,
               slab_bytes: int = SLAB_BYTES) -> tuple[list[tuple[int, int, int, int, int]], torch.Tensor]:
    """Host-side plan. allowed (B, H, Sq, Sk) bool, q_counts (Sq,), k_counts (Sk,) int64, all on the CPU;
    row_bytes: bytes of one (token, head) row of q. Returns the slabs, each (items, s, L, offset,
    entries), and one int64 table that holds, per slab at its offset: the items' batch rows, heads and
    query segments (`items` values each), then the `entries` key segments of its items, item by item.
    Every item of a slab has s query tokens and L key tokens."""
    b, h, sq, _ = allowed.shape
    keys = allowed.long() @ k_counts  # (B, H, Sq): key tokens per item
    queries = q_counts.expand(b, h, sq)
    items = ((queries > 0) & (keys > 0)).nonzero()  # (G, 3): batch row, head, query segment
    if items.numel() == 0:
        return [], torch.zeros(0, dtype=torch.long)
    s_of, l_of = queries[tuple(items.T)], keys[tuple(items.T)]
    shapes, group = torch.unique(torch.stack([s_of, l_of], 1), dim=0, return_inverse=True)
    slabs, parts, offset = [], [], 0
    for g, (s, length) in enumerate(shapes.tolist()):
        members = items[group == g]  # (Gg, 3)
        seen = allowed[tuple(members.T)]  # (Gg, Sk)
        segs = seen.nonzero()[:, 1]  # key segments, item by item (nonzero is row-major)
        per_item = seen.sum(1)
        first = _exclusive_cumsum(per_item)
        cap = max(1, slab_bytes // (row_bytes * 2 * (s + length)))
        cap = 1 << (cap.bit_length() - 1)
        start = 0
        for take in _slab_sizes(members.shape[0], cap):
            chunk = members[start:start + take]
            lo = int(first[start])
            hi = int(first[start + take - 1] + per_item[start + take - 1])
            parts += [chunk[:, 0], chunk[:, 1], chunk[:, 2], segs[lo:hi]]
            slabs.append((take, s, length, offset, hi - lo))
            offset += 3 * take + (hi - lo)
            start += take
    return slabs, torch.cat(parts)


def gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: "SegmentMask",
                       scale: float | None = None, sdpa_order: Sequence[SDPBackend] = (SDPBackend.MATH,),
                       slab_bytes: int = SLAB_BYTES) -> torch.Tensor:
    """Attention where query i sees key j iff mask allows it; (B, N, H, D) in and out (forward only)."""
    b, nq, h, d = q.shape
    nk = k.shape[1]
    sq, sk = mask.allowed.shape[2:]
    dev = q.device
    q_counts = segment_counts(mask.q_segment, sq)
    k_counts = segment_counts(mask.k_segment, sk)
    allowed = mask.allowed.expand(b, h, sq, sk)
    host = torch.cat([allowed.reshape(-1).long(), q_counts, k_counts]).cpu()  # one device->host copy
    allowed_h = host[:allowed.numel()].view(b, h, sq, sk).bool()
    q_counts_h, k_counts_h = host[allowed.numel():allowed.numel() + sq], host[allowed.numel() + sq:]
    slabs, table = plan_items(allowed_h, q_counts_h, k_counts_h, d * q.element_size(), slab_bytes)
    out = torch.zeros_like(q)
    if not slabs:
        return out
    table = table.to(dev)  # one host->device copy
    q_order = torch.argsort(mask.q_segment, stable=True)  # segment-major positions -> tokens
    k_order = torch.argsort(mask.k_segment, stable=True)
    q_start, k_start = _exclusive_cumsum(q_counts), _exclusive_cumsum(k_counts)
    rows = [x.reshape(-1, d) for x in (q, k, v)]  # (B * N * H, D): row (b * N + token) * H + head
    out_rows = out.view(-1, d)
    for take, s, length, at, entries in slabs:
        batch, head, qseg = table[at:at + take], table[at + take:at + 2 * take], table[at + 2 * take:at + 3 * take]
        segs = table[at + 3 * take:at + 3 * take + entries]  # key segments, item by item
        q_tok = q_order[q_start[qseg][:, None] + torch.arange(s, device=dev)]  # (take, s)
        q_rows = ((batch[:, None] * nq + q_tok) * h + head[:, None]).reshape(-1)
        lengths = k_counts[segs]
        total = take * length
        entry = torch.repeat_interleave(torch.arange(segs.numel(), device=dev), lengths, output_size=total)
        k_pos = k_start[segs][entry] + torch.arange(total, device=dev) - _exclusive_cumsum(lengths)[entry]
        item = torch.arange(total, device=dev) // length
        k_rows = (batch[item] * nk + k_order[k_pos]) * h + head[item]
        qg = take_rows(rows[0], q_rows).view(take, s, 1, d).transpose(1, 2)  # (take, 1, s, D), BSHD strides
        kg, vg = (take_rows(x, k_rows).view(take, length, 1, d).transpose(1, 2) for x in rows[1:])
        with sdpa_kernel(list(sdpa_order)):
            o = F.scaled_dot_product_attention(qg, kg, vg, scale=scale)  # (take, 1, s, D)
        put_rows(out_rows, q_rows, o.transpose(1, 2).reshape(take * s, d))
    return out
