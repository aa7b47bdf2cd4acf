"""Prompt encoding: one embedding sequence per shot, padded to the model's text length."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextEmbeddings:
    """Per-prompt text for cross-attention."""

    embeds: torch.Tensor  # (S, L, C) one row per prompt, zero beyond each prompt's length
    mask: torch.Tensor  # (S, L) bool, True for real tokens

    def __len__(self) -> int:
        return self.embeds.shape[0]


@torch.no_grad()
def encode_prompts(bundle, prompts: list[str], max_length: int) -> TextEmbeddings:
    """Encode prompts with the bundle's tokenizer and text encoder (last hidden state).

    Wan zeroes the positions past each prompt's length and keeps all L positions for cross-
    attention; SANA-Video masks them. Both conventions are carried: zeroed embeds and a mask."""
    tok = bundle.tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                           add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids = tok.input_ids.to(bundle.device)
    mask = tok.attention_mask.to(bundle.device)
    hidden = bundle.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state.to(bundle.dtype)
    keep = mask.bool()
    return TextEmbeddings(hidden * keep[..., None].to(hidden.dtype), keep)
