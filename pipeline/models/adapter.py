"""The adapter over a diffusers video DiT: three stages and replaceable per-layer attention.

    tokens = adapter.prepare(latents, timestep, text, layout)   # patchify, embeddings, RoPE
    tokens = adapter.run_blocks(tokens, meta, states)           # the transformer blocks
    pred   = adapter.finish(tokens, latents.shape)              # output norm, projection, unpatchify

Everything per token in Tokens (hidden, rope, shot) is in sequence order and may be sliced along
the sequence: context parallelism shards between prepare and run_blocks and gathers before finish,
from outside; model code here never calls torch.distributed. Self-attention goes through
`adapter.attention[layer]`, a registry method or anything with the same call and flags (the
Ulysses wrapper), replaceable with set_attention. Cross-attention is per shot: a video token
attends only to its own shot's prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attention import AttentionMeta, StateSlot, build_method
from pipeline.attention.rope import apply_rope
from pipeline.layout import VideoLayout

try:  # MoGA's router lands with the moga method; models without routing don't need it
    from pipeline.attention.moga import MoGARouter, kmeans_init
except ImportError:  # pragma: no cover
    MoGARouter = kmeans_init = None


@dataclass
class Tokens:
    hidden: torch.Tensor  # (B, N, C) video tokens, frame-major
    rope: tuple[torch.Tensor, torch.Tensor]  # (cos, sin) each (1, N, 1, D), absolute frame positions
    shot: torch.Tensor  # (N,) int64: the text row (shot of the video) each token's cross-attention reads
    grid: tuple[int, int, int]  # (frames, height, width) of the tokens held
    text_len: int  # L: text tokens per row of cond["text"] (B, S * L, C)
    cond: dict[str, torch.Tensor] = field(default_factory=dict)  # replicated: time embeddings, text, mask

    def with_hidden(self, hidden: torch.Tensor) -> "Tokens":
        return replace(self, hidden=hidden)


@dataclass
class ForwardContext:
    """What the processors of one run_blocks call read (set for its duration only)."""

    meta: AttentionMeta
    states: list[StateSlot | None]
    shot_runs: list[tuple[int, int, int]]  # (text row, start, end) runs over the tokens held
    text_len: int  # L: text tokens per row
    text_mask: torch.Tensor | None  # (B, S, L) bool, or None to attend to all L (Wan)


def shot_runs(shot: torch.Tensor) -> list[tuple[int, int, int]]:
    """Contiguous runs of equal shot ids: shots are frame ranges, so a handful of runs."""
    values, counts = torch.unique_consecutive(shot.cpu(), return_counts=True)
    out, start = [], 0
    for v, c in zip(values.tolist(), counts.tolist()):
        out.append((v, start, start + c))
        start += c
    return out


class SelfAttentionProcessor:
    """q, k, v projections as diffusers does them, then `adapter.attention[layer]`."""

    def __init__(self, adapter: "DiTAdapter", layer: int):
        self.adapter, self.layer = adapter, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        ctx, layer = self.adapter.context, self.layer
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))  # (B, N, H, D)
        fn = self.adapter.attention[layer]
        meta = ctx.meta.for_layer(layer, ctx.states[layer])
        if fn.needs_routing:  # MoGA: route on the hidden state the layer sees (local tokens under CP)
            router = self.adapter.routers[str(layer)]
            if layer in self.adapter.routers_to_fit:  # training-free: k-means centroids, then frozen
                kmeans_init(router, hidden_states, self.adapter.kmeans_iters)
                self.adapter.routers_to_fit.discard(layer)
            meta.routing, loss = router(hidden_states)
            self.adapter.aux_losses.append(loss)
        if fn.applies_rope:
            meta.rope = rotary_emb
        else:
            q, k = apply_rope(q, rotary_emb), apply_rope(k, rotary_emb)
        o = fn(q, k, v, meta).flatten(2).to(hidden_states.dtype)  # (B, N, H*D)
        self.adapter.last_meta[layer] = meta
        return attn.to_out[1](attn.to_out[0](o))


class ShotCrossAttentionProcessor:
    """Cross-attention where each video token reads only its shot's prompt (text row).

    encoder_hidden_states holds every row back to back: (B, S * L, C). Cross-attention is short
    (L keys), so it calls SDPA directly rather than a sparse method."""

    def __init__(self, adapter: "DiTAdapter"):
        self.adapter = adapter

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        ctx = self.adapter.context
        q, k, v = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        heads = attn.heads
        q = q.unflatten(2, (heads, -1)).transpose(1, 2)  # (B, H, N, D)
        k = k.unflatten(2, (heads, -1)).transpose(1, 2)  # (B, H, S*L, D)
        v = v.unflatten(2, (heads, -1)).transpose(1, 2)
        out = torch.empty_like(q)
        L = ctx.text_len
        for row, start, end in ctx.shot_runs:
            bias = None
            if ctx.text_mask is not None:  # SANA: masked padding, as a bias like diffusers does
                bias = ((~ctx.text_mask[:, row]).to(q.dtype) * -10000.0)[:, None, None, :]  # (B, 1, 1, L)
            out[:, :, start:end] = F.scaled_dot_product_attention(
                q[:, :, start:end], k[:, :, row * L:(row + 1) * L], v[:, :, row * L:(row + 1) * L], attn_mask=bias)
        o = out.transpose(1, 2).flatten(2).type_as(q)  # (B, N, H*D)
        o = attn.to_out[1](attn.to_out[0](o))
        return o / getattr(attn, "rescale_output_factor", 1.0)


class DiTAdapter(nn.Module):
    """Base: owns the diffusers transformer, per-layer attention callables and MoGA routers."""

    family: str

    def __init__(self, transformer: nn.Module, attention_cfg, routers_state: dict | None = None):
        super().__init__()
        self.transformer = transformer
        self.context: ForwardContext | None = None
        self.aux_losses: list[torch.Tensor] = []  # MoGA group-balancing losses of the last forward
        self.last_meta: dict[int, AttentionMeta] = {}  # per layer: what its attention computed (stats)
        self.routers: nn.ModuleDict | None = None
        self.routers_to_fit: set[int] = set()  # routers that fit k-means centroids on their next call
        self.kmeans_iters = attention_cfg.moga.kmeans_iters
        self.attention: list = []
        self.configure_attention(attention_cfg, routers_state)
        for i, block in enumerate(self.blocks):
            block.attn1.set_processor(SelfAttentionProcessor(self, i))
            block.attn2.set_processor(ShotCrossAttentionProcessor(self))

    # --- architecture ----------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

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

    def default_method(self, attention_cfg) -> str:
        return attention_cfg.method

    # --- attention -------------------------------------------------------------------------------
    def configure_attention(self, attention_cfg, routers_state: dict | None = None) -> None:
        """One method per layer (dense for attention.dense_layers); MoGA routers when needed."""
        p = next(self.transformer.parameters())
        method = self.default_method(attention_cfg)
        dense_layers = set(attention_cfg.dense_layers)
        self.attention = [build_method(attention_cfg, p.device, p.dtype, "dense" if i in dense_layers else method)
                          for i in range(self.num_layers)]
        routed = [i for i, fn in enumerate(self.attention) if fn.needs_routing]
        self.routers, self.fit_routers = None, False
        if routed:

            m = attention_cfg.moga
            self.routers = nn.ModuleDict({str(i): MoGARouter(self.dim, m.num_groups, m.balance_weight)
                                          for i in routed}).to(p.device)
            init = m.router_init
            if init == "checkpoint" and routers_state is None:
                raise ValueError("attention.moga.router_init: checkpoint, but the weights ship no "
                                 "transformer/longreel_routers.safetensors (use kmeans or random)")
            if routers_state is not None and init in ("auto", "checkpoint"):
                self.routers.load_state_dict(routers_state)
            self.fit_routers = init == "kmeans" or (init == "auto" and routers_state is None)
            self.reset_routers()

    def set_attention(self, layer: int, fn) -> None:
        """Replace layer's self-attention callable (context parallelism wraps them from outside)."""
        self.attention[layer] = fn

    # --- stages ----------------------------------------------------------------------------------
    def rope(self, layout: VideoLayout, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) (1, N, 1, D) at absolute frames [frame_offset, frame_offset + frames)."""
        r = self.transformer.rope
        t0, t1 = layout.frame_offset, layout.frame_offset + layout.frames
        if t1 > r.max_seq_len or max(layout.height, layout.width) > r.max_seq_len:
            raise ValueError(f"video: {t1} latent frames of {layout.height}x{layout.width} tokens exceed the "
                             f"model's rope_max_seq_len {r.max_seq_len}")
        sizes = [r.t_dim, r.h_dim, r.w_dim]
        out = []
        for table in (r.freqs_cos, r.freqs_sin):
            ft, fh, fw = table.split(sizes, dim=1)
            T, H, W = layout.frames, layout.height, layout.width
            full = torch.cat([ft[t0:t1].view(T, 1, 1, -1).expand(T, H, W, -1),
                              fh[:H].view(1, H, 1, -1).expand(T, H, W, -1),
                              fw[:W].view(1, 1, W, -1).expand(T, H, W, -1)], dim=-1)
            out.append(full.reshape(1, T * H * W, 1, -1).to(device))
        return out[0], out[1]

    def prepare(self, latents, timestep, text, layout: VideoLayout, text_mask=None) -> Tokens:
        """latents (B, C, T, H, W); timestep (B,); text (B, S, L, C_text) one row per shot of the
        video; text_mask (B, S, L) bool where the family masks padded text tokens."""
        raise NotImplementedError

    def block_forward(self, block: nn.Module, tokens: Tokens) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, tokens: Tokens, shape: torch.Size) -> torch.Tensor:
        raise NotImplementedError

    def run_blocks(self, tokens: Tokens, meta: AttentionMeta, states: list[StateSlot | None] | None = None) -> Tokens:
        states = states if states is not None else [None] * self.num_layers
        mask = tokens.cond.get("text_mask")
        self.context = ForwardContext(meta, states, shot_runs(tokens.shot), tokens.text_len, mask)
        self.aux_losses = []
        try:
            hidden = tokens.hidden
            for block in self.blocks:
                hidden = self.block_forward(block, tokens.with_hidden(hidden))
        finally:
            self.context = None
        return tokens.with_hidden(hidden)

    def forward(self, latents, timestep, text, layout: VideoLayout, meta: AttentionMeta | None = None,
                states: list[StateSlot | None] | None = None, text_mask=None) -> torch.Tensor:
        meta = meta or AttentionMeta(layout)
        tokens = self.prepare(latents, timestep, text, layout, text_mask)
        return self.finish(self.run_blocks(tokens, meta, states), latents.shape)

    def new_states(self) -> list[StateSlot | None]:
        """Fresh per-layer state slots for a new video (stateful methods only)."""
        return [StateSlot() if fn.has_state else None for fn in self.attention]

    def reset_routers(self) -> None:
        """Training-free routers fit their k-means centroids again on the next video's first step."""
        if self.routers is not None and self.fit_routers:
            self.routers_to_fit = {int(i) for i in self.routers}
