"""SANA-Video (diffusers SanaVideoTransformer3DModel) as a DiTAdapter: linear self-attention,
softmax cross-attention, Mix-FFN with a temporal conv over latent frames."""

from __future__ import annotations

import torch

from pipeline.layout import VideoLayout
from pipeline.models.adapter import DiTAdapter, Tokens


class SanaAdapter(DiTAdapter):
    family = "sana"

    @property
    def blocks(self):
        return self.transformer.transformer_blocks

    def default_method(self, attention_cfg) -> str:
        return "linear"  # the architecture's own self-attention (config validation insists on it)

    def prepare(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, layout: VideoLayout,
                text_mask: torch.Tensor | None = None) -> Tokens:
        m = self.transformer
        b, s, L, c = text.shape
        hidden = m.patch_embedding(latents).flatten(2).transpose(1, 2)  # (B, N, dim)
        t_mod, t_emb = m.time_embed(timestep.flatten(), batch_size=b, hidden_dtype=hidden.dtype)  # (B, 6*dim), (B, dim)
        caption = m.caption_norm(m.caption_projection(text.reshape(b, s * L, c)))  # (B, S * L, dim)
        shot = layout.token_shot().to(latents.device) + layout.first_shot
        cond = {"t_mod": t_mod.view(b, 1, -1), "t_emb": t_emb.view(b, 1, -1), "text": caption}
        if text_mask is not None:
            cond["text_mask"] = text_mask
        return Tokens(hidden, self.rope(layout, latents.device), shot, (layout.frames, layout.height, layout.width), L,
                      cond)

    def block_forward(self, block, tokens: Tokens) -> torch.Tensor:
        t, h, w = tokens.grid
        return block(tokens.hidden, None, tokens.cond["text"], None, tokens.cond["t_mod"], t, h, w, tokens.rope)

    def finish(self, tokens: Tokens, shape: torch.Size) -> torch.Tensor:
        m = self.transformer
        b, _, t, h, w = shape
        p_t, p_h, p_w = m.config.patch_size
        x = m.proj_out(m.norm_out(tokens.hidden, tokens.cond["t_emb"], m.scale_shift_table))
        x = x.reshape(b, t // p_t, h // p_h, w // p_w, p_t, p_h, p_w, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
