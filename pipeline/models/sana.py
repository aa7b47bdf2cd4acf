"""SANA-Video (diffusers SanaVideoTransformer3DModel) as a DiTAdapter.

Per block (diffusers' SanaVideoTransformerBlock, called as is): ReLU linear self-attention with
RoPE (the registry's "linear" method), softmax cross-attention with the text padding masked, and a
Mix-FFN whose convolutions need the tokens as a (frames, height, width) grid: Tokens.grid, which a
frame-sharded shard sets to its own frames.
"""

from __future__ import annotations

import torch

from pipeline.config import ConfigError
from pipeline.layout import VideoLayout
from pipeline.models.adapter import DiTAdapter, Tokens
from pipeline.models.carry import install_conv_tails


class SanaAdapter(DiTAdapter):
    family = "sana"

    def __init__(self, transformer, attention_cfg, routers_state: dict | None = None):
        super().__init__(transformer, attention_cfg, routers_state)
        self.conv_tail_hooks = install_conv_tails(self)  # block mode: the Mix-FFN's temporal conv across blocks

    @property
    def blocks(self):
        return self.transformer.transformer_blocks

    def check_supported(self, transformer) -> None:
        if transformer.config.guidance_embeds:
            raise ConfigError("model.path", "guidance_embeds", "guidance-distilled SANA-Video is not supported")

    def prepare(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, layout: VideoLayout,
                text_mask: torch.Tensor | None = None) -> Tokens:
        m = self.transformer
        b, s, L, c = text.shape
        hidden = m.patch_embedding(latents).flatten(2).transpose(1, 2)  # (B, N, dim), frame-major
        # t_mod (B, 6 * dim) modulates every block; t_emb (B, dim) the output norm
        t_mod, t_emb = m.time_embed(timestep.flatten(), batch_size=b, hidden_dtype=hidden.dtype)
        caption = m.caption_norm(m.caption_projection(text.reshape(b, s * L, c)))  # (B, S * L, dim), per token
        cond = {"t_mod": t_mod.view(b, 1, -1), "t_emb": t_emb.view(b, 1, -1), "text": caption}
        if text_mask is not None:
            cond["text_mask"] = text_mask  # (B, S, L) bool
        return Tokens(hidden, self.rope(layout, latents.device), self.token_shots(layout, latents.device),
                      (layout.frames, layout.height, layout.width), L, cond)

    def block_forward(self, block, tokens: Tokens) -> torch.Tensor:
        frames, height, width = tokens.grid
        # (hidden, attention_mask, text, text_mask, timestep, frames, height, width, rope); the
        # processors take the text mask from the forward context (per shot), not from here.
        return block(tokens.hidden, None, tokens.cond["text"], None, tokens.cond["t_mod"], frames, height, width,
                     tokens.rope)

    def finish(self, tokens: Tokens, shape: torch.Size) -> torch.Tensor:
        m = self.transformer
        x = m.norm_out(tokens.hidden, tokens.cond["t_emb"], m.scale_shift_table)  # (B, N, dim)
        return self.unpatchify(m.proj_out(x), shape)
