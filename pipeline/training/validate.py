"""Sampling a twin in training the way the pipeline samples, for validation scores on the device.

The device has no transformers, so the loader cannot build a ModelBundle there; this builds one from
the modules in memory (ByteTokenizer and UMT5Encoder stand in for ByT5 and UMT5EncoderModel) and
runs the pipeline's own ShotPlan, Denoiser (CFG batched, flow-matching Euler) and StreamingDecoder.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.procedural import sample_video
from pipeline.training.data import to_video
from pipeline.training.vae import encode_normalised


def validation_set(seed: int, stream: int, count: int, num_shots: int, seconds: float, fps: int, height: int,
                   width: int) -> list[tuple[np.ndarray, list[str], list[int]]]:
    """`count` ground-truth videos: (frames (F, H, W, 3) uint8, captions, pixel frames per shot)."""
    out = []
    for i in range(count):
        shots, captions = sample_video((seed, stream, 0, i), num_shots, seconds, fps, height, width)
        out.append((np.concatenate(shots), captions, [len(s) for s in shots]))
    return out


@torch.no_grad()
def reconstruct(vae, frames: np.ndarray) -> np.ndarray:
    """Ground truth through the VAE (posterior mean) and the pipeline's streaming decoder."""
    from pipeline.video.decode import StreamingDecoder

    param = next(vae.parameters())
    video = to_video(torch.from_numpy(frames)[None].to(param.device), param.dtype)
    return StreamingDecoder(vae).decode(encode_normalised(vae, video))


@torch.no_grad()
def sample_video_with(twin, vae, cfg) -> np.ndarray:
    """The video cfg.video describes, sampled with `twin`'s current weights: (F, H, W, 3) uint8."""
    from pipeline.models.loader import ModelBundle
    from pipeline.sampling.denoise import Denoiser
    from pipeline.sampling.plan import ShotPlan
    from pipeline.training.text import ByteTokenizer
    from pipeline.video.decode import StreamingDecoder

    device = next(twin.transformer.parameters()).device
    bundle = ModelBundle(family="wan", path="(in training)", transformer=twin.transformer, vae=vae,
                         text_encoder=twin.text_encoder, tokenizer=ByteTokenizer(), device=device, dtype=torch.float32)
    plan = ShotPlan.from_config(cfg, twin.transformer.config.in_channels)
    denoiser = Denoiser(twin.adapter, bundle, cfg)
    decoder = StreamingDecoder(vae)
    return np.concatenate([decoder.decode(denoiser.denoise_block(plan, block)) for block in plan.blocks])
