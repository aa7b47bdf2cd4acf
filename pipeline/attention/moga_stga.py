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

Two exact routes to the W \\ G term ("cells" unless a method instance forces "bias"):

- "cells" (the default; anywhere, autograd included): W \\ G is not a segment, so its sums are
  taken as those of W minus those of the cell C(i) = W(i) ∩ G(i): Z_{W\\G} o_{W\\G} = Z_W o_W - Z_C o_C.
  All three branches (groups, windows, cells) are plain segment attentions returning lse; Z_C <= Z_W
  and Z_C <= Z_G, so the combination never divides by less than the largest partial sum. Extra
  work: the cells, sum_c n_c^2 <= sum_w n_w^2.
- "bias" (equal windows, no text, no autograd): the windows run as ONE batched dense call (STGA's
  fast path) with an additive bias of -1e30 on the keys of the query's own group, so the branch
  attends to W \\ G itself (exp of a biased logit is exactly 0 in fp32; a query whose whole window
  is in its group gets lse ~ -1e30, i.e. weight 0). No cells, a plain two-way merge, but a bias of
  (windows, w, w) in q's dtype: 467 MB at 150k tokens, 1.8 GB at 580k.

Measured on the same inputs (jobs/bench_attention.py times both), cells was as fast or faster in 3
of 4 runs (H100 150k: 54.80 vs 54.96 ms, 580k: 779.0 vs 786.6 ms; H200 150k: 53.22 vs 55.42 ms;
bias ahead by 0.55 ms once, at 150k before the host-overhead work), and it allocates no bias.

Tokens are sorted once by (batch row, group, window): groups and cells are contiguous segments of
one gather. The merge weights (with the gate folded in) are formed on the small (T, H) lse tensors;
the big tensors meet once, in backends/merge.py's merge_rows (one Triton pass on CUDA: read o_G,
o_W [and o_C], write the output in sequence order).
"""

from __future__ import annotations

import torch

from pipeline.attention.backends.merge import merge_rows
from pipeline.attention.backends.rows import take_rows
from pipeline.attention.base import AttentionMeta, AttentionMethod, Routing
from pipeline.attention.moga import Permutation, check_routing, group_segments
from pipeline.attention.stga import StgaWindows, from_windows, lse_from_windows, to_windows, window_attention, window_ids

MASKED = -1e30  # additive bias on excluded keys: exp(s - 1e30 - max) is exactly 0 in fp32
BIAS_BYTES = 1 << 31  # windows per dense call in the "bias" route: the bias stays under 2 GiB
_ALIGN = 16  # bias rows padded to 16 elements (the memory-efficient kernel's alignment; cuDNN is indifferent)


def window_minus_group(backend, q, k, v, windows: StgaWindows, groups: torch.Tensor):
    """Attention of every query over the keys of its window that are NOT in its group (W \\ G), equal
    windows only. q, k, v (B, N, H, D), groups (B, N) -> o (B, N, H, D), lse (B, N, H) fp32, sequence
    order; rows whose window lies inside their group get lse ~ -1e30 (and an o that carries no weight)."""
    b, n, h, d = q.shape
    count, size = b * windows.count, n // windows.count
    qw, kw, vw = (to_windows(x, windows.grid).view(count, size, h, d) for x in (q, k, v))  # (S, w, H, D) views
    gw = to_windows(groups[:, :, None, None], windows.grid).view(count, size)
    padded = -(-size // _ALIGN) * _ALIGN
    per = max(1, BIAS_BYTES // (size * padded * q.element_size()))
    masked, zero = (torch.full((), x, dtype=q.dtype, device=q.device) for x in (MASKED, 0.0))
    outs, lses = [], []
    for a in range(0, count, per):
        g = gw[a:a + per]
        bias = q.new_empty(g.shape[0], 1, size, padded)[..., :size]  # (s, 1, w, w), rows 16-aligned
        torch.where(g[:, None, :, None] == g[:, None, None, :], masked, zero, out=bias)
        o, lse = backend.dense_lse(qw[a:a + per], kw[a:a + per], vw[a:a + per], bias)
        outs.append(o)
        lses.append(lse)
    o = outs[0] if len(outs) == 1 else torch.cat(outs)  # (S, w, H, D)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses)  # (S, w, H)
    return (from_windows(o.reshape(-1, h, d), windows.grid, b),
            lse_from_windows(lse.reshape(-1, h).T, windows.grid, b))


class MogaStgaAttention(AttentionMethod):
    name = "moga+stga"
    needs_routing = True
    cudnn_shapes_follow_data = True  # dense calls per group and per cell: lengths follow the router
    # merge = lse: the route to W \\ G (module docstring); "bias" can be forced on an instance, as
    # jobs/bench_attention.py does to time one against the other on the same inputs.
    route: str = "cells"

    def windows(self, layout, device: torch.device | str = "cpu") -> StgaWindows:
        return window_ids(layout, self.cfg.stga.window, self.cfg.stga.cross_shots, device)

    def prepare(self, meta: AttentionMeta) -> None:
        if meta.routing is not None:
            device = meta.routing.groups.device
            self.permutation(meta.routing, self.windows(meta.layout, device))  # launched, not waited for

    @staticmethod
    def permutation(routing: Routing, windows: StgaWindows) -> Permutation:
        """One sort by (batch row, group, window): groups and cells are both contiguous runs. Once per
        routing and window set (head sub-groups and prepare() share it)."""
        b, m, nw = routing.groups.shape[0], routing.num_groups, windows.count

        def build():
            cell = group_segments(routing) * nw + windows.token_window.repeat(b)  # (B * N,)
            return Permutation.by_segment(cell, b * m * nw)

        return routing.plan(("cells", id(windows)), build)

    def forward(self, q, k, v, meta: AttentionMeta):
        routing = check_routing(meta, q.shape, self.name)
        b, n, h, _ = q.shape
        windows = self.windows(meta.layout, q.device)
        if windows.token_window.numel() != n:
            raise ValueError(f"moga+stga: q holds {n} tokens but the layout has {windows.token_window.numel()}")
        nw = windows.count
        perm = self.permutation(routing, windows)
        qs, ks, vs = perm.gather(q), perm.gather(k), perm.gather(v)  # (B * N, H, D), queued before the sync
        gate = routing.gate.reshape(-1).index_select(0, perm.order)  # (B * N,) fp32, group order
        group_cu = perm.cu_seqlens[::nw].contiguous()  # a group's cells are consecutive: every nw-th offset

        # The window branch needs no host-side value (its shapes come from the layout), so it is queued
        # before the counts are read: the GPU runs it while the host waits, instead of idling between
        # the gathers and the group calls (that gap was ~2-3 ms of a 55 ms layer at 150k on an H100).
        route = None
        if self.cfg.merge == "sum":
            o_window = window_attention(self.backend, q, k, v, windows)
        else:
            needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, routing.gate))
            route = self.route
            if route not in ("bias", "cells") or (route == "bias" and (windows.grid is None or needs_grad)):
                raise ValueError(f"moga+stga: route {route!r} cannot run here (bias: equal windows, no text, "
                                 f"no autograd; cells: anywhere)")
            if route == "bias":  # over W minus G: the group ids are on the device already
                o_window, lse_window = window_minus_group(self.backend, q, k, v, windows, routing.groups)
            else:
                o_window, lse_window = window_attention(self.backend, q, k, v, windows, return_lse=True)

        cell_counts = perm.counts  # the call's one host sync (a pinned copy)
        group_counts = [sum(cell_counts[i:i + nw]) for i in range(0, len(cell_counts), nw)]
        window_pairs = windows.pairs(b, 1, text_rule=False)
        group_pairs = float(sum(c * c for c in group_counts))
        cell_pairs = float(sum(c * c for c in cell_counts))

        if route is None:  # merge = "sum"
            o_group = self.backend.segments(qs, ks, vs, group_cu, counts=group_counts, out_scale=gate)
            o = perm.scatter(o_group, q.shape) + o_window
            pairs, computed = group_pairs + window_pairs, group_pairs + window_pairs
        else:
            o_group, lse_group = self.backend.segments(qs, ks, vs, group_cu, True, group_counts)  # group order
            if route == "bias":
                o_cell = lse_cell = None
                computed = group_pairs + window_pairs
            else:
                o_cell, lse_cell = self.backend.segments(qs, ks, vs, perm.cu_seqlens, True, cell_counts)
                computed = group_pairs + window_pairs + cell_pairs
            o = self._merge(perm, gate, q.shape, (o_group, lse_group.T), (o_window, lse_window),
                            None if o_cell is None else (o_cell, lse_cell.T))
            pairs = group_pairs + window_pairs - cell_pairs
        meta.stats.update(pairs=pairs * h, density=pairs / (b * n * n), kernel_pairs=computed * h,
                          largest_group=max(group_counts) / n)
        return o  # (B, N, H, D)

    @staticmethod
    def _merge(perm: Permutation, gate: torch.Tensor, shape, group, window, cell) -> torch.Tensor:
        """gate * (Z_G o_G + Z_W o_W [- Z_C o_C]) / (Z_G + Z_W [- Z_C]).

        group, cell: (o (T, H, D), lse (T, H)) in group order; window: (o (B, N, H, D), lse (B, N, H))
        in sequence order (over W, or over W \\ G when cell is None)."""
        (o_group, lse_group), (o_window, lse_window) = group, window
        b, n, h, _ = shape
        lse_window = take_rows(lse_window.reshape(b * n, h), perm.order)  # (T, H), group order
        top = torch.maximum(lse_group, lse_window)
        z_group, z_window = torch.exp(lse_group - top), torch.exp(lse_window - top)
        total = z_group + z_window
        if cell is not None:
            z_cell = torch.exp(cell[1] - top)
            total = total - z_cell  # >= max(z_group, z_window) up to rounding, so >= ~1
        norm = gate[:, None] / total  # (T, H) fp32, the gate folded in
        weight_window = take_rows(z_window * norm, perm.inverse)  # (T, H), sequence order
        out = merge_rows(o_group, z_group * norm, o_window.reshape(b * n, h, -1), weight_window, perm.inverse,
                         None if cell is None else cell[0], None if cell is None else z_cell * norm)
        return out.view(shape)  # (B, N, H, D)
