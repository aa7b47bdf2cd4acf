"""Denoising: per-block seeding, batched guidance equal to separate calls, prompts encoded once per
video, state owned per video, progress per step, every registered method on the tiny models."""

import pytest
import torch

from pipeline.attention import method_names
from pipeline.config import load_config
from pipeline.models import build_adapter, load_model
from pipeline.sampling.denoise import Denoiser, block_noise
from pipeline.sampling.plan import ShotPlan
from pipeline.sampling.schedulers import make_scheduler

FAST = ["model=tiny-wan", "model.device=cpu", "video.height=32", "video.width=32", "video.fps=4", "sampling.steps=2",
        "video.shots=[{prompt: a red circle, seconds: 1.25}, {prompt: a blue square, seconds: 1}]"]
SANA = ["model=tiny-sana", "attention=linear"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def bundles(cache):
    """One loaded model per family for the module (adapters are rebuilt per method: cheap)."""
    return {family: load_model(load_config(None, [f"model.cache_dir={cache}", "model.device=cpu", *extra]).model)
            for family, extra in (("wan", ["model=tiny-wan"]), ("sana", SANA))}


def _setup(bundles, cache, *overrides):
    cfg = load_config(None, [f"model.cache_dir={cache}", *FAST, *overrides])
    bundle = bundles[cfg.model.family]
    adapter = build_adapter(bundle, cfg.attention)
    return cfg, adapter, Denoiser(adapter, bundle, cfg), ShotPlan.from_config(cfg)


def test_block_noise_depends_only_on_seed_and_index(bundles, cache):
    _, _, _, plan = _setup(bundles, cache, "sampling.mode=block")
    a, b = plan.blocks
    assert torch.equal(block_noise(plan, a, 3), block_noise(plan, a, 3))
    assert not torch.equal(block_noise(plan, a, 3), block_noise(plan, a, 4))
    assert not torch.equal(block_noise(plan, b, 3)[:, :, :1], block_noise(plan, a, 3)[:, :, :1])
    torch.manual_seed(0)  # the global RNG plays no part
    first = block_noise(plan, b, 3)
    torch.manual_seed(1)
    assert torch.equal(first, block_noise(plan, b, 3))


def test_a_block_denoised_alone_is_reproducible(bundles, cache):
    """Block 1 alone, twice, in fresh denoisers (as a resumed video would): identical latents."""
    cfg, adapter, denoiser, plan = _setup(bundles, cache, "sampling.mode=block")
    last = plan.blocks[-1]
    first = denoiser.denoise_block(plan, last)
    again = Denoiser(adapter, denoiser.bundle, cfg).denoise_block(plan, last)
    assert first.shape == plan.latent_shape(last) == (1, 16, 1, 4, 4)  # shot 2: 4 frames at 4 fps
    assert torch.equal(first, again)


def test_guidance_batches_cond_and_uncond_in_one_call(bundles, cache):
    cfg, adapter, denoiser, plan = _setup(bundles, cache, "sampling.guidance_scale=4.0")
    text = denoiser.encode(plan)
    assert text.guided and text.embeds.shape[:2] == (2, 2)  # (uncond, cond) x shots
    assert denoiser.encode(plan) is text  # encoded once per video
    other = ShotPlan.from_config(load_config(None, [f"model.cache_dir={cache}", *FAST, "sampling.guidance_scale=4.0",
                                                    "video.shots=[{prompt: a green cube, seconds: 1}]"]))
    assert denoiser.encode(other).embeds.shape[:2] == (2, 1)  # other prompts are encoded anew
    calls = []
    denoiser.run_model = lambda *a: calls.append(a[0].shape[0]) or adapter(*a)
    batched = denoiser.denoise_block(plan, plan.blocks[0])
    assert calls == [2, 2]

    def separate(latents, t, embeds, layout, meta, states, mask):  # one call per row
        return torch.cat([adapter(latents[i:i + 1], t[i:i + 1], embeds[i:i + 1], layout, meta, states, mask[i:i + 1])
                          for i in range(2)])

    unbatched = Denoiser(adapter, denoiser.bundle, cfg, separate).denoise_block(plan, plan.blocks[0])
    assert (batched - unbatched).abs().max().item() <= 1e-5

    # The guidance formula itself: one step of Euler from the same noise with two separate predictions.
    x = block_noise(plan, plan.blocks[0], cfg.video.seed)
    scheduler = make_scheduler(cfg.sampling)
    scheduler.set_timesteps(1)
    t = scheduler.timesteps[0]
    layout = plan.blocks[0].layout
    with torch.no_grad():
        uncond, cond = (adapter(x, t[None], text.embeds[i:i + 1], layout, None, None, text.mask[i:i + 1])
                        for i in range(2))
    expected = scheduler.step(uncond + 4.0 * (cond - uncond), t, x, return_dict=False)[0]
    one_step = Denoiser(adapter, denoiser.bundle, load_config(None, [f"model.cache_dir={cache}", *FAST,
                        "sampling.guidance_scale=4.0", "sampling.steps=1"]))
    assert (one_step.denoise_block(plan, plan.blocks[0]) - expected).abs().max().item() <= 1e-5


def test_no_guidance_skips_the_uncond_row(bundles, cache):
    _, adapter, denoiser, plan = _setup(bundles, cache, "sampling.guidance_scale=1.0")
    calls = []
    denoiser.run_model = lambda *a: calls.append(a[0].shape[0]) or adapter(*a)
    denoiser.denoise_block(plan, plan.blocks[0])
    assert denoiser.encode(plan).embeds.shape[0] == 1 and calls == [1, 1]


def test_progress_and_meta_per_step(bundles, cache):
    _, adapter, denoiser, plan = _setup(bundles, cache, "sampling.steps=3", "sampling.scheduler=unipc")
    seen, metas = [], []

    def model(latents, t, embeds, layout, meta, states, mask):
        metas.append(meta)
        return adapter(latents, t, embeds, layout, meta, states, mask)

    denoiser.run_model = model
    out = denoiser.denoise_block(plan, plan.blocks[0], progress=lambda *a: seen.append(a))
    assert seen == [(0, 1, 3), (0, 2, 3), (0, 3, 3)] and torch.isfinite(out).all()
    assert [m.step for m in metas] == [0, 1, 2] and all(m.layout is plan.blocks[0].layout for m in metas)


@pytest.mark.parametrize("method", [m for m in method_names() if m != "linear"])
def test_every_softmax_method_denoises_the_tiny_wan(bundles, cache, method):
    _, adapter, denoiser, plan = _setup(bundles, cache, f"attention.method={method}")
    out = denoiser.denoise_block(plan, plan.blocks[0])
    assert out.shape == plan.latent_shape(plan.blocks[0]) and torch.isfinite(out).all()
    if method == "lite":  # the denoiser owns this video's slots; lite keeps its skip record there
        assert all(denoiser.states[layer].value is not None for layer in range(adapter.num_layers))


def test_linear_denoises_the_tiny_sana(bundles, cache):
    _, adapter, denoiser, plan = _setup(bundles, cache, *SANA)
    out = denoiser.denoise_block(plan, plan.blocks[0])
    assert out.shape == plan.latent_shape(plan.blocks[0]) and torch.isfinite(out).all()
    assert [type(fn).__name__ for fn in adapter.attention] == ["LinearAttention"] * 2
    # every video gets fresh slots
    assert all(slot.value is None for slot in Denoiser(adapter, denoiser.bundle, denoiser.cfg).states)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", method_names())
def test_every_method_denoises_on_cuda_in_bf16(cache, method):
    extra = SANA if method == "linear" else [f"attention.method={method}"]
    cfg = load_config(None, [f"model.cache_dir={cache}", *FAST, "model.device=cuda", "model.dtype=bfloat16",
                             "video.height=64", "video.width=96", "sampling.guidance_scale=3.0", *extra])
    bundle = load_model(cfg.model)
    denoiser = Denoiser(build_adapter(bundle, cfg.attention), bundle, cfg)
    plan = ShotPlan.from_config(cfg)
    out = denoiser.denoise_block(plan, plan.blocks[0])
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert out.shape == plan.latent_shape(plan.blocks[0]) and torch.isfinite(out).all()
