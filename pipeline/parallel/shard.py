"""How one sequence is cut into P contiguous shards, and the collectives that cut and join it.

Rank r holds tokens [r * L, (r + 1) * L) of the sequence padded to P * L tokens, where L is the
number of whole units (1 token for Wan; one latent frame of tokens for SANA-Video, whose Mix-FFN
convolves within frames) per rank, rounded up. Pad tokens sit at the end of the last ranks'
shards; every attention wrapper keeps them out of its results, and gather() drops them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.layout import VideoLayout
from pipeline.parallel.groups import ParallelContext

# torch >= 2.13 names it all_gather_single (all_gather_into_tensor warns there); 2.11 has only the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class ShardPlan:
    """The cut of a `num_tokens`-token sequence over `world` ranks in units of `unit` tokens."""

    num_tokens: int  # real tokens N
    world: int
    unit: int = 1  # tokens per indivisible unit (tokens per frame when sharding on frames)

    def __post_init__(self) -> None:
        if self.num_tokens < 1 or self.world < 1 or self.unit < 1 or self.num_tokens % self.unit:
            raise ValueError(f"ShardPlan: {self.num_tokens} tokens do not split into units of {self.unit} "
                             f"over {self.world} ranks")

    @property
    def units(self) -> int:
        return self.num_tokens // self.unit

    @property
    def local_units(self) -> int:
        return -(-self.units // self.world)

    @property
    def local_len(self) -> int:
        """L: tokens every rank holds, pad included."""
        return self.local_units * self.unit

    @property
    def padded(self) -> int:
        return self.local_len * self.world

    @property
    def pad(self) -> int:
        return self.padded - self.num_tokens

    def token_range(self, rank: int) -> tuple[int, int]:
        """[start, end) of the real tokens rank `rank` holds (start == end: only pad)."""
        start = min(rank * self.local_len, self.num_tokens)
        return start, min(start + self.local_len, self.num_tokens)

    def real_len(self, rank: int) -> int:
        start, end = self.token_range(rank)
        return end - start

    def unit_range(self, rank: int) -> tuple[int, int]:
        """[first, last) real units (frames) rank `rank` holds."""
        start, end = self.token_range(rank)
        return start // self.unit, end // self.unit


def plan_for(layout: VideoLayout, world: int, by_frames: bool) -> ShardPlan:
    """The cut of `layout`'s sequence: on whole latent frames (SANA-Video) or on tokens (Wan)."""
    if by_frames:
        if layout.text_tokens:
            raise ValueError(f"ShardPlan: frame sharding needs a video-only layout (text_tokens={layout.text_tokens})")
        return ShardPlan(layout.num_tokens, world, layout.tokens_per_frame)
    return ShardPlan(layout.num_tokens, world)


def plan_of_shard(layout: VideoLayout, world: int, n_local: int) -> ShardPlan:
    """The cut (token or frame) under which a rank holds `n_local` tokens of `layout`."""
    cuts = [plan_for(layout, world, False)] + ([plan_for(layout, world, True)] if not layout.text_tokens else [])
    for plan in cuts:
        if plan.local_len == n_local:
            return plan
    raise ValueError(f"parallel: a shard of {n_local} tokens is not a {world}-way cut of the layout's "
                     f"{layout.num_tokens} tokens (expected one of {sorted({c.local_len for c in cuts})})")


def pad_to(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """x with zeros appended along `dim` up to `length` (x itself when already that long)."""
    extra = length - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim)


def shard(x: torch.Tensor, plan: ShardPlan, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's shard (L tokens along `dim`, zero pad at the end) of the full sequence x."""
    if x.shape[dim] != plan.num_tokens:
        raise ValueError(f"shard: dim {dim} of {tuple(x.shape)} is not the plan's {plan.num_tokens} tokens")
    start, end = plan.token_range(rank)
    return pad_to(x.narrow(dim, start, end - start), plan.local_len, dim).contiguous()


def all_gather_seq(x: torch.Tensor, ctx: ParallelContext, dim: int = 1) -> torch.Tensor:
    """Concatenate every rank's equal-length x along `dim`, in rank order (pad kept)."""
    if ctx.world == 1:
        return x
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((ctx.world * x.shape[0],) + tuple(x.shape[1:]))
    _all_gather_single(out, x, group=ctx.group)
    return out.movedim(0, dim)


def gather(x: torch.Tensor, plan: ShardPlan, ctx: ParallelContext, dim: int = 1) -> torch.Tensor:
    """The full sequence (pad dropped) from every rank's shard of it."""
    if x.shape[dim] != plan.local_len:
        raise ValueError(f"gather: dim {dim} of {tuple(x.shape)} is not the plan's {plan.local_len}-token shard")
    return all_gather_seq(x, ctx, dim).narrow(dim, 0, plan.num_tokens)
