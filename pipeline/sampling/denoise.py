"""The denoising loop of one block: flow matching, classifier-free guidance batched in one call.

A Denoiser belongs to one video (make one per video; it is cheap): it encodes the video's prompts
once and owns the per-layer state slots of its attention methods (linear attention's sums, lite's
skip record), fresh for the video. Per block:

    x = noise(seed, block index)                      # (1, C, T_b, h, w) fp32, any block reproducible alone
    for each step t:
        meta = AttentionMeta(block layout, step)      # built once, shared by every layer
        pred = model([x, x], t, [uncond, cond] text)  # one call, batch of 2 (1 when guidance <= 1)
        pred = uncond + g * (cond - uncond)
        x = scheduler.step(pred, t, x)

Batching cond and uncond keeps their attention state apart: every stateful method keeps one state
per batch row. The model call is the adapter's forward, or what context parallelism puts in its
place (same signature: run_model(latents, timestep, text, layout, meta, states, text_mask)).

Block mode carries context from block to block (state.py): after a block's last step, a commit
pass runs the model once more on the block's clean latents at t = 0 with meta.commit, so every
layer writes what later blocks see (linear sums, conv tail, rolling KV cache), computed from clean
features as SANA-Video's and Self-Forcing's pipelines do. The last block of a video needs none.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch

from pipeline.attention import AttentionMeta, StateSlot
from pipeline.models import encode_prompts
from pipeline.sampling.plan import Block, ShotPlan
from pipeline.sampling.schedulers import make_scheduler
from pipeline.sampling.state import CarriedState

Progress = Callable[[int, int, int], None]  # (block index, steps done, steps)


@dataclass
class VideoText:
    """A video's prompts for batched CFG: row 0 uncond (when guided), the last row cond."""

    embeds: torch.Tensor  # (B, S, L, C): one prompt per shot; the uncond row repeats the negative prompt
    mask: torch.Tensor  # (B, S, L) bool

    @property
    def guided(self) -> bool:
        return self.embeds.shape[0] == 2


def block_seed(seed: int, block_index: int) -> int:
    """A 63-bit seed from (video seed, block index): nearby seeds give unrelated streams."""
    digest = hashlib.sha256(f"longreel:{seed}:{block_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def block_noise(plan: ShotPlan, block: Block, seed: int) -> torch.Tensor:
    """(1, C, T_b, h, w) fp32 standard normal noise, a function of (seed, block index) only; drawn on
    the CPU so that every device starts from the same noise."""
    g = torch.Generator("cpu").manual_seed(block_seed(seed, block.index))
    return torch.randn(plan.latent_shape(block), generator=g)


class Denoiser:
    """Runs the steps of a video's blocks. `cfg` is the video's config (seed, prompts, sampling);
    `run_model` defaults to the adapter's forward."""

    def __init__(self, adapter, bundle, cfg, run_model: Callable | None = None):
        self.adapter, self.bundle, self.cfg = adapter, bundle, cfg
        self.run_model = run_model or adapter
        self.states = CarriedState.new(adapter, cfg.sampling)  # this video's carried state, per layer
        self._text: tuple[tuple[str, ...], VideoText] | None = None  # (prompts, their encoding)
        adapter.reset_routers()  # training-free MoGA routers fit again on this video's first step

    def encode(self, plan: ShotPlan) -> VideoText:
        """Per-shot prompts (cond) and the negative prompt per shot (uncond, when guidance > 1);
        encoded once for the plan's prompts, the same object for every block."""
        if self._text is None or self._text[0] != plan.prompts:
            self._text = (plan.prompts, self._encode(plan))
        return self._text[1]

    def _encode(self, plan: ShotPlan) -> VideoText:
        L = self.cfg.model.text_max_length
        cond = encode_prompts(self.bundle, list(plan.prompts), L, self.bundle.text_instruction)  # (S, L, C)
        if self.cfg.sampling.guidance_scale <= 1.0:
            return VideoText(cond.embeds[None], cond.mask[None])
        neg = encode_prompts(self.bundle, [self.cfg.video.negative_prompt], L)  # (1, L, C); no instruction
        s = len(plan.prompts)
        return VideoText(torch.stack([neg.embeds.expand(s, -1, -1), cond.embeds]),
                         torch.stack([neg.mask.expand(s, -1), cond.mask]))

    @torch.no_grad()
    def denoise_block(self, plan: ShotPlan, block: Block, text: VideoText | None = None,
                      states: CarriedState | list[StateSlot | None] | None = None,
                      progress: Progress | None = None) -> torch.Tensor:
        """The block's denoised latents (1, C, T_b, h, w) fp32 on the model's device.

        text: default the video's (encode(plan)); states: default the denoiser's own CarriedState
        (pass another to run a block from a restored checkpoint; plain per-layer slots carry nothing
        from block to block). In block mode a commit pass follows every block but the video's last."""
        cfg, device, dtype = self.cfg, self.bundle.device, self.bundle.dtype
        text = text if text is not None else self.encode(plan)
        states = states if states is not None else self.states
        x = block_noise(plan, block, cfg.video.seed).to(device)
        scheduler = make_scheduler(cfg.sampling)  # stateful (UniPC's history): one per block
        scheduler.set_timesteps(cfg.sampling.steps, device=device)
        embeds, mask = text.embeds.to(device, dtype), text.mask.to(device)
        batch, g = embeds.shape[0], cfg.sampling.guidance_scale
        steps = len(scheduler.timesteps)
        for i, t in enumerate(scheduler.timesteps):
            meta = AttentionMeta(block.layout, step=i)
            model_in = x.to(dtype).repeat(batch, 1, 1, 1, 1)  # (B, C, T_b, h, w): uncond and cond rows
            pred = self.run_model(model_in, t.expand(batch), embeds, block.layout, meta, states, mask).float()
            if text.guided:
                uncond, cond = pred.chunk(2)
                pred = uncond + g * (cond - uncond)
            x = scheduler.step(pred, t, x, return_dict=False)[0]
            if progress is not None:
                progress(block.index, i + 1, steps)
        if isinstance(states, CarriedState) and states.carries and block.index + 1 < len(plan.blocks):
            self.commit_block(block, x, text, states)
        return x

    @torch.no_grad()
    def commit_block(self, block: Block, latents: torch.Tensor, text: VideoText, states: CarriedState,
                     timestep: float = 0.0) -> None:
        """Write `block`'s context into `states`: one forward on its clean latents (1, C, T_b, h, w) at
        `timestep` (0: clean) with meta.commit, batched like the steps (each CFG row keeps its own
        state). The prediction is not used."""
        device, dtype = self.bundle.device, self.bundle.dtype
        embeds, mask = text.embeds.to(device, dtype), text.mask.to(device)
        batch = embeds.shape[0]
        meta = AttentionMeta(block.layout, step=self.cfg.sampling.steps, commit=True)
        model_in = latents.to(device, dtype).repeat(batch, 1, 1, 1, 1)
        t = torch.full((batch,), float(timestep), device=device)
        self.run_model(model_in, t, embeds, block.layout, meta, states, mask)
