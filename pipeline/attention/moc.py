"""Mixture of Contexts (MoC): parameter-free, per-head top-k routing of query chunks to key chunks.

Chunks come from the layout: one text chunk when layout.text_tokens > 0 (text is first in the
sequence), then every shot cut into runs of moc.chunk_frames latent frames (a chunk never spans a
shot cut; a shot's last chunk may be shorter). Per head h:

    k̄_c = mean of the keys of chunk c,   q̄_c = mean of the queries of chunk c
    score[c, c'] = q̄_c · k̄_c'
    anchors(c)   = {c} ∪ {text chunk, if moc.text_anchor}
                   ∪ {c' of the same shot whose frames lie within moc.local_frames of c's frames}
    routable(c)  = {c' : start(c') <= start(c)} if moc.causal else every chunk
    allowed(c)   = anchors(c) ∪ top-k by score of (routable(c) \\ anchors(c))   (k = moc.top_k)

Anchors are mandatory links and are not subject to the causal rule (the local window looks both
ways inside a shot); causality restricts what routing may pick, so the routed graph across
distant chunks stays a DAG. Every query of chunk c attends to every key of allowed(c).

Text queries are not routed: they attend to every token (captions summarise the whole video and
are a small fraction of the rows).

Executed block-sparse through the backend: on CUDA in half precision with chunks of >= 1024 tokens,
one batched dense (cuDNN) call per set of (batch row, head, query chunk) items with equal query and
key counts, over gathered keys (exact, no partial blocks); otherwise FlexAttention with 128-token
blocks (the chunk mask is exact per token, partial blocks go through the mask_mod). The rule is in
backends/blockmask.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from pipeline.attention.backends.blockmask import SegmentMask, count_pairs
from pipeline.attention.base import AttentionMeta, AttentionMethod
from pipeline.layout import VideoLayout


@dataclass(frozen=True)
class MocChunks:
    """The chunks of one layout, in sequence order (CPU tensors)."""

    token_chunk: torch.Tensor  # (N,) int64: chunk of every token of the sequence
    start: torch.Tensor  # (C,) first token of each chunk
    size: torch.Tensor  # (C,) tokens per chunk
    shot: torch.Tensor  # (C,) shot index, -1 for the text chunk
    first_frame: torch.Tensor  # (C,) first latent frame (relative), -1 for text
    last_frame: torch.Tensor  # (C,) last latent frame (inclusive), -1 for text
    has_text: bool
    # Runs of equal-size consecutive chunks (start token, chunks, tokens per chunk): chunk means
    # are one strided reduction per run instead of one per chunk.
    runs: tuple[tuple[int, int, int], ...]

    @property
    def count(self) -> int:
        return int(self.size.numel())


@functools.lru_cache(maxsize=32)
def moc_chunks(layout: VideoLayout, chunk_frames: int) -> MocChunks:
    """The chunks of `layout` (memoised: every layer of a step asks for the same ones)."""
    starts, sizes, shots, firsts, lasts, runs = [], [], [], [], [], []
    tpf = layout.tokens_per_frame
    if layout.text_tokens > 0:
        starts.append(0), sizes.append(layout.text_tokens), shots.append(-1), firsts.append(-1), lasts.append(-1)
        runs.append((0, 1, layout.text_tokens))
    frame = 0
    for shot, frames in enumerate(layout.shot_frames):
        full, tail = divmod(frames, chunk_frames)
        for i in range(full + (tail > 0)):
            f0 = frame + i * chunk_frames
            f1 = min(f0 + chunk_frames, frame + frames)
            starts.append(layout.text_tokens + f0 * tpf), sizes.append((f1 - f0) * tpf)
            shots.append(shot), firsts.append(f0), lasts.append(f1 - 1)
        shot_start = layout.text_tokens + frame * tpf
        if full:
            runs.append((shot_start, full, chunk_frames * tpf))
        if tail:
            runs.append((shot_start + full * chunk_frames * tpf, 1, tail * tpf))
        frame += frames
    size = torch.tensor(sizes)
    return MocChunks(token_chunk=torch.repeat_interleave(torch.arange(len(sizes)), size), start=torch.tensor(starts),
                     size=size, shot=torch.tensor(shots), first_frame=torch.tensor(firsts),
                     last_frame=torch.tensor(lasts), has_text=layout.text_tokens > 0, runs=tuple(runs))


def chunk_means(x: torch.Tensor, chunks: MocChunks) -> torch.Tensor:
    """x (B, N, H, D) -> (B, H, C, D) fp32 mean over each chunk's tokens (fp32 accumulation)."""
    b, _, h, d = x.shape
    sums = [x[:, s:s + n * size].reshape(b, n, size, h, d).sum(2, dtype=torch.float32) / size
            for s, n, size in chunks.runs]  # each (B, n, H, D)
    return torch.cat(sums, 1).transpose(1, 2)


@functools.lru_cache(maxsize=32)
def _token_chunk_on(layout: VideoLayout, chunk_frames: int, device: str) -> torch.Tensor:
    """moc_chunks(...).token_chunk on `device`, memoised (one host->device copy per layout)."""
    return moc_chunks(layout, chunk_frames).token_chunk.to(device)


def anchor_mask(chunks: MocChunks, local_frames: int, text_anchor: bool) -> torch.Tensor:
    """(C, C) bool: the mandatory links of each query chunk (row) to key chunks (columns)."""
    own = torch.eye(chunks.count, dtype=torch.bool)
    video = chunks.shot >= 0
    same_shot = (chunks.shot[:, None] == chunks.shot[None, :]) & video[:, None] & video[None, :]
    # frame distance between two chunks' frame ranges (0 when they overlap or touch the same frame)
    gap = torch.maximum(chunks.first_frame[None, :] - chunks.last_frame[:, None],
                        chunks.first_frame[:, None] - chunks.last_frame[None, :]).clamp_min(0)
    anchors = own | (same_shot & (gap <= local_frames))
    if text_anchor and chunks.has_text:
        anchors[:, 0] = True
    return anchors


def routable_mask(chunks: MocChunks, causal: bool) -> torch.Tensor:
    """(C, C) bool: key chunks routing may pick for each query chunk (no future chunks if causal)."""
    if not causal:
        return torch.ones(chunks.count, chunks.count, dtype=torch.bool)
    return chunks.start[None, :] <= chunks.start[:, None]


@functools.lru_cache(maxsize=32)
def _link_masks_on(layout: VideoLayout, chunk_frames: int, local_frames: int, text_anchor: bool, causal: bool,
                   device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchors, routable and not an anchor), both (C, C) on `device`, memoised: they depend on the
    layout only, and a host->device copy from pageable memory would wait for the stream every call."""
    chunks = moc_chunks(layout, chunk_frames)
    anchors = anchor_mask(chunks, local_frames, text_anchor)
    return anchors.to(device), (routable_mask(chunks, causal) & ~anchors).to(device)


class MocAttention(AttentionMethod):
    name = "moc"

    def route(self, q: torch.Tensor, k: torch.Tensor, layout: VideoLayout) -> SegmentMask:
        """The chunk mask of this call: allowed (B, H, C, C) over the layout's chunks."""
        cfg = self.cfg.moc
        chunks = moc_chunks(layout, int(cfg.chunk_frames))
        if chunks.token_chunk.numel() != q.shape[1]:
            raise ValueError(f"moc: q holds {q.shape[1]} tokens but the layout has {chunks.token_chunk.numel()}")
        dev = q.device
        anchors, candidates = _link_masks_on(layout, int(cfg.chunk_frames), int(cfg.local_frames),
                                             bool(cfg.text_anchor), bool(cfg.causal), str(dev))
        scores = chunk_means(q, chunks) @ chunk_means(k, chunks).transpose(-1, -2)  # (B, H, C, C)
        allowed = anchors.expand_as(scores).clone()
        top = min(cfg.top_k, chunks.count)
        if top > 0:
            picked = scores.masked_fill(~candidates, float("-inf")).topk(top, dim=-1).indices  # (B, H, C, top)
            chosen = torch.zeros_like(allowed).scatter_(-1, picked, True)
            allowed |= chosen & candidates  # drop -inf picks when fewer than top_k candidates
        if chunks.has_text:
            allowed[:, :, 0, :] = True  # text queries see every token
        segment = _token_chunk_on(layout, int(cfg.chunk_frames), str(dev))
        return SegmentMask(segment, segment, allowed, sorted_runs=True)  # chunks are runs in order

    def forward(self, q, k, v, meta: AttentionMeta):
        b, n, h, _ = q.shape
        mask = self.route(q, k, meta.layout)
        o = self.backend.block_sparse(q, k, v, (mask,))  # (B, N, H, D)
        pairs = count_pairs((mask,), b, h)  # reads a number back: after the attention is queued, not before
        meta.stats.update(pairs=pairs, density=pairs / (b * h * n * n), chunks=float(mask.allowed.shape[-1]))
        return o
