"""Wan2.1 / 2.2 text-to-video (diffusers WanTransformer3DModel) as a DiTAdapter."""

from __future__ import annotations

import torch

from pipeline.layout import VideoLayout
from pipeline.models.adapter import DiTAdapter, Tokens


class WanAdapter(DiTAdapter):
    family = "wan"

    @property
    def blocks(self):
        return self.transformer.blocks

    def prepare(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, layout: VideoLayout,
                text_mask: torch.Tensor | None = None) -> Tokens:
        """Wan attends to all L text positions (zeros past the prompt), so text_mask is unused."""
        m = self.transformer
        hidden = m.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()  # (B, N, dim)
        b, s, L, c = text.shape
        # temb (B, dim); timestep_proj (B, 6 * dim); text (B, S * L, dim): token-wise projections
        temb, timestep_proj, text_proj, _ = m.condition_embedder(timestep, text.reshape(b, s * L, c), None)
        shot = layout.token_shot().to(latents.device) + layout.first_shot  # (N,) text row per token
        return Tokens(hidden, self.rope(layout, latents.device), shot, (layout.frames, layout.height, layout.width), L,
                      {"temb": temb, "timestep_proj": timestep_proj.unflatten(1, (6, -1)), "text": text_proj})

    def block_forward(self, block, tokens: Tokens) -> torch.Tensor:
        return block(tokens.hidden, tokens.cond["text"], tokens.cond["timestep_proj"], tokens.rope)

    def finish(self, tokens: Tokens, shape: torch.Size) -> torch.Tensor:
        """(B, N, dim) -> (B, C, T, H, W): output norm modulated by the timestep, projection, unpatchify."""
        m = self.transformer
        b, _, t, h, w = shape
        p_t, p_h, p_w = m.config.patch_size
        shift, scale = (m.scale_shift_table + tokens.cond["temb"].unsqueeze(1)).chunk(2, dim=1)  # (B, 1, dim)
        x = tokens.hidden
        x = (m.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = m.proj_out(x)  # (B, N, p_t * p_h * p_w * C)
        x = x.reshape(b, t // p_t, h // p_h, w // p_w, p_t, p_h, p_w, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, T', p_t, H', p_h, W', p_w)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
