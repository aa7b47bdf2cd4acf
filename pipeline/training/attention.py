"""Training-time stand-ins for sparse attention methods: the same function as masked dense attention.

The registry's moga+stga is built for long sequences at inference: tokens sorted into groups and
windows, one kernel per segment, and with the exact LSE merge a custom backward that loops over
segments. A tiny model trains on ~800-token videos at batch 64: there that is ~5,000 segments per
layer, each a handful of small kernels in the backward, while the dense attention of the whole
sequence costs next to nothing. So the twin trains with MaskedMogaStga, which computes the same
outputs (and gradients, router gate included) with one masked SDPA call per branch, and samples
with the registry's method. tests/test_train_tiny.py checks the two against each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.attention.base import AttentionMeta, AttentionMethod
from pipeline.attention.moga import check_routing, gated
from pipeline.attention.stga import window_ids


def _masked(q, k, v, mask):
    """q, k, v (B, N, H, D); mask (B, N, N) bool -> (B, N, H, D)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask[:, None])
    return o.transpose(1, 2)


class MaskedMogaStga(AttentionMethod):
    """moga+stga (pipeline.attention.moga_stga) as masked dense attention, for short sequences."""

    name = "moga+stga"
    needs_routing = True

    def forward(self, q, k, v, meta: AttentionMeta):
        routing = check_routing(meta, q.shape, self.name)
        windows = window_ids(meta.layout, self.cfg.stga.window, self.cfg.stga.cross_shots, q.device)
        if windows.has_text:
            raise ValueError("MaskedMogaStga: layouts with text tokens in the sequence are not supported")
        groups = routing.groups  # (B, N)
        same_group = groups[:, :, None] == groups[:, None, :]  # (B, N, N)
        same_window = (windows.token_window[:, None] == windows.token_window[None, :])[None]  # (1, N, N)
        if self.cfg.merge == "sum":
            o = gated(_masked(q, k, v, same_group), routing.gate) + _masked(q, k, v, same_window.expand_as(same_group))
        else:  # one softmax over group ∪ window, then the gate
            o = gated(_masked(q, k, v, same_group | same_window), routing.gate)
        return o  # (B, N, H, D)


TRAINING_METHODS: dict[str, type[AttentionMethod]] = {MaskedMogaStga.name: MaskedMogaStga}
