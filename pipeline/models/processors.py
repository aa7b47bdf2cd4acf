"""Attention processors swapped into the diffusers blocks (attn1: self, attn2: cross).

diffusers' blocks call `attn(hidden_states, encoder_hidden_states, attention_mask, rotary_emb)`;
what a call needs beyond that (the step's AttentionMeta, the layers' state slots, the shot of each
token) is in the adapter's ForwardContext, set for the duration of one run_blocks call.

- SelfAttentionProcessor: q, k, v projected and normed as diffusers does, RoPE (unless the
  method applies it itself), then `adapter.attention[layer](q, k, v, meta)`: a registry method or
  a wrapper with the same call and flags (context parallelism's all-to-all), then the output
  projection. MoGA layers route first, on the hidden states the layer holds.
- ShotCrossAttentionProcessor: every video token attends only to its own shot's prompt. The text
  holds the S prompts back to back, (B, S * L, C); tokens come in contiguous runs of one shot
  (shots are frame ranges), so it is one SDPA call per run. With one shot it is diffusers' call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from pipeline.attention import AttentionMeta, StateSlot
from pipeline.attention.rope import apply_rope

if TYPE_CHECKING:
    from pipeline.models.adapter import DiTAdapter

MASKED = -10000.0  # the additive bias diffusers' SANA gives masked text tokens


@dataclass
class ForwardContext:
    """What the processors of one run_blocks call read."""

    meta: AttentionMeta  # built once per step; per layer only `layer` and `state` change
    states: Sequence[StateSlot | None]  # per layer
    shot_runs: list[tuple[int, int, int]]  # (text row, start, end): runs of one shot over the tokens held
    text_len: int  # L: text tokens per row
    text_mask: torch.Tensor | None  # (B, S, L) bool, or None: attend to all L (Wan)


def shot_runs(shot: torch.Tensor) -> list[tuple[int, int, int]]:
    """(value, start, end) for each run of equal ids in shot (N,): a handful (one per shot held)."""
    values, counts = torch.unique_consecutive(shot.cpu(), return_counts=True)
    runs, start = [], 0
    for value, count in zip(values.tolist(), counts.tolist()):
        runs.append((value, start, start + count))
        start += count
    return runs


class SelfAttentionProcessor:
    def __init__(self, adapter: "DiTAdapter", layer: int):
        self.adapter, self.layer = adapter, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        adapter, layer = self.adapter, self.layer
        ctx = adapter.context
        fn = adapter.attention[layer]
        meta = ctx.meta.for_layer(layer, ctx.states[layer])
        if fn.needs_routing:
            # Routed and planned before the projections are launched: the plan's host-side counts (MoGA's
            # one host sync) are then ready by the time the method reads them, and the host keeps its
            # lead over the GPU instead of waiting at the end of an empty queue.
            meta.routing = adapter.route(layer, hidden_states)
            prepare = getattr(fn, "prepare", None)  # optional for method-like wrappers (carry.py)
            if prepare is not None:
                prepare(meta)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)  # (B, N, H*D)
        if attn.norm_q is not None:  # RMS norm across heads, before the split
            q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))  # (B, N, H, D)
        if fn.applies_rope:  # linear attention rotates after its feature map
            meta.rope = rotary_emb
        else:
            q, k = apply_rope(q, rotary_emb), apply_rope(k, rotary_emb)
        o = fn(q, k, v, meta)  # (B, N, H, D)
        adapter.last_meta[layer] = meta
        o = o.flatten(2).to(hidden_states.dtype)  # (B, N, H*D)
        return attn.to_out[1](attn.to_out[0](o))


class ShotCrossAttentionProcessor:
    def __init__(self, adapter: "DiTAdapter"):
        self.adapter = adapter

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        ctx = self.adapter.context
        q = attn.to_q(hidden_states)  # (B, N, H*D)
        k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)  # (B, S*L, H*D)
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, *, D)
        L = ctx.text_len
        out = torch.empty_like(q)  # (B, H, N, D)
        for row, start, end in ctx.shot_runs:
            keys = slice(row * L, (row + 1) * L)
            bias = None
            if ctx.text_mask is not None:  # SANA: padding masked by an additive bias, as diffusers does
                bias = (~ctx.text_mask[:, row]).to(q.dtype)[:, None, None, :] * MASKED  # (B, 1, 1, L)
            out[:, :, start:end] = F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, keys], v[:, :, keys],
                                                                  attn_mask=bias)
        o = out.transpose(1, 2).flatten(2)  # (B, N, H*D)
        o = attn.to_out[1](attn.to_out[0](o))
        return o / getattr(attn, "rescale_output_factor", 1.0)  # SANA's Attention divides by it (1.0)
