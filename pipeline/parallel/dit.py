"""Context parallelism applied to a DiTAdapter from outside, in one place (torchtitan's parallelize).

    model = parallelize(adapter, ctx)
    pred = model(latents, timestep, text, layout, meta, states, text_mask)   # every rank, same inputs

In order:
1. Every layer's self-attention callable is wrapped: Ulysses all-to-all for softmax methods
   (heads % P == 0 checked here), the state strategy for linear attention (no K/V exchange), and,
   with ring=True, ring attention for dense layers when P does not divide the heads.
2. SANA-Video only: each block's temporal conv gets a one-frame halo exchange (halo.py), because
   its sequence is cut on whole latent frames (the Mix-FFN's depthwise conv works per frame).
   Wan is cut on tokens.
3. Per forward: prepare() runs on the whole sequence on every rank (patchify and embeddings are a
   small part of the cost), its Tokens are cut into contiguous shards (hidden, RoPE, shot ids; pad
   at the end), the blocks run on the shard, the hidden states are all-gathered, the pad dropped,
   and finish() runs on the whole sequence, so every rank holds the same prediction.
The adapter's transformer is modified in place (its temporal convs); use the returned object.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from pipeline.attention import AttentionMeta, StateSlot
from pipeline.attention.base import shards_heads
from pipeline.layout import VideoLayout
from pipeline.models.adapter import DiTAdapter, Tokens
from pipeline.parallel.groups import ParallelContext
from pipeline.parallel.halo import HaloTemporalConv
from pipeline.parallel.ring import RingAttention
from pipeline.parallel.shard import ShardPlan, gather, plan_for, shard
from pipeline.parallel.state import StateParallelAttention
from pipeline.parallel.ulysses import UlyssesAttention, check_heads

_WRAPPERS = (UlyssesAttention, StateParallelAttention, RingAttention)
# Head sub-groups per rank whose exchanges overlap attention. 1 by default: on 2 H200s over NVLink the
# overlap lost (126k tokens: dense 3.074 s one exchange vs 3.168 s two sub-groups, moga+stga 1.343 vs
# 1.448 s; NCCL's kernels slow the attention they run beside more than the hidden exchange saves).
# Links slower than NVLink may gain from 2 (parallelize(..., chunks=2)).
DEFAULT_CHUNKS = 1
# q, k, v in three exchanges (UlyssesAttention's `staged`): None lets each wrapper pick by its method.
DEFAULT_STAGED: bool | None = None
# Per-token fields of Tokens and their sequence dim (the adapter declares them as Tokens.SEQUENCE_DIMS).
SEQUENCE_DIMS: dict[str, int] = getattr(Tokens, "SEQUENCE_DIMS", {"hidden": 1, "rope": 1, "shot": 0})


def parallel_attention(fn, ctx: ParallelContext, by_frames: bool, heads: int, ring: bool = False,
                       chunks: int = 1, staged: bool | None = None):
    """`fn` (a registry method) wrapped for context parallelism: the state strategy for linear attention,
    Ulysses when the heads divide over the ranks (`chunks`, `staged`: see UlyssesAttention), else ring
    attention for dense layers if `ring`."""
    if ctx.world == 1 or isinstance(fn, _WRAPPERS):
        return fn
    if fn.cp_strategy == "state":
        return StateParallelAttention(fn, ctx, by_frames)
    if heads % ctx.world and not shards_heads(fn, ring):
        return RingAttention(fn, ctx)
    check_heads(heads, ctx.world)
    return UlyssesAttention(fn, ctx, chunks, staged)


class ParallelDiT:
    """A DiTAdapter whose blocks run on this rank's shard of the sequence (see the module docstring)."""

    def __init__(self, adapter: DiTAdapter, ctx: ParallelContext, ring: bool = False, chunks: int | None = None,
                 staged: bool | None = None):
        self.adapter, self.ctx = adapter, ctx
        chunks = chunks or DEFAULT_CHUNKS
        staged = DEFAULT_STAGED if staged is None else staged
        self.by_frames = adapter.family == "sana"
        self.plan: ShardPlan | None = None  # the cut of the forward in progress (read by the halo convs)
        if ctx.world == 1:
            return
        wrapped = [parallel_attention(fn, ctx, self.by_frames, adapter.heads, ring, chunks, staged)
                   for fn in adapter.attention]
        for layer, fn in enumerate(wrapped):
            adapter.set_attention(layer, fn)
        if getattr(adapter, "fit_router", None) is not None and not hasattr(adapter.fit_router, "whole_sequence"):
            adapter.fit_router = self._fit_router_on_whole_sequence(adapter.fit_router)
        if self.by_frames:
            for block in adapter.blocks:
                if not isinstance(block.ff.conv_temp, HaloTemporalConv):
                    block.ff.conv_temp = HaloTemporalConv(block.ff.conv_temp, ctx, self.current_plan)

    def current_plan(self) -> ShardPlan:
        if self.plan is None:
            raise RuntimeError("ParallelDiT: the shard plan is only set during run_blocks")
        return self.plan

    # --- the cut -----------------------------------------------------------------------------------
    def shard(self, tokens: Tokens, plan: ShardPlan) -> Tokens:
        """This rank's contiguous slice of every per-token field (Tokens.SEQUENCE_DIMS; pad at the end);
        the conditioning stays whole. Under the frame cut, grid is the shard's (frames, h, w); under the
        token cut a shard is not a grid of frames and grid keeps the whole sequence's (Wan's blocks do
        not read it)."""
        rank, cut = self.ctx.rank, {}
        for name, dim in SEQUENCE_DIMS.items():
            value = getattr(tokens, name)
            cut[name] = (tuple(shard(t, plan, rank, dim) for t in value) if isinstance(value, tuple)
                         else shard(value, plan, rank, dim))
        if self.by_frames:
            cut["grid"] = (plan.local_units,) + tuple(tokens.grid[1:])
        return replace(tokens, **cut)

    @staticmethod
    def without_sequence(tokens: Tokens) -> Tokens:
        """Tokens with every per-token field emptied: what finish() needs besides the gathered hidden."""
        empty = {}
        for name in SEQUENCE_DIMS:
            value = getattr(tokens, name)
            empty[name] = tuple(t.new_empty(0) for t in value) if isinstance(value, tuple) else value.new_empty(0)
        return replace(tokens, **empty)

    def gather(self, local: Tokens, whole: Tokens, plan: ShardPlan) -> Tokens:
        return whole.with_hidden(gather(local.hidden, plan, self.ctx, 1))

    # --- stages --------------------------------------------------------------------------------------
    def run_blocks(self, tokens: Tokens, layout: VideoLayout, meta: AttentionMeta,
                   states: list[StateSlot | None] | None = None) -> Tokens:
        """The adapter's run_blocks with the whole sequence's Tokens in and out, the blocks on shards."""
        if self.ctx.world == 1:
            return self.adapter.run_blocks(tokens, meta, states)
        plan = plan_for(layout, self.ctx.world, self.by_frames)
        return self.gather(self._run_shard(self.shard(tokens, plan), meta, states, plan), tokens, plan)

    def _run_shard(self, local: Tokens, meta: AttentionMeta, states, plan: ShardPlan) -> Tokens:
        self.plan = plan
        try:
            return self.adapter.run_blocks(local, meta, states)
        finally:
            self.plan = None

    def _fit_router_on_whole_sequence(self, fit):
        """The adapter's router fit (training-free k-means) given the whole sequence's hidden states, so
        that every rank fits the same router as one rank would (once per layer and video)."""
        def fit_whole(router, hidden, iters):
            return fit(router, gather(hidden, self.current_plan(), self.ctx, 1), iters)

        fit_whole.whole_sequence = True  # parallelize twice: gather once
        return fit_whole

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, layout: VideoLayout,
                meta: AttentionMeta | None = None, states: list[StateSlot | None] | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Same call and result as DiTAdapter.forward (the Denoiser's run_model)."""
        meta = meta or AttentionMeta(layout)
        tokens = self.adapter.prepare(latents, timestep, text, layout, text_mask)
        if self.ctx.world == 1:
            return self.adapter.finish(self.adapter.run_blocks(tokens, meta, states), latents.shape)
        plan = plan_for(layout, self.ctx.world, self.by_frames)
        local = self.shard(tokens, plan)
        tokens = self.without_sequence(tokens)  # the whole (B, N, C) states and RoPE are not kept meanwhile
        local = self._run_shard(local, meta, states, plan)
        return self.adapter.finish(self.gather(local, tokens, plan), latents.shape)

    __call__ = forward

    def new_states(self) -> list[StateSlot | None]:
        return self.adapter.new_states()


def parallelize(adapter: DiTAdapter, ctx: ParallelContext, ring: bool = False,
                chunks: int | None = None, staged: bool | None = None) -> ParallelDiT:
    """Apply context parallelism over `ctx` to `adapter` (see the module docstring). `ring`
    (parallel.ring): dense layers use ring attention when the ranks do not divide the heads.
    `chunks`: head sub-groups per rank whose all-to-alls overlap attention (None: DEFAULT_CHUNKS);
    `staged`: q, k, v in three exchanges (None: DEFAULT_STAGED, where None is each method's choice)."""
    return ParallelDiT(adapter, ctx, ring, chunks, staged)
