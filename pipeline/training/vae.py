"""The tiny Wan VAE: reconstruction training, latent statistics, and encoding for the DiT.

A random AutoencoderKLWan decodes anything to noise, so the tiny model's VAE is trained first on
procedural clips (flat colours, hard-edged shapes): MSE (or L1, see reconstruction_loss) on
pixels in [-1, 1] through a sampled posterior (so the decoder tolerates latents that are a little
off, as a DiT's are) plus a small KL that keeps the latents bounded. Then its per-channel latent mean and std go into the VAE's config
(latents_mean / latents_std), which is where Wan's pipeline and pipeline.video.decode read them:
the DiT trains on (mu - mean) / std and the decoder undoes exactly that.
"""

from __future__ import annotations

from typing import Iterable

import torch

from pipeline.video.decode import latent_scale


# Initial posterior log-variance. At diffusers' default init the encoder's means have std ~0.16
# while the posterior std is ~1, so the decoder sees noise, learns to output the mean colour, and
# waits hundreds of steps for logvar to fall (the second GPU run sat at L1 1.0 for 400 steps).
# Starting at std e^-4 ~ 0.018 makes it an autoencoder from step one; the KL term (weight 1e-4)
# lets the variance grow back where the decoder tolerates it.
INITIAL_LOGVAR = -8.0


def build_vae(architecture: dict):
    """A freshly initialised AutoencoderKLWan whose posterior starts narrow (INITIAL_LOGVAR)."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(**architecture)
    z_dim = vae.config.z_dim
    with torch.no_grad():  # quant_conv's output is [mu (z_dim), logvar (z_dim)]
        vae.quant_conv.bias[z_dim:] = INITIAL_LOGVAR
    return vae


RECONSTRUCTION_LOSSES = ("l1", "mse", "l1+mse", "l1-clamped")


def check_pixel_loss(name: str) -> None:
    if name not in RECONSTRUCTION_LOSSES:
        raise ValueError(f"vae_loss: {name!r} is not one of {', '.join(RECONSTRUCTION_LOSSES)}")


def reconstruction_loss(vae, video: torch.Tensor, kl_weight: float, generator: torch.Generator | None = None,
                        pixel_loss: str = "l1") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """video (B, 3, F, H, W) in [-1, 1] -> (loss, {l1, l1_decoded, kl, psnr}) for one reconstruction
    (l1 on the raw decoder output, l1_decoded and psnr on what decode returns).

    pixel_loss: l1 | mse | l1+mse on the unclamped decoder output. Flat-colour targets sit at -1 or 1
    per channel, so an all-zero output is where L1's sign gradients cancel (L1 = 1.0 exactly: the
    plateau runs 1-2 sat on); MSE's pull is proportional to the error. Measured (docs/training.md):
    with L1 the VAE's reconstructions settled into a few colours (runs 4-7), with MSE (run 8) it went
    on to separate them.
    l1-clamped: L1 of what decode returns (the output clamped to [-1, 1]), with the gradient passed
    straight through the clamp. A pixel past the edge its target sits on is right as decoded and
    costs nothing (plain L1 spends capacity pulling it back to exactly -1 or 1); a pixel past the
    wrong edge still gets the full sign gradient (the clamp's own gradient would be 0 there: run 1)."""
    check_pixel_loss(pixel_loss)
    posterior = vae.encode(video).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator,
                                                     device=video.device, dtype=posterior.mean.dtype)
    recon = decode_unclamped(vae, z)  # (B, 3, F, H, W)
    recon = recon.float()
    error = recon - video.float()
    l1 = error.abs().mean()
    if pixel_loss == "l1-clamped":
        decoded = recon + (recon.clamp(-1.0, 1.0) - recon).detach()  # value clamped, gradient identity
        pixel = (decoded - video.float()).abs().mean()
    else:
        pixel = l1 if pixel_loss == "l1" else (error ** 2).mean() + (l1 if pixel_loss == "l1+mse" else 0.0)
    kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1.0 - posterior.logvar.float()).mean()
    decoded_error = (recon.detach().clamp(-1.0, 1.0) - video.float())
    mse = (decoded_error ** 2).mean()
    psnr = 10 * torch.log10(4.0 / mse.clamp(min=1e-10))  # peak-to-peak 2 in [-1, 1]
    # Parts stay 0-d device tensors (no sync per step); the trainer reads them when it logs.
    return pixel + kl_weight * kl, {"l1": l1.detach(), "l1_decoded": decoded_error.abs().mean(), "kl": kl.detach(),
                                    "psnr": psnr}


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """vae.decode(z).sample before diffusers' final clamp to [-1, 1] (same graph otherwise).

    Training must see this: the clamp passes no gradient outside [-1, 1], and flat-colour targets
    sit exactly at -1 or 1, so a pixel that overshoots on the wrong side never comes back (the first
    GPU run stalled at L1 1.0 within 100 steps). Wan's decode runs `vae.decoder` once per latent
    frame; a forward hook collects those outputs (tests/test_train_tiny.py checks the clamp of
    this equals vae.decode)."""
    if vae.config.patch_size is not None or getattr(vae, "use_tiling", False):
        raise ValueError("decode_unclamped: patched or tiled Wan VAEs decode in another order")
    outputs: list[torch.Tensor] = []
    handle = vae.decoder.register_forward_hook(lambda _module, _args, out: outputs.append(out))
    try:
        clamped = vae.decode(z).sample
    finally:
        handle.remove()
    raw = torch.cat(outputs, dim=2)
    if raw.shape != clamped.shape:
        raise RuntimeError(f"decode_unclamped: decoder outputs {tuple(raw.shape)} != decode {tuple(clamped.shape)}")
    return raw


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
