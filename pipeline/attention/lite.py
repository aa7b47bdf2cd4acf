"""LiteAttention-style skip reuse across denoising steps (training-free).

Per layer, the first lite.full_steps steps of a video (or block) compute the base attention
(lite.base: dense, or the STGA window mask) exactly and record, per (batch row, head, q tile,
k tile) with tiles of lite.tile = (tq, tk) tokens, the tile's margin:

    margin[b, h, t, u] = max over query rows i of tile t of
                         (max_{j in tile u} s_ij - max_{j} s_ij) * log2(e)

where s_ij = q_i . k_j / sqrt(D) is the scaled logit and both maxima run over the keys the base
mask allows (a tile with no allowed key has margin -inf). margin <= 0; it is 0 for a tile that
holds some row's largest logit, and margin < threshold means every row's probabilities in that
tile are below 2^threshold of that row's largest one (the same log2-unit test as LiteAttention's
kernel, taken against the row's final rather than running max, so it does not depend on the
order tiles are visited).

A tile whose margin falls below lite.threshold at any full step is skipped for every later step
(monotone: a skipped tile never comes back until the next step 0 starts a new record). Always
kept: tiles holding a diagonal pair (i, i), so no row is empty, and tiles touching text tokens
(LiteAttention's must-do list for the prompt). From step full_steps on, the base mask AND the
kept tiles run block-sparse through the backend.

State: a LiteState in meta.state.value (a StateSlot the sampler owns and resets per video); one
skip mask per batch row, so CFG's cond and uncond rows, batched in one call, stay separate.
Cost: the attention kernels cannot report tile maxima (FlexAttention's aux output is the row max
only; LiteAttention's patched FA3 gets them for free), so the full steps compute the margins apart.
On CUDA with full attention that is one Triton kernel (backends/tile_max.py: two Q K^T passes with
the logits kept on chip, about one dense attention's FLOPs). Elsewhere (CPU, a base mask, odd
tiles) the logits are formed a second time in slabs of query rows and reduced per (row, key tile):
memory-bound, 4 bytes of logit traffic per (query, key) pair and head, about 1 TB at 150k tokens;
on the H100 that full step took 6.5x (150k) to 5.5x (580k) a dense step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.attention.backends.blockmask import SegmentMask, count_pairs
from pipeline.attention.backends.tile_max import fused_tile_margins, fused_tile_margins_available
from pipeline.attention.base import AttentionMeta, AttentionMethod
from pipeline.attention.stga import stga_mask, window_ids
from pipeline.layout import VideoLayout

LOG2E = 1.0 / math.log(2.0)
_SLAB_ELEMENTS = 1 << 28  # logits per slab of query rows when recording margins (512 MiB in bf16)


@dataclass(frozen=True)
class LiteState:
    """The skip record of one layer for the current video (or block)."""

    skip: torch.Tensor  # (B, H, nQT, nKT) bool: True = tile skipped from now on
    tile: tuple[int, int]  # (tq, tk)
    num_tokens: int
    recorded_steps: int

    @property
    def kept_fraction(self) -> float:
        return 1.0 - self.skip.float().mean().item()


def tile_ids(n: int, tile: tuple[int, int], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(q tile, k tile) of every token: (N,) int64 each."""
    idx = torch.arange(n, device=device)
    return idx // tile[0], idx // tile[1]


def tile_margins(q: torch.Tensor, k: torch.Tensor, tile: tuple[int, int], scale: float,
                 base: SegmentMask | None = None) -> torch.Tensor:
    """margin (B, H, nQT, nKT) fp32 in log2 units (see the module docstring); q, k (B, N, H, D).

    The logits are formed in q's dtype (bf16 on GPU: the decision, not the attention, carries that
    rounding) one slab of query tiles at a time, reduced to per-(row, k tile) maxima at once; the
    scale is applied after the max (it is positive)."""
    if base is None and fused_tile_margins_available(q, tile):  # CUDA: the logits never reach memory
        return fused_tile_margins(q, k, tile, scale)
    b, n, h, _ = q.shape
    tq, tk = tile
    nqt, nkt = -(-n // tq), -(-n // tk)
    whole = (n // tk) * tk  # keys in whole k tiles; the rest form one partial tile
    # (B, H, D, N) laid out once: as a strided view of k, matmul would copy it for every slab when B > 1
    kt = k.permute(0, 2, 3, 1).contiguous()
    out = torch.empty(b, h, nqt, nkt, device=q.device)
    rows = max(1, _SLAB_ELEMENTS // (b * h * n * tq)) * tq  # whole q tiles per slab
    for start in range(0, n, rows):
        end = min(start + rows, n)
        s = q[:, start:end].transpose(1, 2) @ kt  # (B, H, r, N) raw logits
        if base is not None:
            s = s.masked_fill(~base.token_mask(slice(start, end)), float("-inf"))
        tile_max = [s[..., :whole].unflatten(-1, (n // tk, tk)).amax(-1)] if whole else []
        if whole < n:
            tile_max.append(s[..., whole:].amax(-1, keepdim=True))
        tile_max = torch.cat(tile_max, -1).float() * scale  # (B, H, r, nKT)
        row_max = tile_max.amax(-1, keepdim=True)  # (B, H, r, 1)
        diff = ((tile_max - row_max) * LOG2E).masked_fill(torch.isneginf(tile_max), float("-inf"))
        pad_q = -(end - start) % tq  # a partial last q tile: padded rows never win the max
        diff = torch.nn.functional.pad(diff, (0, 0, 0, pad_q), value=float("-inf"))
        out[:, :, start // tq:start // tq + diff.shape[2] // tq] = diff.view(b, h, -1, tq, nkt).amax(3)
    return out


def kept_always(layout: VideoLayout, tile: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """(nQT, nKT) bool: tiles never skipped: those holding a pair (i, i) and those touching text."""
    n = layout.num_tokens
    qt, kt = tile_ids(n, tile, device)
    keep = torch.zeros(-(-n // tile[0]), -(-n // tile[1]), dtype=torch.bool, device=device)
    keep[qt, kt] = True  # the diagonal
    if layout.text_tokens:
        keep[: -(-layout.text_tokens // tile[0]), :] = True
        keep[:, : -(-layout.text_tokens // tile[1])] = True
    return keep


class LiteAttention(AttentionMethod):
    name = "lite"
    has_state = True

    def base_mask(self, layout: VideoLayout, device: torch.device) -> SegmentMask | None:
        """The mask the skips refine: None for dense; for stga, STGA's window mask (stga.window,
        stga.cross_shots) as a SegmentMask of window ids."""
        if self.cfg.lite.base == "stga":
            return stga_mask(window_ids(layout, self.cfg.stga.window, self.cfg.stga.cross_shots, device), device)
        return None

    def _base_attention(self, q, k, v, base: SegmentMask | None):
        return self.backend.dense(q, k, v) if base is None else self.backend.block_sparse(q, k, v, (base,))

    def forward(self, q, k, v, meta: AttentionMeta):
        cfg = self.cfg.lite
        if meta.state is None:
            raise ValueError("lite: meta.state is None; the sampler must give every lite layer a StateSlot")
        b, n, h, d = q.shape
        if n != meta.layout.num_tokens:
            raise ValueError(f"lite: q holds {n} tokens but the layout has {meta.layout.num_tokens}")
        tile = (int(cfg.tile[0]), int(cfg.tile[1]))
        base = self.base_mask(meta.layout, q.device)
        state = meta.state.value
        if state is not None and (tuple(state.skip.shape[:2]) != (b, h) or state.num_tokens != n
                                  or state.tile != tile):
            if meta.step > 0:
                raise ValueError(f"lite: the skip record is for {tuple(state.skip.shape[:2])} rows x heads, "
                                 f"{state.num_tokens} tokens, tiles {state.tile}; this call has {(b, h)}, {n}, "
                                 f"{tile} (reset the state slot per video)")
            state = None

        if meta.step < cfg.full_steps:
            o = self._base_attention(q, k, v, base)
            negligible = tile_margins(q, k, tile, 1.0 / math.sqrt(d), base) < cfg.threshold
            negligible &= ~kept_always(meta.layout, tile, q.device)
            if state is None or meta.step == 0:  # step 0 starts the record of a new video or block
                state = LiteState(negligible, tile, n, 1)
            else:
                state = LiteState(state.skip | negligible, tile, n, state.recorded_steps + 1)
            meta.state.value = state
            masks = () if base is None else (base,)
        elif state is None:
            if cfg.full_steps > 0:
                raise ValueError(f"lite: step {meta.step} >= full_steps={cfg.full_steps} but this layer has no "
                                 f"skip record (was its state slot carried from step 0?)")
            o, masks = self._base_attention(q, k, v, base), (() if base is None else (base,))
        else:
            q_tile, k_tile = tile_ids(n, tile, q.device)
            tiles = SegmentMask(q_tile, k_tile, ~state.skip)
            masks = (tiles,) if base is None else (base, tiles)
            o = self.backend.block_sparse(q, k, v, masks)
        pairs = count_pairs(masks, b, h) if masks else float(b * h * n * n)
        meta.stats.update(pairs=pairs, density=pairs / (b * h * n * n))
        return o  # (B, N, H, D)
