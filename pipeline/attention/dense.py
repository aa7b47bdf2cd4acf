"""Full softmax attention: the baseline every sparse method is measured against."""

from __future__ import annotations

from pipeline.attention.base import AttentionMethod, AttentionMeta


class DenseAttention(AttentionMethod):
    name = "dense"

    def forward(self, q, k, v, meta: AttentionMeta):
        return self.backend.dense(q, k, v)  # (B, N, H, D)
