"""The denoising loop of one block: flow matching, classifier-free guidance batched in one call.

Any block is reproducible alone: its initial noise comes from a generator seeded by (video seed,
block index), drawn on the CPU so CPU and GPU runs start from the same noise.
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

Progress = Callable[[int, int, int], None]  # (block index, steps done, steps)


@dataclass
class VideoText:
    """Prompts of one video, ready for batched CFG: row 0 uncond (if any), last row cond."""

    embeds: torch.Tensor  # (B, S, L, C): per shot; the uncond row repeats the negative prompt
    mask: torch.Tensor  # (B, S, L) bool

    @property
    def guided(self) -> bool:
        return self.embeds.shape[0] == 2


def block_seed(seed: int, block_index: int) -> int:
    digest = hashlib.sha256(f"longreel:{seed}:{block_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def block_noise(plan: ShotPlan, block: Block, seed: int) -> torch.Tensor:
    """(1, C, T_b, h, w) fp32 standard normal noise, a function of (seed, block index) only."""
    g = torch.Generator("cpu").manual_seed(block_seed(seed, block.index))
    return torch.randn(plan.latent_shape(block), generator=g)


class Denoiser:
    """Runs a block's steps. `run_model(latents, timestep, text, layout, meta, states, text_mask)`
    is the adapter's forward by default; context parallelism passes its sharded forward."""

    def __init__(self, adapter, bundle, cfg, run_model: Callable | None = None):
        self.adapter, self.bundle, self.cfg = adapter, bundle, cfg
        self.run_model = run_model or adapter

    def encode(self, plan: ShotPlan) -> VideoText:
        """Per-shot prompts (cond) and the negative prompt per shot (uncond, when guidance > 1)."""
        L = self.cfg.model.text_max_length
        guided = self.cfg.sampling.guidance_scale > 1.0
        prompts = list(plan.prompts) + ([self.cfg.video.negative_prompt] if guided else [])
        text = encode_prompts(self.bundle, prompts, L)
        s = len(plan.prompts)
        cond, cond_mask = text.embeds[:s], text.mask[:s]
        if not guided:
            return VideoText(cond[None], cond_mask[None])
        uncond, uncond_mask = text.embeds[s:].expand(s, -1, -1), text.mask[s:].expand(s, -1)
        return VideoText(torch.stack([uncond, cond]), torch.stack([uncond_mask, cond_mask]))

    @torch.no_grad()
    def denoise_block(self, plan: ShotPlan, block: Block, text: VideoText,
                      states: list[StateSlot | None] | None = None, progress: Progress | None = None) -> torch.Tensor:
        """The block's clean latents (1, C, T_b, h, w) fp32 on the model's device."""
        cfg, device, dtype = self.cfg, self.bundle.device, self.bundle.dtype
        x = block_noise(plan, block, cfg.video.seed).to(device)
        scheduler = make_scheduler(cfg.sampling)
        scheduler.set_timesteps(cfg.sampling.steps, device=device)
        batch, g = text.embeds.shape[0], cfg.sampling.guidance_scale
        embeds, mask = text.embeds.to(device, dtype), text.mask.to(device)
        steps = len(scheduler.timesteps)
        for i, t in enumerate(scheduler.timesteps):
            meta = AttentionMeta(block.layout, step=i)  # built once per step, shared by every layer
            model_in = x.to(dtype).expand(batch, -1, -1, -1, -1)
            pred = self.run_model(model_in, t.expand(batch), embeds, block.layout, meta, states, mask).float()
            if text.guided:
                uncond, cond = pred.chunk(2)
                pred = uncond + g * (cond - uncond)
            x = scheduler.step(pred, t, x, return_dict=False)[0]
            if progress is not None:
                progress(block.index, i + 1, steps)
        return x
