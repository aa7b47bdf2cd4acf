"""Prompt encoding: one embedding row per prompt (a video has one prompt per shot), L tokens each.

Conventions follow each family's reference pipeline, so users' weights see the text they were
trained on:
- wan (WanPipeline): prompts cleaned (HTML entities, whitespace), UMT5 last hidden state, rows
  zeroed past each prompt's length; cross-attention reads all L positions (no mask).
- sana (SanaVideoPipeline): prompts lower-cased, right padding, Gemma2 last hidden state,
  cross-attention masks the padding. With model.text_instruction, the instruction is prepended
  and the encoder keeps the first token and the last L - 1 (SANA's "complex human instruction").
Both come out zeroed past each prompt's length with the mask alongside, so one TextEmbeddings
serves both families.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

import torch


@dataclass
class TextEmbeddings:
    """Encoded prompts, one row per prompt."""

    embeds: torch.Tensor  # (S, L, C) in the model's dtype, zero past each prompt's length
    mask: torch.Tensor  # (S, L) bool, True for real tokens

    @property
    def lengths(self) -> torch.Tensor:
        """(S,) int64 real tokens per prompt."""
        return self.mask.sum(1)

    def __len__(self) -> int:
        return self.embeds.shape[0]


def clean_prompt(text: str, family: str) -> str:
    """What the family's reference pipeline does to a prompt before tokenizing it."""
    if family == "sana":
        return text.lower().strip()
    try:  # WanPipeline runs ftfy when it is installed
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


@torch.no_grad()
def encode_prompts(bundle, prompts: list[str], max_length: int, instruction: str = "") -> TextEmbeddings:
    """Encode `prompts` with the bundle's tokenizer and text encoder: (S, L = max_length, C).

    `instruction` is prepended to every prompt; then the first token and the last max_length - 1
    of the (longer) tokenized sequence are kept."""
    tok = bundle.tokenizer
    texts = [instruction + clean_prompt(p, bundle.family) for p in prompts]
    total = max_length
    if instruction:  # room for the instruction: its tokens minus the BOS/EOS counted twice
        total = len(tok.encode(instruction)) + max_length - 2
    ids = tok(texts, padding="max_length", max_length=total, truncation=True, add_special_tokens=True,
              return_attention_mask=True, return_tensors="pt", padding_side="right")
    input_ids, mask = ids.input_ids.to(bundle.device), ids.attention_mask.to(bundle.device)
    hidden = bundle.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (S, total, C)
    if total != max_length:
        keep = torch.tensor([0, *range(total - max_length + 1, total)], device=hidden.device)
        hidden, mask = hidden[:, keep], mask[:, keep]
    mask = mask.bool()
    embeds = (hidden * mask[..., None].to(hidden.dtype)).to(bundle.dtype)
    return TextEmbeddings(embeds, mask)
