"""What carries one block of a video into the next, hooked into the diffusers models from outside.

Block-autoregressive generation denoises a video block by block; a later block sees the earlier
ones only through per-layer state, written by a commit pass (one forward on the block's clean
latents at t = 0 with meta.commit) after the block's last step:

- linear attention (SANA-Video): the running sums S, z (pipeline/attention/linear.py, LinearState);
- SANA-Video's Mix-FFN (diffusers GLUMBTempConv) ends with a kernel-3 convolution over latent
  frames; a block's first frame must see the previous block's last frame there. ConvTailHooks
  carry it: the tail is the last frame of the clean block's Mix-FFN input (B, 1, h, w, C).
  Everything in the Mix-FFN before its temporal conv works frame by frame, so prepending that frame
  to the next block's input and dropping its output is exactly "the conv sees the previous block's
  last clean frame" (NVlabs' CachedGLUMBConvTemp keeps the conv's own input frame instead; the
  result is the same, for one extra frame of per-frame work). The block's last frame sees zero
  padding on its right, as the future is not known yet.
- softmax layers (Wan): RollingKVCache, the clean keys (rotated at their absolute positions) and
  values of the video's first `sink_frames` latent frames and of the last `window_frames` frames
  before the block. RollingCacheAttention lets the block's queries attend to [cache ; block] and,
  on commit, appends the block and evicts the oldest non-sink frames: memory is bounded by
  (sink_frames + window_frames) frames, whatever the video's length.

All state lives in the StateSlots of the video's CarriedState (pipeline/sampling/state.py); the
hooks and wrappers keep nothing between calls. With no carried state (joint mode, or plain
per-layer slots) they compute exactly what the unhooked model computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pipeline.attention.base import AttentionMeta

if TYPE_CHECKING:
    from pipeline.models.adapter import DiTAdapter


# ---------------------------------------------------------------------------------------------
# Softmax layers: a rolling cache of clean keys and values
# ---------------------------------------------------------------------------------------------


@dataclass
class RollingKVCache:
    """One softmax layer's clean context: the video's first `sink_frames` latent frames plus the last
    `window_frames` frames committed before the current block, in frame order."""

    sink_frames: int
    window_frames: int
    frames: torch.Tensor  # (F,) int64: absolute latent frame of each cached frame, ascending
    k: torch.Tensor | None = None  # (B, F * tokens_per_frame, H, D) keys rotated at their absolute positions
    v: torch.Tensor | None = None  # (B, F * tokens_per_frame, H, D); k and v are None while empty

    @classmethod
    def empty(cls, sink_frames: int, window_frames: int) -> "RollingKVCache":
        return cls(sink_frames, window_frames, torch.zeros(0, dtype=torch.int64))

    @property
    def capacity_frames(self) -> int:
        return self.sink_frames + self.window_frames

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.frames, self.k, self.v) if t is not None)

    def committed(self, k: torch.Tensor, v: torch.Tensor, first_frame: int, frames: int) -> "RollingKVCache":
        """The cache after committing a block of `frames` latent frames from absolute frame `first_frame`:
        k, v (B, frames * tokens_per_frame, H, D). Keeps sink frames, then the newest window frames."""
        new = torch.arange(first_frame, first_frame + frames, dtype=torch.int64)
        if len(self.frames) and int(self.frames[-1]) >= first_frame:
            raise ValueError(f"RollingKVCache: block at frame {first_frame} does not follow the cached frames "
                             f"(last {int(self.frames[-1])}); blocks must be committed in order")
        all_frames = torch.cat([self.frames, new])
        if self.k is not None:
            k, v = torch.cat([self.k, k.to(self.k.dtype)], 1), torch.cat([self.v, v.to(self.v.dtype)], 1)
        sink = all_frames < self.sink_frames
        recent = torch.zeros_like(sink)
        rest = (~sink).nonzero().flatten()
        recent[rest[max(0, len(rest) - self.window_frames):]] = True
        keep = (sink | recent).nonzero().flatten()  # ascending: the cache stays in frame order
        b, n, h, d = k.shape
        per_frame = n // len(all_frames)
        index = keep.to(k.device)
        k = k.view(b, len(all_frames), per_frame, h, d).index_select(1, index).flatten(1, 2)
        v = v.view(b, len(all_frames), per_frame, h, d).index_select(1, index).flatten(1, 2)
        return RollingKVCache(self.sink_frames, self.window_frames, all_frames[keep], k.contiguous(), v.contiguous())


class RollingCacheAttention:
    """Wraps a dense (softmax) method: with a RollingKVCache in meta.state the queries attend to the
    cached keys as well, and a commit writes this call's keys and values into the cache. Without one
    (joint mode) it is the wrapped method. q, k, v (B, N, H, D), k rotated at absolute positions.

    Same call and flags as the method, so context parallelism wraps it like any method: under
    Ulysses it runs on the whole block for this rank's heads, and each rank caches its own heads."""

    def __init__(self, method):
        if method.name != "dense":
            raise ValueError(f"attention.method: the rolling KV cache extends dense attention only, not {method.name}")
        self.method = method
        self.name, self.cp_strategy = method.name, method.cp_strategy
        self.supports_context_parallel, self.dtypes = method.supports_context_parallel, method.dtypes
        self.needs_routing, self.applies_rope = method.needs_routing, method.applies_rope
        self.has_state = True  # the slot holds the cache (dense itself keeps nothing)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        cache = meta.state.value if meta.state is not None else None
        if not isinstance(cache, RollingKVCache):
            if meta.commit:
                raise ValueError("rolling cache: meta.commit without a RollingKVCache in the layer's state slot")
            return self.method(q, k, v, meta)
        b, n, h, d = q.shape
        if cache.k is not None and tuple(cache.k.shape[::2]) != (b, h):
            raise ValueError(f"rolling cache: cached keys {tuple(cache.k.shape)} do not fit this call's (B={b}, "
                             f"H={h}) (reset the state per video)")
        keys, values = k, v
        if cache.k is not None:
            keys, values = torch.cat([cache.k.to(k.dtype), k], 1), torch.cat([cache.v.to(v.dtype), v], 1)
        o = self.method(q, keys, values, meta)  # (B, N, H, D)
        meta.stats["pairs"] = float(b * h * n * keys.shape[1])
        meta.stats["cached_tokens"] = float(keys.shape[1] - n)
        if meta.commit:
            layout = meta.layout
            if layout.text_tokens or n != layout.num_tokens:
                raise ValueError(f"rolling cache: a commit needs the block's {layout.num_tokens} video tokens, got {n}")
            meta.state.value = cache.committed(k.detach(), v.detach(), layout.frame_offset, layout.frames)
        return o

    def flops(self, meta: AttentionMeta, shape: tuple[int, int, int, int]) -> float:
        return self.method.flops(meta, shape)

    def __call__(self, q, k, v, meta):
        return self.forward(q, k, v, meta)

    def __repr__(self) -> str:
        return f"RollingCacheAttention({self.method!r})"


def with_rolling_cache(attention: list) -> list:
    """The per-layer attention callables with every dense layer able to carry a rolling cache."""
    return [RollingCacheAttention(fn) if fn.name == "dense" and not isinstance(fn, RollingCacheAttention) else fn
            for fn in attention]


# ---------------------------------------------------------------------------------------------
# SANA-Video's Mix-FFN: the temporal conv's tail
# ---------------------------------------------------------------------------------------------


class ConvTailHook:
    """Forward hooks on one SANA-Video block's Mix-FFN (`block.ff`, input (B, T, h, w, C)).

    Reads the layer's slot from the adapter's ForwardContext: `states.conv_tails[layer]` when the
    run carries state (a CarriedState), nothing otherwise. The tail is (B, 1, h, w, C)."""

    def __init__(self, adapter: "DiTAdapter", layer: int):
        self.adapter, self.layer = adapter, layer
        self.prepended = False  # set by before(), consumed by after() of the same call

    def _slot(self):
        ctx = self.adapter.context
        tails = getattr(ctx.states, "conv_tails", None) if ctx is not None else None
        return (tails[self.layer], ctx.meta) if tails is not None and tails[self.layer] is not None else (None, None)

    def before(self, module, args):
        slot, meta = self._slot()
        self.prepended = False
        if slot is None or (slot.value is None and not meta.commit):
            return None
        (x,) = args  # (B, T, h, w, C)
        if x.shape[1] != meta.layout.frames:
            raise ValueError("sampling.mode: block carries SANA-Video's temporal-conv tail on whole blocks only; "
                             f"this forward holds {x.shape[1]} of the block's {meta.layout.frames} frames "
                             "(context parallelism: use sampling.mode=joint or parallel.degree=1)")
        tail = slot.value
        if meta.commit:
            slot.value = x[:, -1:].detach().clone()
        if tail is None:
            return None
        if tail.shape[0] != x.shape[0] or tail.shape[2:] != x.shape[2:]:
            raise ValueError(f"conv tail: carried {tuple(tail.shape)} does not fit a block of {tuple(x.shape)} "
                             f"(reset the state per video)")
        self.prepended = True
        return (torch.cat([tail.to(x.dtype), x], 1),)

    def after(self, module, args, output):
        if not self.prepended:
            return None
        self.prepended = False
        return output[:, 1:]  # the prepended frame's output belongs to the previous block


def install_conv_tails(adapter: "DiTAdapter") -> list[ConvTailHook]:
    """Hook every block's Mix-FFN (modules keep their parameters and state-dict keys)."""
    hooks = []
    for layer, block in enumerate(adapter.blocks):
        hook = ConvTailHook(adapter, layer)
        block.ff.register_forward_pre_hook(hook.before)
        block.ff.register_forward_hook(hook.after)
        hooks.append(hook)
    return hooks
