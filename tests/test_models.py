"""Model loading and the adapter: tiny random presets through the users' loader; the adapter's
forward equals diffusers' own; per-shot cross-attention; batched CFG equals separate calls."""

import copy
import os

import pytest
import torch

from pipeline.config import load_config
from pipeline.layout import VideoLayout
from pipeline.models import build_adapter, encode_prompts, load_model
from pipeline.models.loader import build_random

torch.manual_seed(0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


def _cfg(cache, *overrides):
    return load_config(None, [f"model.cache_dir={cache}", *overrides])


@pytest.fixture(scope="module")
def wan(cache):
    cfg = _cfg(cache)
    bundle = load_model(cfg.model)
    return cfg, bundle, copy.deepcopy(bundle.transformer), build_adapter(bundle, cfg.attention)


@pytest.fixture(scope="module")
def sana(cache):
    cfg = _cfg(cache, "model=tiny-sana", "attention=linear")
    bundle = load_model(cfg.model)
    return cfg, bundle, copy.deepcopy(bundle.transformer), build_adapter(bundle, cfg.attention)


def test_random_preset_is_saved_once_and_reloads_identically(cache, wan, monkeypatch):
    cfg, bundle, raw, _ = wan
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
    path = build_random(cfg.model)
    assert sorted(os.listdir(path)) == ["model_index.json", "text_encoder", "tokenizer", "transformer", "vae"]
    stamp = {p: os.stat(os.path.join(path, p)).st_mtime_ns for p in os.listdir(path)}
    again = load_model(cfg.model)
    assert again.path == bundle.path == str(path)
    assert stamp == {p: os.stat(os.path.join(path, p)).st_mtime_ns for p in os.listdir(path)}  # not rebuilt
    for a, b in zip(raw.state_dict().values(), again.transformer.state_dict().values()):
        assert torch.equal(a, b)
    # The same directory loads through model.path, the way users' weights do.
    by_path = load_model(_cfg(cache, f"model.path={path}").model)
    assert torch.equal(by_path.vae.decoder.conv_out.weight, bundle.vae.decoder.conv_out.weight)


def test_bad_path_is_one_line(cache, tmp_path):
    with pytest.raises(ValueError) as err:
        load_model(_cfg(cache, f"model.path={tmp_path}/missing").model)
    assert str(err.value).startswith("model.path: cannot load wan weights from") and "\n" not in str(err.value)


def test_prompts_encode_offline_with_zeroed_padding(wan):
    _, bundle, _, _ = wan
    text = encode_prompts(bundle, ["a red circle", "a blue square moves left"], 32)
    assert text.embeds.shape == (2, 32, 32) and text.mask.sum(1).tolist() == [13, 25]
    assert torch.all(text.embeds[0, 13:] == 0) and text.embeds[0, :13].abs().sum() > 0


@pytest.mark.parametrize("family", ["wan", "sana"])
def test_adapter_equals_diffusers_forward(family, request):
    cfg, bundle, raw, adapter = request.getfixturevalue(family)
    text = encode_prompts(bundle, ["a red circle moves right"], 16)
    latents, t = torch.randn(1, 16, 3, 8, 8), torch.tensor([700.0])
    layout = VideoLayout(3, 4, 4)
    with torch.no_grad():
        ours = adapter(latents, t, text.embeds[None], layout, states=adapter.new_states(), text_mask=text.mask[None])
        if family == "wan":
            ref = raw(hidden_states=latents, timestep=t, encoder_hidden_states=text.embeds, return_dict=False)[0]
        else:
            ref = raw(hidden_states=latents, encoder_hidden_states=text.embeds, timestep=t,
                      encoder_attention_mask=text.mask.long(), return_dict=False)[0]
    assert ours.shape == ref.shape == latents.shape
    assert (ours - ref).abs().max().item() <= 1e-5


def test_cross_attention_reads_each_shots_own_prompt(wan):
    """Tokens of shot s see only prompt s: the same as diffusers' cross-attention with prompt s."""
    _, bundle, raw, adapter = wan
    text = encode_prompts(bundle, ["a red circle", "a green triangle bounces"], 16)
    layout = VideoLayout(4, 4, 4, shot_frames=(3, 1))
    tokens = adapter.prepare(torch.randn(1, 16, 4, 8, 8), torch.tensor([300.0]), text.embeds[None], layout)
    hidden = torch.randn(1, layout.num_tokens, adapter.dim)
    from pipeline.attention import AttentionMeta
    from pipeline.models.adapter import ForwardContext, shot_runs

    adapter.context = ForwardContext(AttentionMeta(layout), [None] * adapter.num_layers, shot_runs(tokens.shot),
                                     tokens.text_len, None)
    try:
        with torch.no_grad():
            ours = adapter.blocks[0].attn2(hidden, tokens.cond["text"])
    finally:
        adapter.context = None
    ref_attn = raw.blocks[0].attn2
    with torch.no_grad():
        for shot, (a, b) in enumerate([(0, 48), (48, 64)]):
            rows = tokens.cond["text"][:, shot * 16:(shot + 1) * 16]
            ref = ref_attn(hidden[:, a:b], rows)
            assert (ours[:, a:b] - ref).abs().max().item() <= 1e-5


def test_batched_guidance_rows_equal_separate_calls(wan):
    _, bundle, _, adapter = wan
    text = encode_prompts(bundle, ["", "a red circle"], 16)
    latents, layout = torch.randn(1, 16, 2, 8, 8), VideoLayout(2, 4, 4)
    embeds = text.embeds[:, None]  # (2, 1, L, C): uncond row, cond row
    with torch.no_grad():
        both = adapter(latents.expand(2, -1, -1, -1, -1), torch.tensor([500.0, 500.0]), embeds, layout)
        one = [adapter(latents, torch.tensor([500.0]), embeds[i:i + 1], layout) for i in range(2)]
    assert (both - torch.cat(one)).abs().max().item() <= 1e-5


def test_rope_positions_are_absolute(wan):
    _, _, _, adapter = wan
    whole = VideoLayout(6, 4, 4)
    late = whole.frames_slice(4, 6)
    cos_all, sin_all = adapter.rope(whole, "cpu")
    cos, sin = adapter.rope(late, "cpu")
    assert torch.equal(cos, cos_all[:, 4 * 16:]) and torch.equal(sin, sin_all[:, 4 * 16:])
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        adapter.rope(VideoLayout(300, 4, 4), "cpu")
