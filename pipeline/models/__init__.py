"""Model families over diffusers: loading (loader.py, random_weights.py), prompts (text.py), and the
adapters (adapter.py + processors.py, wan.py, sana.py) that run the transformer in three stages."""

from __future__ import annotations

from pipeline.models.adapter import DiTAdapter, Tokens
from pipeline.models.loader import ModelBundle, load_model, load_vae
from pipeline.models.text import TextEmbeddings, encode_prompts


def build_adapter(bundle: ModelBundle, attention_cfg) -> DiTAdapter:
    """The family's adapter around bundle.transformer, with attention methods from attention_cfg."""
    from pipeline.models.sana import SanaAdapter
    from pipeline.models.wan import WanAdapter

    cls = {"wan": WanAdapter, "sana": SanaAdapter}[bundle.family]
    return cls(bundle.transformer, attention_cfg, bundle.routers_state)


__all__ = ["DiTAdapter", "ModelBundle", "TextEmbeddings", "Tokens", "build_adapter", "encode_prompts", "load_model", "load_vae"]
