"""Attention methods behind one interface (see base.py) and one registry."""

from __future__ import annotations

import torch

from pipeline.attention.backends import AttentionBackend, select_backend
from pipeline.attention.base import AttentionMeta, AttentionMethod, Routing, StateSlot
from pipeline.attention.dense import DenseAttention
from pipeline.attention.linear import LinearAttention
from pipeline.attention.lite import LiteAttention
from pipeline.attention.moc import MocAttention
from pipeline.attention.moga import MoGAAttention
from pipeline.attention.moga_stga import MogaStgaAttention
from pipeline.attention.stga import StgaAttention

METHODS: dict[str, type[AttentionMethod]] = {
    cls.name: cls for cls in (DenseAttention, MoGAAttention, StgaAttention, MogaStgaAttention, MocAttention,
                              LiteAttention, LinearAttention)}


def method_names() -> list[str]:
    return sorted(METHODS)


def build_method(cfg, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 name: str | None = None) -> AttentionMethod:
    """The method `name` (default cfg.method) with a backend for (device, dtype)."""
    name = name or cfg.method
    if name not in METHODS:
        raise ValueError(f"attention.method: unknown method {name!r} (known: {', '.join(method_names())})")
    cls = METHODS[name]
    if dtype not in cls.dtypes:
        raise ValueError(f"attention.method: {name} does not support {dtype}")
    return cls(cfg, select_backend(cfg.backend, device, dtype))


__all__ = ["AttentionBackend", "AttentionMeta", "AttentionMethod", "METHODS", "Routing", "StateSlot",
           "build_method", "method_names", "select_backend"]
