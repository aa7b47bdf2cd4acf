"""SANA-Video's temporal convolution across frame shards: a one-frame halo from each neighbour.

GLUMBTempConv (the Mix-FFN of every SANA-Video block) ends with conv_temp, a (3, 1) convolution
over latent frames of (B, C, T, H*W) with zero padding of one frame. When ranks hold contiguous
whole frames, the first and last frame of a shard need one frame from the previous and next rank;
everything else in the Mix-FFN works within a frame. Pad frames (past the video's last frame) are
zeroed before the exchange, so they read as the zero padding the single-rank conv sees.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.parallel.groups import ParallelContext
from pipeline.parallel.shard import ShardPlan


def exchange_halo(x: torch.Tensor, ctx: ParallelContext) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, C, T, S) -> (previous rank's last frame, next rank's first frame), each (B, C, 1, S);
    zeros where there is no neighbour."""
    first, last = x[:, :, :1].contiguous(), x[:, :, -1:].contiguous()
    before, after = torch.zeros_like(first), torch.zeros_like(last)
    ops = []
    if ctx.rank > 0:
        prev = ctx.peer(ctx.rank - 1)
        ops += [dist.P2POp(dist.isend, first, prev, ctx.group), dist.P2POp(dist.irecv, before, prev, ctx.group)]
    if ctx.rank < ctx.world - 1:
        nxt = ctx.peer(ctx.rank + 1)
        ops += [dist.P2POp(dist.isend, last, nxt, ctx.group), dist.P2POp(dist.irecv, after, nxt, ctx.group)]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return before, after


class HaloTemporalConv(nn.Module):
    """Drop-in for a GLUMBTempConv's conv_temp (Conv2d, kernel (3, 1), padding (1, 0)) on a frame shard.

    `current_plan` returns the shard plan of the forward in progress (which frames of this rank's
    shard are real); it is read at each call because the sequence length changes per block."""

    def __init__(self, conv: nn.Conv2d, ctx: ParallelContext, current_plan: Callable[[], ShardPlan]):
        super().__init__()
        if conv.kernel_size != (3, 1) or conv.padding != (1, 0) or conv.stride != (1, 1) or conv.dilation != (1, 1):
            raise ValueError(f"HaloTemporalConv: expected a (3, 1) conv with padding (1, 0), got {conv}")
        self.conv, self.ctx, self.current_plan = conv, ctx, current_plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T_local, H*W) -> conv_temp(x) of the whole video, restricted to this shard's frames."""
        first, last = self.current_plan().unit_range(self.ctx.rank)
        real = last - first
        if real < x.shape[2]:
            x = torch.cat([x[:, :, :real], x.new_zeros(x.shape[:2] + (x.shape[2] - real, x.shape[3]))], 2)
        before, after = exchange_halo(x, self.ctx)
        return F.conv2d(torch.cat([before, x, after], 2), self.conv.weight, self.conv.bias)
