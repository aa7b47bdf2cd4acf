"""One tiny DiT under training: a Wan transformer behind longreel's adapter (so self-attention is the
registry method the twin is named for, MoGA routers included, and cross-attention is per shot),
its text encoder, an AdamW optimiser and an exponential moving average of the weights.

Objective: rectified flow as Wan trains it. x_t = (1 - sigma) x_0 + sigma * noise, the model sees
timestep 1000 * sigma and predicts the velocity noise - x_0; sigma = shift * u / (1 + (shift - 1) u)
with u uniform, the same shifted schedule the flow-matching Euler sampler steps through. MoGA's
group-balancing losses (already weighted by attention.moga.balance_weight) are added to the loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.layout import VideoLayout
from pipeline.models.loader import ROUTERS_FILE
from pipeline.training.attention import TRAINING_METHODS
from pipeline.training.ema import EMA
from pipeline.training.text import UMT5Encoder, save_text_encoder


def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Uniform u in [0, 1] -> flow-matching noise levels, shifted towards 1 as the sampler's are."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def embed_prompts(text_encoder: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, S, L) ids and mask -> (B, S, L, C) embeddings, zero past each prompt (encode_prompts' rule)."""
    b, s, length = input_ids.shape
    hidden = text_encoder(input_ids.view(b * s, length), mask.view(b * s, length)).last_hidden_state
    return (hidden * mask.view(b * s, length, 1).to(hidden.dtype)).view(b, s, length, -1)


class Twin:
    """A DiT trained with one attention method; `name` is how files and logs call it."""

    def __init__(self, name: str, architecture: dict, attention_cfg, device: torch.device, seed: int,
                 lr: float, ema_decay: float, grad_clip: float = 1.0):
        from diffusers import WanTransformer3DModel

        from pipeline.models.wan import WanAdapter

        self.name, self.method = name, attention_cfg.method
        self.lr, self.grad_clip = lr, grad_clip
        with torch.random.fork_rng(devices=[]):  # the same initial weights whatever ran before
            torch.manual_seed(seed)
            transformer = WanTransformer3DModel(**architecture["transformer"]).to(device)
            self.text_encoder = UMT5Encoder(**architecture["text_encoder"]).to(device)
            self.adapter = WanAdapter(transformer, attention_cfg)  # MoGA routers are created here
        # Sampling uses the registry's methods; training their masked-dense equivalents where one exists.
        self.sampling_attention = list(self.adapter.attention)
        self.training_attention = [TRAINING_METHODS[fn.name](fn.cfg, fn.backend)
                                   if getattr(fn, "name", None) in TRAINING_METHODS else fn
                                   for fn in self.sampling_attention]
        self.use_training_attention(True)
        self.modules = nn.ModuleDict({"adapter": self.adapter, "text_encoder": self.text_encoder}).train()
        params = [p for p in self.modules.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.ema = EMA(self.modules, ema_decay)
        self.steps = 0  # optimiser steps taken (across resumed runs)

    def use_training_attention(self, training: bool) -> None:
        for layer, fn in enumerate(self.training_attention if training else self.sampling_attention):
            self.adapter.set_attention(layer, fn)

    @property
    def transformer(self) -> nn.Module:
        return self.adapter.transformer

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.modules.parameters())

    # --- training ------------------------------------------------------------------------------
    def loss(self, latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, input_ids: torch.Tensor,
             text_mask: torch.Tensor, layout: VideoLayout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """latents, noise (B, C, T, h, w); sigma (B,); ids, mask (B, S, L) -> (loss, parts)."""
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1.0 - s) * latents + s * noise
        text = embed_prompts(self.text_encoder, input_ids, text_mask)
        pred = self.adapter(x_t, sigma * 1000.0, text, layout)  # (B, C, T, h, w) velocity
        flow = F.mse_loss(pred.float(), (noise - latents).float())
        balance = torch.stack(self.adapter.aux_losses).sum() if self.adapter.aux_losses else flow.new_zeros(())
        # Detached tensors, not floats: a float() per step would wait for the GPU each time and stop
        # the host from queueing the next twin's kernels while this one's run (the step is launch-bound).
        return flow + balance, {"flow": flow.detach(), "balance": balance.detach()}

    def step(self, loss: torch.Tensor, lr: float) -> torch.Tensor:
        """Backward, clip, AdamW step at `lr`, EMA update; returns the gradient norm before clipping
        (a 0-d tensor on the device: reading it is the caller's sync)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.modules.parameters(), self.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.ema.update()
        self.steps += 1
        return norm.detach()

    # --- weights -------------------------------------------------------------------------------
    def state(self) -> dict:
        """Checkpoint: raw weights in fp32, EMA in fp16 (a file stays under the 16 MB transfer cap).
        AdamW's moments are not kept: a resumed run warms its learning rate up again."""
        return {"name": self.name, "method": self.method, "steps": self.steps,
                "weights": {k: v.detach().cpu() for k, v in self.modules.state_dict().items()},
                "ema": self.ema.state(torch.float16)}

    def load_state(self, state: dict) -> None:
        if state["method"] != self.method:
            raise ValueError(f"--resume: twin {self.name} was trained with {state['method']}, this run uses "
                             f"{self.method}")
        self.modules.load_state_dict(state["weights"])
        self.ema.load_state(state["ema"])
        self.steps = int(state["steps"])

    def load_installed(self, directory: Path) -> None:
        """Start from an installed model directory (what export wrote, then `install`): raw weights and
        their average both become its (fp16) weights; steps go on from the count it records."""
        from safetensors.torch import load_file

        training = json.loads((directory / "model_index.json").read_text())["longreel_training"]
        if training["attention"] != self.method:
            raise ValueError(f"init_from: {directory} was trained with {training['attention']}, twin {self.name} "
                             f"uses {self.method}")
        weights = directory / "transformer" / "diffusion_pytorch_model.safetensors"
        self.transformer.load_state_dict(load_file(str(weights)))
        if self.adapter.routers is not None:
            self.adapter.routers.load_state_dict(load_file(str(directory / "transformer" / ROUTERS_FILE)))
        self.text_encoder.load_state_dict(load_file(str(directory / "text_encoder" / "model.safetensors")))
        self.ema = EMA(self.modules, self.ema.decay)
        self.steps = int(training["steps"])

    def export(self, directory: Path, dtype: torch.dtype = torch.float16) -> None:
        """EMA weights in diffusers layout: transformer/ (+ MoGA routers), text_encoder/."""
        from safetensors.torch import save_file

        with self.ema.applied():
            out = directory / "transformer"
            out.mkdir(parents=True, exist_ok=True)
            self.transformer.save_config(out)
            save_file(_cast(self.transformer.state_dict(), dtype), str(out / "diffusion_pytorch_model.safetensors"),
                      metadata={"format": "pt"})
            if self.adapter.routers is not None:
                save_file(_cast(self.adapter.routers.state_dict(), dtype), str(out / ROUTERS_FILE),
                          metadata={"format": "pt"})
            save_text_encoder(self.text_encoder, directory / "text_encoder", dtype)


def _cast(state: dict, dtype: torch.dtype) -> dict:
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}


def save_vae(vae: nn.Module, directory: Path, dtype: torch.dtype = torch.float16) -> None:
    """The VAE (its config carries latents_mean / latents_std) in diffusers layout."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    vae.save_config(directory)
    save_file(_cast(vae.state_dict(), dtype), str(directory / "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt"})


def write_model_index(directory: Path, preset: str, training: dict) -> None:
    """model_index.json: the component classes (diffusers' convention, which the loader reads), the
    family and preset, and how the weights were trained (under "longreel_training")."""
    index = {"transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "ByT5Tokenizer"],
             "family": "wan", "preset": preset, "longreel_training": training}
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))
