"""Denoising: per-block seeding, batched guidance, every registered method on the tiny model."""

import pytest
import torch

from pipeline.attention import method_names
from pipeline.config import load_config
from pipeline.models import build_adapter, load_model
from pipeline.sampling.denoise import Denoiser, block_noise
from pipeline.sampling.plan import ShotPlan

FAST = ["video.height=64", "video.width=64", "video.fps=4", "sampling.steps=2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


def _setup(cache, *overrides):
    cfg = load_config(None, [f"model.cache_dir={cache}", *FAST, *overrides])
    bundle = load_model(cfg.model)
    adapter = build_adapter(bundle, cfg.attention)
    return cfg, bundle, adapter, Denoiser(adapter, bundle, cfg), ShotPlan.from_config(cfg)


def test_block_noise_depends_only_on_seed_and_index(cache):
    cfg, _, _, _, plan = _setup(cache, "sampling.mode=block")
    a, b = plan.blocks[0], plan.blocks[1]
    assert torch.equal(block_noise(plan, a, 3), block_noise(plan, a, 3))
    assert not torch.equal(block_noise(plan, a, 3), block_noise(plan, a, 4))
    assert not torch.equal(block_noise(plan, b, 3)[:, :, :1], block_noise(plan, a, 3)[:, :, :1])


def test_a_block_denoised_alone_is_reproducible(cache):
    cfg, _, adapter, denoiser, plan = _setup(cache, "sampling.mode=block")
    text = denoiser.encode(plan)
    last = plan.blocks[-1]
    runs = [denoiser.denoise_block(plan, last, text, adapter.new_states()) for _ in range(2)]
    assert runs[0].shape == plan.latent_shape(last)
    assert torch.equal(runs[0], runs[1])


def test_guidance_batches_cond_and_uncond(cache):
    cfg, _, adapter, denoiser, plan = _setup(cache, "sampling.guidance_scale=4.0")
    text = denoiser.encode(plan)
    assert text.embeds.shape[:2] == (2, len(plan.prompts))  # one call with both rows
    calls = []
    denoiser.run_model = lambda *a: calls.append(a[0].shape[0]) or adapter(*a)
    denoiser.denoise_block(plan, plan.blocks[0], text, adapter.new_states())
    assert calls == [2, 2]
    unguided = _setup(cache, "sampling.guidance_scale=1.0")[3]
    assert unguided.encode(plan).embeds.shape[0] == 1


@pytest.mark.parametrize("method", [m for m in method_names() if m != "linear"])
def test_every_softmax_method_denoises_the_tiny_wan(cache, method):
    _, _, adapter, denoiser, plan = _setup(cache, f"attention.method={method}")
    out = denoiser.denoise_block(plan, plan.blocks[0], denoiser.encode(plan), adapter.new_states())
    assert out.shape == plan.latent_shape(plan.blocks[0]) and torch.isfinite(out).all()


def test_linear_denoises_the_tiny_sana(cache):
    _, _, adapter, denoiser, plan = _setup(cache, "model=tiny-sana", "attention=linear")
    out = denoiser.denoise_block(plan, plan.blocks[0], denoiser.encode(plan), adapter.new_states())
    assert out.shape == plan.latent_shape(plan.blocks[0]) and torch.isfinite(out).all()
