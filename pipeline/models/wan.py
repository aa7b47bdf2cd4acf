"""Wan2.1 / Wan2.2 text-to-video (diffusers WanTransformer3DModel) as a DiTAdapter.

Per block (diffusers' WanTransformerBlock, called as is): self-attention on the modulated tokens,
cross-attention to the text, feed-forward; the timestep modulates through a (B, 6, dim) projection.
Wan attends to all L text positions of a row (padding is zeros), so text_mask is not read.
"""

from __future__ import annotations

import torch

from pipeline.config import ConfigError
from pipeline.layout import VideoLayout
from pipeline.models.adapter import DiTAdapter, Tokens
from pipeline.models.carry import with_rolling_cache


class WanAdapter(DiTAdapter):
    family = "wan"

    def configure_attention(self, attention_cfg, routers_state: dict | None = None) -> None:
        """Dense layers also carry a rolling KV cache of clean frames in block mode (carry.py)."""
        super().configure_attention(attention_cfg, routers_state)
        self.attention = with_rolling_cache(self.attention)

    @property
    def blocks(self):
        return self.transformer.blocks

    def check_supported(self, transformer) -> None:
        cfg = transformer.config
        if cfg.image_dim is not None or cfg.added_kv_proj_dim is not None:
            raise ConfigError("model.path", "image-conditioned Wan", "only text-to-video Wan is supported")

    def prepare(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, layout: VideoLayout,
                text_mask: torch.Tensor | None = None) -> Tokens:
        m = self.transformer
        hidden = m.patch_embedding(latents)  # (B, dim, T, H/2, W/2)
        hidden = hidden.flatten(2).transpose(1, 2).contiguous()  # (B, N, dim), frame-major
        b, s, L, c = text.shape
        # temb (B, dim); timestep_proj (B, 6 * dim); text (B, S * L, dim): the projection is per token,
        # so the S rows are projected back to back.
        temb, timestep_proj, text_proj, _ = m.condition_embedder(timestep, text.reshape(b, s * L, c), None)
        cond = {"temb": temb, "timestep_proj": timestep_proj.unflatten(1, (6, -1)), "text": text_proj}
        return Tokens(hidden, self.rope(layout, latents.device), self.token_shots(layout, latents.device),
                      (layout.frames, layout.height, layout.width), L, cond)

    def block_forward(self, block, tokens: Tokens) -> torch.Tensor:
        return block(tokens.hidden, tokens.cond["text"], tokens.cond["timestep_proj"], tokens.rope)

    def finish(self, tokens: Tokens, shape: torch.Size) -> torch.Tensor:
        """(B, N, dim) -> (B, C, T, H, W): output norm modulated by the timestep, projection, unpatchify."""
        m = self.transformer
        shift, scale = (m.scale_shift_table + tokens.cond["temb"].unsqueeze(1)).chunk(2, dim=1)  # (B, 1, dim) each
        x = tokens.hidden
        x = (m.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        return self.unpatchify(m.proj_out(x), shape)  # proj_out: (B, N, p_t * p_h * p_w * C)
