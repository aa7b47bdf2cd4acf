"""MoGA's layer: the group branch (semantic, learned routing) and the window branch (local STGA
windows) in one attention.

Definitions, for a query i with group G(i) (its batch row's tokens routed to g(i)) and window W(i)
(window_ids(layout, stga.window, stga.cross_shots); text tokens, when present, form one window of
their own, so text reaches video queries through the groups):

  merge = "lse": o_i = p(g(i)|x_i) * softmax over the UNION G(i) ∪ W(i) of q_i k_j / sqrt(D), times v.
                 One softmax: every key of the union counts once.
  merge = "sum": o_i = p(g(i)|x_i) * attn(q_i, G(i)) + attn(q_i, W(i)), two separate softmaxes.

The union is split into disjoint key sets, G(i) and W(i) \\ G(i), and the two partial attentions are
merged by log-sum-exp: with Z_S = sum_{j in S} exp(s_ij) and o_S the attention over S,

    o_union = (Z_G o_G + Z_{W\\G} o_{W\\G}) / (Z_G + Z_{W\\G}).

W(i) \\ G(i) is not a segment (it is a window with the query's own cell cut out), so its sums come
from two segment attentions that are: Z_{W\\G} o_{W\\G} = Z_W o_W - Z_C o_C with C(i) = W(i) ∩ G(i)
the query's cell. All three branches (groups, windows, cells) are plain segment attentions returning
lse, no masks: tokens are sorted once by (batch row, group, window), which makes both the groups and
the cells contiguous segments of one gather; windows use STGA's batched fast path when it applies.
Z_C <= Z_W and Z_C <= Z_G, so the combination never divides by less than the largest partial sum
(no cancellation beyond the output dtype's rounding). Extra work over the union: the cells,
sum_c n_c^2 <= sum_w n_w^2 (a few % of the pairs at 150k+ tokens).
"""

from __future__ import annotations

import torch

from pipeline.attention.base import AttentionMeta, AttentionMethod
from pipeline.attention.moga import Permutation, check_routing, gated, group_segments
from pipeline.attention.stga import StgaWindows, window_attention, window_ids
from pipeline.attention.backends.segments import cu_seqlens_from_counts


def _sorted_lse(lse: torch.Tensor, perm: Permutation, batch: int, n: int) -> torch.Tensor:
    """(H, B * N) in segment order -> (B, N, H) in sequence order."""
    return lse.index_select(1, perm.inverse).T.reshape(batch, n, -1)


class MogaStgaAttention(AttentionMethod):
    name = "moga+stga"
    needs_routing = True

    def windows(self, layout, device: torch.device | str = "cpu") -> StgaWindows:
        return window_ids(layout, self.cfg.stga.window, self.cfg.stga.cross_shots, device)

    def forward(self, q, k, v, meta: AttentionMeta):
        routing = check_routing(meta, q.shape, self.name)
        b, n, h, _ = q.shape
        windows = self.windows(meta.layout, q.device)
        if windows.token_window.numel() != n:
            raise ValueError(f"moga+stga: q holds {n} tokens but the layout has {windows.token_window.numel()}")
        m, nw = routing.num_groups, windows.count
        # one sort by (batch row, group, window): groups and cells are both contiguous runs
        cell = group_segments(routing) * nw + windows.token_window.repeat(b)  # (B * N,)
        perm = Permutation.by_segment(cell, b * m * nw)
        cell_counts = perm.counts
        group_counts = [sum(cell_counts[i:i + nw]) for i in range(0, len(cell_counts), nw)]
        qs, ks, vs = perm.gather(q), perm.gather(k), perm.gather(v)  # (B * N, H, D)
        group_cu = cu_seqlens_from_counts(torch.tensor(group_counts, device=q.device))
        window_pairs = windows.pairs(b, 1, text_rule=False)
        group_pairs = float(sum(c * c for c in group_counts))
        cell_pairs = float(sum(c * c for c in cell_counts))

        if self.cfg.merge == "sum":
            o_group = perm.scatter(self.backend.segments(qs, ks, vs, group_cu, counts=group_counts), q.shape)
            o = gated(o_group, routing.gate) + window_attention(self.backend, q, k, v, windows)
            pairs, computed = group_pairs + window_pairs, group_pairs + window_pairs
        else:
            o_group, lse_group = self.backend.segments(qs, ks, vs, group_cu, True, group_counts)
            o_cell, lse_cell = self.backend.segments(qs, ks, vs, perm.cu_seqlens, True, cell_counts)
            o_group, o_cell = perm.scatter(o_group, q.shape), perm.scatter(o_cell, q.shape)
            lse_group, lse_cell = _sorted_lse(lse_group, perm, b, n), _sorted_lse(lse_cell, perm, b, n)
            o_window, lse_window = window_attention(self.backend, q, k, v, windows, return_lse=True)
            top = torch.maximum(lse_group, lse_window)  # (B, N, H)
            z_group, z_window, z_cell = (torch.exp(x - top) for x in (lse_group, lse_window, lse_cell))
            total = z_group + z_window - z_cell  # >= max(z_group, z_window) up to rounding, so >= ~1
            weight = lambda z: (z / total).to(q.dtype)[..., None]  # (B, N, H, 1)
            o = o_group * weight(z_group) + o_window * weight(z_window) - o_cell * weight(z_cell)
            o = gated(o, routing.gate)
            pairs, computed = group_pairs + window_pairs - cell_pairs, group_pairs + window_pairs + cell_pairs
        meta.stats.update(pairs=pairs * h, density=pairs / (b * n * n), kernel_pairs=computed * h,
                          largest_group=max(group_counts) / n)
        return o  # (B, N, H, D)
