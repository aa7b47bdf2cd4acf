"""The tiny Wan VAE: reconstruction training, latent statistics, and encoding for the DiT.

A random AutoencoderKLWan decodes anything to noise, so the tiny model's VAE is trained first on
procedural clips (flat colours, hard-edged shapes): L1 on pixels in [-1, 1] through a sampled
posterior (so the decoder tolerates latents that are a little off, as a DiT's are) plus a small KL
that keeps the latents bounded. Then its per-channel latent mean and std go into the VAE's config
(latents_mean / latents_std), which is where Wan's pipeline and pipeline.video.decode read them:
the DiT trains on (mu - mean) / std and the decoder undoes exactly that.
"""

from __future__ import annotations

from typing import Iterable

import torch

from pipeline.video.decode import latent_scale


def build_vae(architecture: dict):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(**architecture)


def reconstruction_loss(vae, video: torch.Tensor, kl_weight: float,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """video (B, 3, F, H, W) in [-1, 1] -> (loss, {l1, kl, psnr}) for one reconstruction."""
    posterior = vae.encode(video).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator,
                                                     device=video.device, dtype=posterior.mean.dtype)
    recon = vae.decode(z).sample  # (B, 3, F, H, W), clamped to [-1, 1] by diffusers
    l1 = (recon.float() - video.float()).abs().mean()
    kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1.0 - posterior.logvar.float()).mean()
    mse = ((recon.float() - video.float()) ** 2).mean().detach()
    psnr = float(10 * torch.log10(4.0 / mse.clamp(min=1e-10)))  # peak-to-peak 2 in [-1, 1]
    return l1 + kl_weight * kl, {"l1": float(l1.detach()), "kl": float(kl.detach()), "psnr": psnr}


@torch.no_grad()
def latent_moments(vae, videos: Iterable[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means over `videos` (each (B, 3, F, H, W))."""
    total = squares = count = 0
    for video in videos:
        mu = vae.encode(video).latent_dist.mean.double()  # (B, C, T, h, w)
        total = total + mu.sum((0, 2, 3, 4))
        squares = squares + (mu * mu).sum((0, 2, 3, 4))
        count += mu.numel() // mu.shape[1]
    mean = total / count
    std = (squares / count - mean * mean).clamp(min=1e-8).sqrt()
    return mean.tolist(), std.tolist()


def set_latent_moments(vae, mean: list[float], std: list[float]) -> None:
    """Store the latent normalisation where the pipeline reads it (the VAE's config)."""
    vae.register_to_config(latents_mean=[float(m) for m in mean], latents_std=[float(s) for s in std])


@torch.no_grad()
def encode_normalised(vae, video: torch.Tensor) -> torch.Tensor:
    """video (B, 3, F, H, W) in [-1, 1] -> (B, C, T, h, w) fp32 latents as the sampler sees them:
    (posterior mean - latents_mean) / latents_std (StreamingDecoder inverts this)."""
    mean, std = latent_scale(vae)
    mu = vae.encode(video).latent_dist.mean.float()
    return (mu - mean.to(mu.device)) / std.to(mu.device)
