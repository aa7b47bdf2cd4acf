"""Streaming decode with the causal Wan VAE: latents of one block at a time -> uint8 frames.

The Wan VAE decoder is causal in time: it decodes one latent frame per call and carries, for each
of its causal convolutions, the last input frames of the previous call (its "feature cache"). The
very first latent frame of a video is special (`first_chunk`): it decodes to 1 pixel frame, every
later one to 4 (`scale_factor_temporal`). Decoding the blocks of a video independently would treat
the first latent frame of every block as the video's first and drop 3 frames per block, with a
seam. StreamingDecoder keeps that cache across `decode` calls instead, so the blocks decoded one
after another equal one decode of the whole video, bit for bit.

This follows diffusers' `AutoencoderKLWan._decode` (0.42): `post_quant_conv`, then `decoder(x,
feat_cache, feat_idx, first_chunk)` frame by frame, `unpatchify` for patched VAEs (Wan2.2), clamp
to [-1, 1]. Those are internal interfaces: pyproject pins diffusers to the minor and
tests/test_video_decode.py compares against `vae.decode` to catch any change. The cache is our own
list, not the VAE's `_feat_map`, so several decoders can share one VAE.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify


def latent_scale(vae: AutoencoderKLWan) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) each (1, C, 1, 1, 1): the sampler's latents are (z - mean) / std (Wan's pipeline)."""
    c = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, c, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, c, 1, 1, 1)
    return mean, std


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(1, 3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8, rounded to the nearest level."""
    frames = video[0].permute(1, 2, 3, 0)  # (F, H, W, 3)
    frames = ((frames.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return frames.cpu().numpy()


class StreamingDecoder:
    """Decodes the latent blocks of one video in order; `reset()` before the next video."""

    def __init__(self, vae: AutoencoderKLWan):
        self.vae = vae
        self.temporal = int(vae.config.scale_factor_temporal)
        self._num_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        mean, std = latent_scale(vae)
        param = next(vae.parameters())
        self._mean = mean.to(param.device, param.dtype)
        self._std = std.to(param.device, param.dtype)
        self.reset()

    def reset(self) -> None:
        """Forget the previous video: the next latent frame decoded is a video's first."""
        self._cache: list = [None] * self._num_convs  # per causal conv: its last input frames
        self.latent_frames = 0  # latent frames decoded so far in this video
        self.pixel_frames = 0

    def frames_for(self, latent_frames: int) -> int:
        """Pixel frames the next `latent_frames` latent frames decode to (1 + 4k rule)."""
        if latent_frames <= 0:
            return 0
        first = 1 if self.latent_frames == 0 else self.temporal
        return first + self.temporal * (latent_frames - 1)

    @torch.no_grad()
    def pixel_chunks(self, latents: torch.Tensor, latent_frames: int = 1) -> Iterator[torch.Tensor]:
        """latents (1, C, T_b, h, w), normalised as the sampler sees them -> (1, 3, F, H, W) in [-1, 1],
        `latent_frames` latent frames at a time (the last chunk may be shorter). Consumers can work on
        one chunk while the next decodes (VideoWriter encodes them meanwhile)."""
        if (latents.ndim != 5 or latents.shape[0] != 1 or latents.shape[1] != self._mean.shape[1]
                or latents.shape[2] < 1):
            raise ValueError(f"latents: expected (1, {self._mean.shape[1]}, T >= 1, h, w), got {tuple(latents.shape)}")
        z = latents.to(self._mean.device, self._mean.dtype) * self._std + self._mean  # de-normalise
        x = self.vae.post_quant_conv(z)  # 1x1x1 conv: frame-local, safe to apply per block
        for start in range(0, x.shape[2], latent_frames):
            expected = self.frames_for(min(latent_frames, x.shape[2] - start))
            outs = []
            for i in range(start, min(start + latent_frames, x.shape[2])):
                conv_idx = [0]  # the decoder walks its causal convs in order, indexing the cache
                outs.append(self.vae.decoder(x[:, :, i:i + 1], feat_cache=self._cache, feat_idx=conv_idx,
                                             first_chunk=self.latent_frames == 0))
                self.latent_frames += 1
            out = torch.cat(outs, 2)
            if self.vae.config.patch_size is not None:
                out = unpatchify(out, patch_size=self.vae.config.patch_size)
            out = out.clamp(-1.0, 1.0)
            if out.shape[2] != expected:
                raise RuntimeError(f"VAE decoded {out.shape[2]} frames, expected {expected}: "
                                   "diffusers' Wan decoder changed (pinned to 0.42)")
            self.pixel_frames += out.shape[2]
            yield out

    def decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (1, C, T_b, h, w) -> (1, 3, F_b, H, W) in [-1, 1], the whole block at once."""
        return torch.cat(list(self.pixel_chunks(latents, max(1, latents.shape[2]))), 2)

    def frame_chunks(self, latents: torch.Tensor, latent_frames: int = 1) -> Iterator[np.ndarray]:
        """pixel_chunks as (F, H, W, 3) uint8 frames."""
        for chunk in self.pixel_chunks(latents, latent_frames):
            yield to_uint8(chunk)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """latents (1, C, T_b, h, w) -> frames (F_b, H, W, 3) uint8; F_b = 1 + 4(T_b - 1) first, 4 T_b after."""
        return to_uint8(self.decode_pixels(latents))
