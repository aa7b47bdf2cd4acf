"""Exponential moving average of a module's parameters (what the tiny model ships and samples with)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param after each optimiser step, in fp32; the decay
    ramps up as (1 + n) / (10 + n) over the first updates so early weights fade fast."""

    def __init__(self, module: nn.Module, decay: float):
        self.module, self.decay = module, decay
        self.params = dict(module.named_parameters())
        self.shadow = {k: p.detach().clone().float() for k, p in self.params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        keys = list(self.params)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [self.params[k].detach().float() for k in keys],
                             1.0 - decay)

    @contextmanager
    def applied(self):
        """Within the block the module holds the averaged weights (eval mode); then its own again."""
        raw = {k: p.detach().clone() for k, p in self.params.items()}
        was_training = self.module.training
        self.copy_to_module()
        self.module.eval()
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(raw[k])
            self.module.train(was_training)

    @torch.no_grad()
    def copy_to_module(self) -> None:
        for k, p in self.params.items():
            p.copy_(self.shadow[k])

    def state(self, dtype: torch.dtype = torch.float32) -> dict:
        return {"updates": self.updates, "shadow": {k: v.to("cpu", dtype) for k, v in self.shadow.items()}}

    @torch.no_grad()
    def load_state(self, state: dict) -> None:
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v.float())
        self.updates = int(state["updates"])
