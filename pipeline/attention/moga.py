"""Mixture of Groups Attention (MoGA): a learned router sends every token to one of M groups;
attention runs inside each group only; the output is scaled by the router's gate.

    p(i | x) = softmax(W_r x)_i              W_r: Linear(C, M, bias=False) on the hidden state x (B, N, C)
    g(x)     = argmax_i p(i | x)             one group per token, shared by all heads
    o(x)     = p(g(x) | x) * softmax(q K_g^T / sqrt(D)) V_g      K_g, V_g: keys/values of group g(x)
    L_gb     = alpha * M * sum_i F_i * P_i   F_i = fraction of tokens routed to i, P_i = mean p(i | x)

The gate is what gives the router a gradient through the hard argmax; L_gb (alpha * 1 for
perfectly balanced routing, up to alpha * M when it collapses) is returned for training.

Execution (the groups of the FULL sequence the call attends over, batch rows kept apart):
stable sort of the tokens by (batch row, group) -> cu_seqlens (an empty group is a zero-length
segment) -> one row gather per tensor (rows moved as 8-byte words, backends/rows.py) -> the
backend's segments primitive (one cuDNN call per large group, varlen for many small ones), which
multiplies by the gate while it packs the groups' outputs -> inverse permutation. One read of the
group sizes per call (a pinned copy the host waits for only after the gathers are queued), no
per-group synchronisation. Memory traffic beyond the kernels: three
gathers and two passes over o (pack with the gate, unpermute).

Training-free use: kmeans_init sets the router's rows to spherical k-means centroids of a
layer's hidden states (the adapter does it on a video's first step and then keeps the router
frozen for that video).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attention.backends.rows import segment_counts, take_rows
from pipeline.attention.backends.segments import cu_seqlens_from_counts
from pipeline.attention.base import AttentionMeta, AttentionMethod, Routing

KMEANS_SAMPLES = 8192  # tokens k-means looks at (evenly spaced over the batch and the sequence)
KMEANS_SHARPNESS = 16.0  # router logits = sharpness * cos(x, centroid) * |x| / mean|x|


def group_balance_loss(probs: torch.Tensor, groups: torch.Tensor, alpha: float) -> torch.Tensor:
    """L_gb = alpha * M * sum_i F_i * P_i over all tokens; probs (B, N, M) fp32, groups (B, N)."""
    m = probs.shape[-1]
    fraction = segment_counts(groups.flatten(), m).float() / groups.numel()  # F_i (no gradient)
    mean_prob = probs.reshape(-1, m).mean(0)  # P_i
    return alpha * m * (fraction * mean_prob).sum()


class MoGARouter(nn.Module):
    """Linear(dim, num_groups, bias=False) -> fp32 softmax -> top-1 group shared by all heads."""

    def __init__(self, dim: int, num_groups: int, balance_weight: float = 1e-3):
        super().__init__()
        self.proj = nn.Linear(dim, num_groups, bias=False)
        self.num_groups = num_groups
        self.balance_weight = balance_weight

    def forward(self, hidden: torch.Tensor) -> tuple[Routing, torch.Tensor]:
        """hidden (B, N, C) -> (Routing of every token, L_gb scalar)."""
        # logits in the hidden state's dtype (no fp32 copy of (B, N, C)), softmax in fp32. The weight is
        # padded with zero rows to 8 outputs: with M = 5 the logits' rows are 10 bytes, and cuBLAS falls
        # back to an unaligned sm75 kernel (0.48 ms for one read of (150k, 1536) on an H100).
        weight = self.proj.weight.to(hidden.dtype)
        m = self.num_groups
        weight = F.pad(weight, (0, 0, 0, -m % 8))
        probs = F.linear(hidden, weight)[..., :m].float().softmax(-1)  # (B, N, M)
        gate, groups = probs.max(-1)
        return (Routing(groups=groups, gate=gate, num_groups=self.num_groups),
                group_balance_loss(probs, groups, self.balance_weight))


@torch.no_grad()
def kmeans_init(router: MoGARouter, hidden: torch.Tensor, iters: int) -> None:
    """Set the router's rows to spherical k-means centroids of hidden (B, N, C).

    Spherical because the router has no bias: argmax_i c_i . x over unit centroids is the nearest
    centroid in angle, so routing agrees with the clustering. Deterministic (evenly spaced samples,
    evenly spaced initial centroids): every rank that sees the same tokens gets the same router.
    The rows are scaled so that logits are sharp (gates near 1: a pretrained layer's output is
    barely damped by the gate)."""
    c = hidden.shape[-1]
    m = router.num_groups
    flat = hidden.reshape(-1, c)
    pick = torch.linspace(0, flat.shape[0] - 1, min(KMEANS_SAMPLES, flat.shape[0]), device=flat.device).long()
    x = flat[pick].float()  # (S, C)
    mean_norm = x.norm(dim=-1).mean().clamp_min(1e-12)
    x = F.normalize(x, dim=-1)
    centroids = x[torch.linspace(0, x.shape[0] - 1, m, device=x.device).long()].clone()  # (M, C)
    for _ in range(iters):
        assign = (x @ centroids.T).argmax(-1)  # (S,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=m)
        centroids = torch.where((counts > 0)[:, None], F.normalize(sums, dim=-1), centroids)  # empty: keep
    router.proj.weight.copy_(centroids * (KMEANS_SHARPNESS / mean_norm))


class Permutation:
    """Tokens of the flattened (B * N) sequence sorted by segment, and the way back.

    order (B * N,) int64: sorted position -> token; inverse: token -> sorted position; cu_seqlens
    (S + 1,) int32 on the device; counts: tokens per segment as Python ints. Reading counts is the
    one host sync of a call, so on CUDA it is a non-blocking copy into pinned memory started here
    and waited for on first use: a caller that launches its gathers first (MoGA does) keeps the GPU
    busy while the host waits, instead of the GPU idling while the host launches them."""

    def __init__(self, order: torch.Tensor, inverse: torch.Tensor, count_t: torch.Tensor,
                 counts: list[int] | None = None):
        """counts: the host's copy of count_t when the caller knows it (no copy back, no sync)."""
        self.order, self.inverse = order, inverse
        self.cu_seqlens = cu_seqlens_from_counts(count_t)
        self._counts: list[int] | None = counts
        self._ready: torch.cuda.Event | None = None
        if counts is not None:
            self._host = None
        elif count_t.is_cuda:
            self._host = torch.empty(count_t.shape, dtype=count_t.dtype, pin_memory=True)
            self._host.copy_(count_t, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = count_t

    @classmethod
    def by_segment(cls, segment: torch.Tensor, num_segments: int, counts: list[int] | None = None) -> "Permutation":
        """segment (B * N,) int64 in [0, num_segments): stable sort (sequence order inside a segment).
        counts: the tokens per segment when the host knows them already (STGA's windows)."""
        order = torch.argsort(segment, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        if counts is not None:
            if len(counts) != num_segments or sum(counts) != segment.numel():
                raise ValueError(f"Permutation: {len(counts)} counts summing to {sum(counts)} for {num_segments} "
                                 f"segments of {segment.numel()} tokens")
            return cls(order, inverse, torch.tensor(counts, dtype=torch.int64).to(segment.device), list(counts))
        return cls(order, inverse, segment_counts(segment, num_segments))

    @property
    def counts(self) -> list[int]:
        if self._counts is None:
            if self._ready is not None:
                self._ready.synchronize()
            self._counts = self._host.tolist()
        return self._counts

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, ...) -> (B * N, ...) in segment order (one row gather)."""
        return take_rows(x.reshape(-1, *x.shape[2:]), self.order)

    def scatter(self, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """(B * N, ...) in segment order -> `shape` (B, N, ...) in sequence order."""
        return take_rows(x, self.inverse).view(shape)

    def pairs(self) -> int:
        return sum(c * c for c in self.counts)


def group_segments(routing: Routing) -> torch.Tensor:
    """(B * N,) segment id = batch row * M + group: batch rows never mix."""
    b, n = routing.groups.shape
    rows = torch.arange(b, device=routing.groups.device)[:, None] * routing.num_groups
    return (rows + routing.groups).flatten()


def check_routing(meta: AttentionMeta, shape: torch.Size, who: str) -> Routing:
    routing = meta.routing
    if routing is None:
        raise ValueError(f"{who}: meta.routing is None; the layer's MoGARouter must route the hidden states first")
    if tuple(routing.groups.shape) != tuple(shape[:2]) or tuple(routing.gate.shape) != tuple(shape[:2]):
        raise ValueError(f"{who}: routing covers {tuple(routing.groups.shape)} tokens, q is {tuple(shape[:2])} "
                         f"(routing must cover the full sequence the call attends over)")
    return routing


def gated(o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """o (B, N, H, D) * gate (B, N) in o's dtype (the gate keeps its gradient)."""
    return o * gate.to(o.dtype)[:, :, None, None]


class MoGAAttention(AttentionMethod):
    name = "moga"
    needs_routing = True
    cudnn_shapes_follow_data = True  # one dense call per group: lengths follow the router

    def prepare(self, meta: AttentionMeta) -> None:
        if meta.routing is not None:
            self.permutation(meta.routing)  # the sort, and its counts' copy to the host, launched

    @staticmethod
    def permutation(routing: Routing) -> Permutation:
        """Tokens sorted by group: once per routing (head sub-groups and prepare() share it)."""
        b = routing.groups.shape[0]
        return routing.plan("moga", lambda: Permutation.by_segment(group_segments(routing), b * routing.num_groups))

    def forward(self, q, k, v, meta: AttentionMeta):
        routing = check_routing(meta, q.shape, self.name)
        b, n, h, _ = q.shape
        perm = self.permutation(routing)
        gate = routing.gate.reshape(-1).index_select(0, perm.order)  # (B * N,) in group order
        qs, ks, vs = perm.gather(q), perm.gather(k), perm.gather(v)  # launched before the counts are read
        o = self.backend.segments(qs, ks, vs, perm.cu_seqlens, counts=perm.counts,
                                  out_scale=gate)  # (B * N, H, D) grouped, gated
        pairs = perm.pairs() * h
        meta.stats.update(pairs=float(pairs), density=pairs / (b * h * n * n),
                          largest_group=max(perm.counts) / n)
        return perm.scatter(o, q.shape)  # (B, N, H, D)
