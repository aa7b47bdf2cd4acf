"""The one interface every attention method implements: `forward(q, k, v, meta) -> o`.

q, k, v and o are (B, N, H, D) after RoPE. `meta` is built once per step by the sampler and
reused by every layer (only `layer` and `state` change). Methods never pick kernels themselves:
they get an AttentionBackend at construction and call its primitives.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from pipeline.layout import VideoLayout

if TYPE_CHECKING:
    from pipeline.attention.backends import AttentionBackend
    from pipeline.config import AttentionConfig


@dataclass
class Routing:
    """MoGA routing of every token of the sequence: one group per token, shared by all heads."""

    groups: torch.Tensor  # (B, N) int64 in [0, num_groups)
    gate: torch.Tensor  # (B, N) float32: p(g(x) | x), the output is scaled by it
    num_groups: int
    # What methods derive from this routing alone (a sort by group, its host-side counts), kept for the
    # routing's lifetime (one layer call): head sub-groups of a call and a wrapper's prepare() reuse it.
    plans: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def plan(self, key, build):
        """plans[key], built by build() on first use."""
        if key not in self.plans:
            self.plans[key] = build()
        return self.plans[key]


class StateSlot:
    """One layer's carried state. Owned by the sampler (reset per video, checkpointed per block),
    read and written by the layer's method; the method itself keeps nothing between calls."""

    __slots__ = ("value",)

    def __init__(self, value: Any = None):
        self.value = value


@dataclass
class AttentionMeta:
    layout: VideoLayout  # the whole sequence this call attends over (after any all-to-all)
    step: int = 0  # denoising step within the current block (lite: full steps first)
    layer: int = 0
    routing: Routing | None = None  # moga: per-token groups and gates
    state: StateSlot | None = None  # has_state methods: this layer's carried state
    commit: bool = False  # linear, block mode: add this call's keys/values to the carried state
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # applies_rope methods: (cos, sin) (1, N, 1, D)
    # The slice [start, end) of the layout's sequence that q, k, v hold; None = all of it. Set by
    # context parallelism's "state" strategy, where each rank keeps its own tokens and all heads.
    token_range: tuple[int, int] | None = None
    stats: dict[str, float] = field(default_factory=dict)  # what the last forward computed (pairs, ...)

    def for_layer(self, layer: int, state: StateSlot | None = None) -> "AttentionMeta":
        return replace(self, layer=layer, state=state, stats={})


class AttentionMethod:
    """Base class. Subclasses set the capability flags and implement forward and flops."""

    name: ClassVar[str]
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.bfloat16, torch.float16)
    supports_context_parallel: ClassVar[bool] = True
    # How context parallelism wraps it: "ulysses" (all-to-all to full sequence, H/P heads) or
    # "state" (linear attention: local sums of (S, z) reduced across ranks, no K/V exchange).
    cp_strategy: ClassVar[str] = "ulysses"
    has_state: ClassVar[bool] = False
    needs_routing: ClassVar[bool] = False
    # True: q and k arrive un-rotated and meta.rope holds the rotation (linear attention applies
    # RoPE after its ReLU feature map). False: the caller rotates q and k before forward.
    applies_rope: ClassVar[bool] = False
    # True: its cuDNN SDPA calls take sequence lengths that follow the data (MoGA's group sizes change
    # every layer and step), so each can miss cuDNN's plan cache; see attention/cudnn_env.py.
    cudnn_shapes_follow_data: ClassVar[bool] = False

    def __init__(self, cfg: "AttentionConfig", backend: "AttentionBackend"):
        self.cfg = cfg
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, meta: AttentionMeta) -> None:
        """Launch work that needs meta alone, before q, k, v exist (the self-attention processor calls
        it before the projections; context-parallel wrappers with the whole sequence's meta). It must
        not wait for the GPU: what forward will wait for (MoGA: the group counts on the host) then
        runs ahead of the projections. Results are cached on meta.routing.plans. Default: nothing."""

    def flops(self, meta: AttentionMeta, shape: tuple[int, int, int, int]) -> float:
        """FLOPs of the forward just made with `meta` on q of `shape` (B, N, H, D).

        Counted as 4 * D per computed (query, key) pair and head (QK^T and PV multiply-adds);
        data-dependent methods read the pair count their forward left in meta.stats."""
        b, n, h, d = shape
        return 4.0 * d * meta.stats.get("pairs", b * h * n * n)

    def __call__(self, q, k, v, meta):
        return self.forward(q, k, v, meta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend.name})"


def shards_heads(fn, ring: bool) -> bool:
    """Whether context parallelism splits the heads of `fn` (a registry method, its class, or a
    wrapper with the same flags) over the ranks (Ulysses), so that parallel.degree must divide them:
    all but the state strategy and, with parallel.ring, dense (ring attention). The config's check
    and pipeline.parallel.dit's wrapping both ask this."""
    return fn.cp_strategy != "state" and not (ring and fn.name == "dense")
