"""Spatiotemporal group attention (STGA): every video token attends to the tokens of its window.

Windows tile the layout's token grid (frames x height x width) in boxes of stga.window = (t, y, x)
tokens, starting at frame 0 / row 0 / column 0; where a size does not divide the grid, the last
window along that axis is smaller. With stga.cross_shots false (the default) the time axis is
tiled shot by shot (each shot's first frame starts a window), so a window never spans a shot cut;
with cross_shots true the whole video is tiled as one run of frames.

Text tokens (layout.text_tokens > 0, first in the sequence): text queries attend to the text keys
only; video queries attend to their window plus every text key (the caption conditions every
window; the text rows stay a text encoder and do not read video).

Execution:
- every window the same size and no text: the tokens are permuted into windows (a free view when
  a window spans whole frames, e.g. [1, 30, 52] at 480p) and ONE batched dense call runs on
  (B * windows, w, H, D) (cuDNN on H100, ~500 TFLOP/s);
- other windows, no text: the segments primitive over windows (varlen for many small windows);
- with text: the backend's block-sparse primitive with a SegmentMask of window ids (exact).

`window_ids(layout, window, cross_shots)` is the one definition of the windows; lite (base stga)
and moga+stga reuse it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from pipeline.attention.backends.blockmask import SegmentMask
from pipeline.attention.base import AttentionMeta, AttentionMethod
from pipeline.attention.moga import Permutation
from pipeline.layout import VideoLayout


@dataclass(frozen=True)
class StgaWindows:
    """The windows of one layout. With text, window 0 holds the text tokens."""

    token_window: torch.Tensor  # (N,) int64 on the device asked for: window of every token of the sequence
    sizes: tuple[int, ...]  # tokens per window
    count: int  # number of windows (the text window included)
    has_text: bool
    # The batched fast path's grid when every window has the same size and there is no text:
    # (windows along t, y, x) and (window size along t, y, x); None otherwise.
    grid: tuple[tuple[int, int, int], tuple[int, int, int]] | None
    # permutation() memo: (batch, device) -> Permutation; not part of the windows' identity
    _permutations: dict = field(default_factory=dict, compare=False, repr=False)

    def permutation(self, batch: int, device: torch.device | str) -> Permutation:
        """Tokens sorted by (batch row, window), for the path of unequal windows. The windows depend on
        the layout alone, so it is built once per batch size and device (every layer and step reuse it)
        with its counts from `sizes`: no sort per call and no host sync."""
        key = (batch, str(torch.device(device)))
        if key not in self._permutations:
            window = self.token_window.to(device)
            segment = (torch.arange(batch, device=device)[:, None] * self.count + window).flatten()
            self._permutations[key] = Permutation.by_segment(segment, batch * self.count, list(self.sizes) * batch)
        return self._permutations[key]

    def pairs(self, batch: int, heads: int, text_rule: bool = True) -> float:
        """(query, key) pairs inside windows; text_rule: plus video rows x text keys (STGA's rule)."""
        per = sum(s * s for s in self.sizes)
        if self.has_text and text_rule:
            per += self.sizes[0] * sum(self.sizes[1:])
        return float(per) * batch * heads


def _time_runs(layout: VideoLayout, wt: int, cross_shots: bool) -> list[int]:
    """Frames per window along time, in order."""
    runs = []
    for frames in ((layout.frames,) if cross_shots else layout.shot_frames):
        full, tail = divmod(frames, wt)
        runs += [wt] * full + ([tail] if tail else [])
    return runs


def window_ids(layout: VideoLayout, window, cross_shots: bool = False,
               device: torch.device | str = "cpu") -> StgaWindows:
    """The windows of `layout` (memoised per layout, window, cross_shots and device: every layer of
    a step asks for the same ones, and at 580k tokens building them costs milliseconds)."""
    return _window_ids(layout, tuple(int(s) for s in window), bool(cross_shots), str(torch.device(device)))


@functools.lru_cache(maxsize=32)
def _window_ids(layout: VideoLayout, window: tuple[int, int, int], cross_shots: bool, device: str) -> StgaWindows:
    wt, wy, wx = window
    runs = _time_runs(layout, wt, cross_shots)
    ny, nx = -(-layout.height // wy), -(-layout.width // wx)
    frame_run = torch.repeat_interleave(torch.arange(len(runs)), torch.tensor(runs))  # (frames,)
    t, y, x = layout.token_coords().unbind(1)
    video = (frame_run[t] * ny + y // wy) * nx + x // wx
    text = layout.text_tokens
    if text:
        token_window = torch.cat([torch.zeros(text, dtype=torch.long), video + 1])
    else:
        token_window = video
    equal = not text and set(runs) == {wt} and layout.height % wy == 0 and layout.width % wx == 0
    grid = ((len(runs), ny, nx), (wt, wy, wx)) if equal else None
    count = len(runs) * ny * nx + (1 if text else 0)
    sizes = tuple(torch.bincount(token_window, minlength=count).tolist())
    return StgaWindows(token_window.to(device), sizes, count, bool(text), grid)


def stga_mask(windows: StgaWindows, device: torch.device | str = "cpu") -> SegmentMask:
    """STGA's rule as a SegmentMask over window ids: own window, and the text window for video rows."""
    allowed = torch.eye(windows.count, dtype=torch.bool, device=device)
    if windows.has_text:
        allowed[:, 0] = True
    segment = windows.token_window.to(device)
    return SegmentMask(segment, segment, allowed[None, None])


# ---------------------------------------------------------------------------------------------
# Equal windows: the permutation into windows as a reshape
# ---------------------------------------------------------------------------------------------


def to_windows(x: torch.Tensor, grid) -> torch.Tensor:
    """(B, N, H, D) frame-major -> (B * windows * w, H, D), window-major (a view when a window
    spans whole frames)."""
    (nt, ny, nx), (wt, wy, wx) = grid
    b, _, h, d = x.shape
    x = x.view(b, nt, wt, ny, wy, nx, wx, h, d).permute(0, 1, 3, 5, 2, 4, 6, 7, 8)
    return x.reshape(-1, h, d)


def from_windows(x: torch.Tensor, grid, batch: int) -> torch.Tensor:
    """Inverse of to_windows: (B * windows * w, H, D) -> (B, N, H, D)."""
    (nt, ny, nx), (wt, wy, wx) = grid
    h, d = x.shape[-2:]
    x = x.view(batch, nt, ny, nx, wt, wy, wx, h, d).permute(0, 1, 4, 2, 5, 3, 6, 7, 8)
    return x.reshape(batch, -1, h, d)


def lse_from_windows(lse: torch.Tensor, grid, batch: int) -> torch.Tensor:
    """(H, B * windows * w) window-major -> (B, N, H) in sequence order."""
    (nt, ny, nx), (wt, wy, wx) = grid
    h = lse.shape[0]
    lse = lse.view(h, batch, nt, ny, nx, wt, wy, wx).permute(1, 2, 5, 3, 6, 4, 7, 0)
    return lse.reshape(batch, -1, h)


def window_attention(backend, q, k, v, windows: StgaWindows, return_lse: bool = False):
    """Attention inside each window (no text rule: text, if any, is window 0 like any other).
    q, k, v (B, N, H, D) -> o (B, N, H, D) [, lse (B, N, H) fp32], sequence order."""
    b, n, h, _ = q.shape
    if windows.grid is not None:
        size = n // (windows.count or 1)
        counts = [size] * (b * windows.count)
        cu = torch.arange(0, b * n + 1, size, dtype=torch.int32, device=q.device)
        out = backend.segments(*(to_windows(x, windows.grid) for x in (q, k, v)), cu, return_lse, counts)
        o, lse = out if return_lse else (out, None)
        o = from_windows(o, windows.grid, b)
        return (o, lse_from_windows(lse, windows.grid, b)) if return_lse else o
    perm = windows.permutation(b, q.device)
    out = backend.segments(perm.gather(q), perm.gather(k), perm.gather(v), perm.cu_seqlens, return_lse, perm.counts)
    o, lse = out if return_lse else (out, None)
    o = perm.scatter(o, q.shape)
    if not return_lse:
        return o
    return o, lse.index_select(1, perm.inverse).T.reshape(b, n, h)


class StgaAttention(AttentionMethod):
    name = "stga"

    def windows(self, layout: VideoLayout, device: torch.device | str = "cpu") -> StgaWindows:
        return window_ids(layout, self.cfg.stga.window, self.cfg.stga.cross_shots, device)

    def mask(self, layout: VideoLayout, device: torch.device | str = "cpu") -> SegmentMask:
        """The token mask this method computes, as a SegmentMask (lite's base when lite.base = stga)."""
        return stga_mask(self.windows(layout), device)

    def forward(self, q, k, v, meta: AttentionMeta):
        b, n, h, _ = q.shape
        windows = self.windows(meta.layout, q.device)
        if windows.token_window.numel() != n:
            raise ValueError(f"stga: q holds {n} tokens but the layout has {windows.token_window.numel()}")
        pairs = windows.pairs(b, h)
        meta.stats.update(pairs=pairs, density=pairs / (b * h * n * n), windows=float(windows.count))
        if windows.has_text:
            return self.backend.block_sparse(q, k, v, (stga_mask(windows, q.device),))
        return window_attention(self.backend, q, k, v, windows)  # (B, N, H, D)
