"""The adapter over a diffusers video DiT: three stages and replaceable per-layer attention.

    tokens = adapter.prepare(latents, timestep, text, layout, text_mask)   # patchify, embeddings, RoPE
    tokens = adapter.run_blocks(tokens, meta, states)                      # the transformer blocks
    pred   = adapter.finish(tokens, latents.shape)                         # norm, projection, unpatchify
    adapter(latents, timestep, text, layout, meta, states, text_mask)      # the three in a row

Context parallelism works from outside, between the stages: it cuts the per-token fields of
Tokens (Tokens.SEQUENCE_DIMS) into contiguous shards (pad allowed) after prepare, runs run_blocks
on its shard, and gathers hidden before finish; it swaps each layer's self-attention callable with
set_attention. Model code here never calls torch.distributed.

diffusers keeps the model definitions and the weights: the adapter calls its embedding modules,
blocks and output layers, and only replaces the attention processors (processors.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, ClassVar, Sequence

import torch
from torch import nn

from pipeline.attention import AttentionMeta, Routing, StateSlot, build_method
from pipeline.config import ConfigError
from pipeline.layout import VideoLayout
from pipeline.models.processors import ForwardContext, SelfAttentionProcessor, ShotCrossAttentionProcessor, shot_runs


@dataclass
class Tokens:
    """The video tokens between prepare and finish, and what the blocks are conditioned on.

    Per token, in sequence (frame-major) order, sliceable along the sequence (SEQUENCE_DIMS):
    hidden, rope (both tensors), shot. Everything else is replicated: every shard needs all of it."""

    SEQUENCE_DIMS: ClassVar[dict[str, int]] = {"hidden": 1, "rope": 1, "shot": 0}

    hidden: torch.Tensor  # (B, N, C) video tokens
    rope: tuple[torch.Tensor, torch.Tensor]  # (cos, sin) each (1, N, 1, D) fp32, absolute frame positions
    shot: torch.Tensor  # (N,) int64: the text row (the video's shot index) each token's cross-attention reads
    grid: tuple[int, int, int]  # (frames, height, width) of the tokens held (SANA's Mix-FFN reshapes to it)
    text_len: int  # L: text tokens per row of cond["text"]
    cond: dict[str, torch.Tensor] = field(default_factory=dict)  # time embeddings, text (B, S * L, C), text_mask

    def with_hidden(self, hidden: torch.Tensor) -> "Tokens":
        return replace(self, hidden=hidden)


class DiTAdapter(nn.Module):
    """Base of the family adapters: owns the diffusers transformer, one attention callable per layer,
    the MoGA routers of routed layers, and the processors that call them."""

    family: ClassVar[str]

    def __init__(self, transformer: nn.Module, attention_cfg, routers_state: dict | None = None):
        super().__init__()
        self.check_supported(transformer)
        self.transformer = transformer
        self.context: ForwardContext | None = None  # set during run_blocks only
        self.aux_losses: list[torch.Tensor] = []  # MoGA group-balancing losses of the last run_blocks
        self.last_meta: dict[int, AttentionMeta] = {}  # per layer: the meta of its last call (stats)
        self.attention: list = []  # per layer: callable(q, k, v, meta) -> o with the method's flags
        self.routers: nn.ModuleDict | None = None  # str(layer) -> MoGARouter, routed layers only
        # How a training-free router is fitted: (router, hidden (B, N, C), iters). Replaceable: under
        # context parallelism every rank must fit the same router (from the whole sequence).
        self.fit_router: Callable | None = None
        self.routers_to_fit: set[int] = set()
        self.configure_attention(attention_cfg, routers_state)
        for layer, block in enumerate(self.blocks):
            block.attn1.set_processor(SelfAttentionProcessor(self, layer))
            block.attn2.set_processor(ShotCrossAttentionProcessor(self))

    # --- architecture (families override) --------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def check_supported(self, transformer: nn.Module) -> None:
        """Refuse variants of the architecture the adapter does not implement (one line)."""

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def heads(self) -> int:
        return self.blocks[0].attn1.heads

    @property
    def head_dim(self) -> int:
        return self.blocks[0].attn1.to_q.out_features // self.heads

    @property
    def dim(self) -> int:
        return self.blocks[0].attn1.to_q.in_features

    # --- attention ---------------------------------------------------------------------------------
    def configure_attention(self, attention_cfg, routers_state: dict | None = None) -> None:
        """attention.method in every layer but attention.dense_layers; a MoGA router per routed layer."""
        p = next(self.transformer.parameters())
        dense = set(attention_cfg.dense_layers)
        bad = sorted(i for i in dense if not 0 <= i < self.num_layers)
        if bad:
            raise ConfigError("attention.dense_layers", list(attention_cfg.dense_layers),
                              f"layers {bad} do not exist (the model has {self.num_layers}: 0..{self.num_layers - 1})")
        names = ["dense" if i in dense else attention_cfg.method for i in range(self.num_layers)]
        self.attention = [build_method(attention_cfg, p.device, p.dtype, name) for name in names]
        self.routers, self.routers_to_fit, self.fit_router = None, set(), None
        routed = [i for i, fn in enumerate(self.attention) if fn.needs_routing]
        if routed:
            self._make_routers(attention_cfg.moga, routed, routers_state, p.device)

    def _make_routers(self, moga_cfg, routed: list[int], routers_state: dict | None, device) -> None:
        from pipeline.attention.moga import MoGARouter, kmeans_init

        self.routers = nn.ModuleDict({str(i): MoGARouter(self.dim, moga_cfg.num_groups, moga_cfg.balance_weight)
                                      for i in routed}).to(device)
        init = moga_cfg.router_init
        if init == "checkpoint" and routers_state is None:
            raise ConfigError("attention.moga.router_init", init, "the weights ship no "
                                                                  "transformer/longreel_routers.safetensors")
        if routers_state is not None and init in ("auto", "checkpoint"):
            wanted = self.routers.state_dict()
            missing = sorted(k for k in wanted if k not in routers_state)
            if missing:
                raise ConfigError("attention.moga.router_init", init, f"the routers file has no {missing[0]} "
                                                                      f"(keys are <layer>.proj.weight)")
            self.routers.load_state_dict({k: routers_state[k] for k in wanted})
        self.fit_router = kmeans_init
        self.fit_each_video = init == "kmeans" or (init == "auto" and routers_state is None)
        self.kmeans_iters = moga_cfg.kmeans_iters
        self.reset_routers()

    def reset_routers(self) -> None:
        """Training-free routers fit their k-means centroids again at the next video's first step."""
        if self.routers is not None and self.fit_each_video:
            self.routers_to_fit = {int(i) for i in self.routers}

    def route(self, layer: int, hidden: torch.Tensor) -> Routing:
        """MoGA routing of the tokens the layer holds (hidden (B, N, C)); the loss goes to aux_losses."""
        router = self.routers[str(layer)]
        if layer in self.routers_to_fit:
            self.fit_router(router, hidden, self.kmeans_iters)
            self.routers_to_fit.discard(layer)
        routing, loss = router(hidden)
        self.aux_losses.append(loss)
        return routing

    def set_attention(self, layer: int, fn) -> None:
        """Replace layer's self-attention callable: fn(q, k, v, meta) -> o with the flags of the
        method it stands for (needs_routing, applies_rope, has_state)."""
        self.attention[layer] = fn

    def new_states(self) -> list[StateSlot | None]:
        """Fresh per-layer state slots for a new video (a slot for stateful methods, else None)."""
        return [StateSlot() if fn.has_state else None for fn in self.attention]

    # --- stage 1: prepare ----------------------------------------------------------------------------
    def rope(self, layout: VideoLayout, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) each (1, N, 1, D) fp32 at absolute frames [frame_offset, frame_offset + frames).

        diffusers' tables, read at the layout's positions (its own forward starts every call at
        frame 0); fp32 rather than the tables' fp64 halves their memory at 500k tokens."""
        r = self.transformer.rope
        t0, t1 = layout.frame_offset, layout.frame_offset + layout.frames
        T, H, W = layout.frames, layout.height, layout.width
        if t1 > r.max_seq_len or max(H, W) > r.max_seq_len:
            raise ConfigError("video", f"{t1} latent frames of {H}x{W} tokens",
                              f"exceeds the model's rope_max_seq_len {r.max_seq_len}")
        out = []
        for table in (r.freqs_cos, r.freqs_sin):
            table = table.to(device, torch.float32)  # (max_seq_len, D)
            ft, fh, fw = table.split([r.t_dim, r.h_dim, r.w_dim], dim=1)
            full = torch.cat([ft[t0:t1].view(T, 1, 1, -1).expand(T, H, W, -1),
                              fh[:H].view(1, H, 1, -1).expand(T, H, W, -1),
                              fw[:W].view(1, 1, W, -1).expand(T, H, W, -1)], dim=-1)  # (T, H, W, D)
            out.append(full.reshape(1, T * H * W, 1, -1))
        return out[0], out[1]

    def token_shots(self, layout: VideoLayout, device) -> torch.Tensor:
        """(N,) the video-level shot index (text row) of every token."""
        return (layout.token_shot() + layout.first_shot).to(device)

    def prepare(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, layout: VideoLayout,
                text_mask: torch.Tensor | None = None) -> Tokens:
        """latents (B, C, T, H, W); timestep (B,); text (B, S, L, C_text) one row per shot of the
        video; text_mask (B, S, L) bool (read by families that mask text padding)."""
        raise NotImplementedError

    # --- stage 2: blocks -------------------------------------------------------------------------------
    def block_forward(self, block: nn.Module, tokens: Tokens) -> torch.Tensor:
        raise NotImplementedError

    @contextmanager
    def forward_context(self, tokens: Tokens, meta: AttentionMeta, states: Sequence[StateSlot | None] | None):
        states = states if states is not None else [None] * self.num_layers
        if len(states) != self.num_layers:
            raise ValueError(f"states: {len(states)} slots for {self.num_layers} layers")
        self.context = ForwardContext(meta, states, shot_runs(tokens.shot), tokens.text_len,
                                      tokens.cond.get("text_mask"))
        try:
            yield self.context
        finally:
            self.context = None

    def run_blocks(self, tokens: Tokens, meta: AttentionMeta,
                   states: Sequence[StateSlot | None] | None = None) -> Tokens:
        """All transformer blocks on the tokens held. meta: the step's AttentionMeta (its layout is the
        whole sequence attention sees); states: per-layer slots (None: stateless methods only)."""
        self.aux_losses = []
        with self.forward_context(tokens, meta, states):
            hidden = tokens.hidden
            for block in self.blocks:
                hidden = self.block_forward(block, tokens.with_hidden(hidden))
        return tokens.with_hidden(hidden)

    # --- stage 3: finish ---------------------------------------------------------------------------------
    def finish(self, tokens: Tokens, shape: torch.Size) -> torch.Tensor:
        raise NotImplementedError

    def unpatchify(self, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """(B, N, p_t * p_h * p_w * C) -> (B, C, T, H, W) of the latents' `shape`."""
        b, _, t, h, w = shape
        p_t, p_h, p_w = self.transformer.config.patch_size
        x = x.reshape(b, t // p_t, h // p_h, w // p_w, p_t, p_h, p_w, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, T', p_t, H', p_h, W', p_w)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    # --- all three ------------------------------------------------------------------------------------------
    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, layout: VideoLayout,
                meta: AttentionMeta | None = None, states: Sequence[StateSlot | None] | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The prediction (B, C, T, H, W) for latents (B, C, T, H, W): finish(run_blocks(prepare(...)))."""
        meta = meta or AttentionMeta(layout)
        tokens = self.prepare(latents, timestep, text, layout, text_mask)
        return self.finish(self.run_blocks(tokens, meta, states), latents.shape)
