"""Loader: tiny presets build once with seeded random weights, save in diffusers layout and load back
through the loader users' weights take, bit-identically, without touching the network; prompts
encode with each family's conventions."""

import json
import os
import shutil
import socket

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.models import encode_prompts, load_model, load_vae
from pipeline.models import random_weights
from pipeline.models.random_weights import build_components, publish, random_weights_dir

PRESETS = {"wan": ["model=tiny-wan"], "sana": ["model=tiny-sana", "attention=linear"]}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture
def no_network(monkeypatch):
    """Any connection or name lookup beyond 127.0.0.1 fails and is recorded (a test then asserts none)."""
    attempts = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def local(host) -> bool:
        return host in ("127.0.0.1", "::1", "localhost")

    def guarded_connect(self, address):
        if isinstance(address, tuple) and not local(address[0]):
            attempts.append(address)
            raise OSError(f"test: no network ({address})")
        return connect(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not local(host):
            attempts.append(host)
            raise socket.gaierror(f"test: no network ({host})")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    return attempts


def _cfg(cache, family, *overrides):
    return load_config(None, [*PRESETS[family], f"model.cache_dir={cache}", "model.device=cpu", *overrides])


@pytest.mark.parametrize("family", ["wan", "sana"])
def test_tiny_preset_is_built_once_and_reloads_bit_identically(family, cache, no_network, monkeypatch):
    cfg = _cfg(cache, family)
    bundle = load_model(cfg.model)
    path = random_weights_dir(cfg.model)
    assert bundle.path == str(path) and path.name.startswith(f"tiny-{family}-")
    assert sorted(os.listdir(path)) == ["model_index.json", "text_encoder", "tokenizer", "transformer", "vae"]
    index = json.loads((path / "model_index.json").read_text())
    assert index["transformer"][1] == type(bundle.transformer).__name__
    assert index["text_encoder"][1] == type(bundle.text_encoder).__name__
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]

    # What was saved is what the seeded build makes in memory, tensor for tensor.
    built = build_components(cfg.model)
    for name in ("transformer", "vae", "text_encoder"):
        saved, loaded = built[name].state_dict(), getattr(bundle, name).state_dict()
        assert saved.keys() == loaded.keys()
        assert all(torch.equal(saved[k], loaded[k]) for k in saved), name
    ids = lambda tok: tok(["a red circle"], padding="max_length", max_length=16).input_ids  # noqa: E731
    assert ids(built["tokenizer"]) == ids(bundle.tokenizer)

    # A second load reads the cache: building again would raise.
    stamp = path.stat().st_mtime_ns
    monkeypatch.setattr(random_weights, "build_components", lambda _: pytest.fail("rebuilt a cached preset"))
    again = load_model(cfg.model)
    assert path.stat().st_mtime_ns == stamp
    assert all(torch.equal(a, b) for a, b in zip(bundle.transformer.state_dict().values(),
                                                 again.transformer.state_dict().values()))
    # The directory loads through model.path, the way users' weights do.
    by_path = load_model(_cfg(cache, family, f"model.path={path}").model)
    assert torch.equal(by_path.vae.decoder.conv_out.weight, bundle.vae.decoder.conv_out.weight)
    assert no_network == []


def test_cache_key_follows_the_architecture(cache):
    base = _cfg(cache, "wan")
    wider = _cfg(cache, "wan", "model.architecture.transformer.ffn_dim=64")
    assert random_weights.cache_key(base.model) == random_weights.cache_key(_cfg(cache, "wan").model)
    assert random_weights.cache_key(base.model) != random_weights.cache_key(wider.model)


def test_a_racing_build_keeps_the_first_directory(tmp_path):
    """Two processes build the same preset: the second rename fails and its copy is dropped."""
    target, late = tmp_path / "tiny-wan-abc", tmp_path / ".tiny-wan-abc-tmp"
    for d, marker in ((target, "first"), (late, "second")):
        d.mkdir()
        (d / "model_index.json").write_text(marker)
    assert publish(late, target) == target
    assert (target / "model_index.json").read_text() == "first" and not late.exists()
    fresh = tmp_path / ".tiny-wan-new-tmp"
    fresh.mkdir()
    (fresh / "model_index.json").write_text("only")
    assert publish(fresh, tmp_path / "tiny-wan-new").joinpath("model_index.json").read_text() == "only"


def test_dtype_and_device_arguments_override_the_config(cache):
    bundle = load_model(_cfg(cache, "wan").model, "cpu", torch.bfloat16)
    assert bundle.device == torch.device("cpu") and bundle.dtype == torch.bfloat16
    assert bundle.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16  # (diffusers keeps some norms fp32)
    assert next(bundle.text_encoder.parameters()).dtype == torch.bfloat16
    assert next(bundle.vae.parameters()).dtype == torch.float32  # model.vae_dtype
    assert not any(p.requires_grad for p in bundle.transformer.parameters())


def test_load_vae_reads_the_same_vae_alone(cache, tmp_path, no_network):
    """The writer's loader: the bundle's VAE (same weights, model.vae_dtype, frozen), and the same
    one-line errors as load_model."""
    cfg = _cfg(cache, "wan").model
    vae, bundle = load_vae(cfg, "cpu"), load_model(cfg, "cpu", torch.bfloat16)
    assert type(vae) is type(bundle.vae) and next(vae.parameters()).dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), bundle.vae.state_dict().values()))
    assert not any(p.requires_grad for p in vae.parameters())
    with pytest.raises(ConfigError) as e:
        load_vae(_cfg(cache, "wan", f"model.path={tmp_path}/missing").model)
    _one_line(e, "model.path: no such directory")


def test_routers_shipped_with_the_weights_are_loaded(cache, tmp_path, no_network):
    from safetensors.torch import save_file

    cfg = _cfg(cache, "wan")
    weights = tmp_path / "finetune"
    shutil.copytree(random_weights_dir(cfg.model), weights)
    routers = {"0.proj.weight": torch.randn(5, 64), "1.proj.weight": torch.randn(5, 64)}
    save_file(routers, str(weights / "transformer" / "longreel_routers.safetensors"))
    bundle = load_model(_cfg(cache, "wan", f"model.path={weights}").model)
    assert bundle.routers_state.keys() == routers.keys()
    assert all(torch.equal(bundle.routers_state[k], routers[k]) for k in routers)
    assert load_model(cfg.model).routers_state is None
    assert no_network == []


def _one_line(excinfo, start):
    text = str(excinfo.value)
    assert text.startswith(start) and "\n" not in text, text


def test_bad_weights_fail_with_one_line(cache, tmp_path, no_network):
    with pytest.raises(ConfigError) as e:
        load_model(_cfg(cache, "wan", f"model.path={tmp_path}/missing").model)
    _one_line(e, "model.path: no such directory")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as e:
        load_model(_cfg(cache, "wan", f"model.path={tmp_path}/empty").model)
    _one_line(e, "model.path: cannot load wan weights")
    sana_dir = random_weights_dir(_cfg(cache, "sana").model)
    with pytest.raises(ConfigError) as e:
        load_model(_cfg(cache, "wan", f"model.path={sana_dir}").model)
    _one_line(e, "model.family: the weights' transformer is SanaVideoTransformer3DModel")
    other_vae = tmp_path / "other-vae"
    shutil.copytree(random_weights_dir(_cfg(cache, "wan").model), other_vae)
    index = json.loads((other_vae / "model_index.json").read_text())
    (other_vae / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderDC"]}))
    with pytest.raises(ConfigError) as e:
        load_model(_cfg(cache, "wan", f"model.path={other_vae}").model)
    _one_line(e, "model.path: VAE class not supported")
    (other_vae / "model_index.json").write_text(json.dumps({**index, "transformer_2": ["diffusers", "X"]}))
    with pytest.raises(ConfigError) as e:
        load_model(_cfg(cache, "wan", f"model.path={other_vae}").model)
    _one_line(e, "model.path: two-expert Wan2.2 (A14B) weights are not supported")
    assert no_network == []


def test_wan_prompts_are_zeroed_past_their_length(cache):
    bundle = load_model(_cfg(cache, "wan").model)
    text = encode_prompts(bundle, ["a red  circle", "a blue square moves left"], 32)
    assert text.embeds.shape == (2, 32, 32) and text.lengths.tolist() == [13, 25]  # bytes + EOS; spaces collapsed
    assert torch.all(text.embeds[0, 13:] == 0) and torch.all(text.embeds[0, :13].abs().sum(-1) > 0)
    # the real positions are the encoder's own output for the prompt
    ids = bundle.tokenizer(["a red circle"], return_tensors="pt").input_ids
    alone = bundle.text_encoder(input_ids=ids).last_hidden_state[0]
    torch.testing.assert_close(text.embeds[0, :13], alone, rtol=1e-5, atol=1e-5)


def test_sana_instruction_keeps_the_first_and_last_tokens(cache):
    bundle = load_model(_cfg(cache, "sana").model)
    instruction = "Describe the video in detail: "
    text = encode_prompts(bundle, ["A Red Circle"], 16, instruction)
    assert text.embeds.shape == (1, 16, 32)
    # reference: the whole instruction + lower-cased prompt, tokenized to |instruction| + 16 - 2 tokens
    total = len(bundle.tokenizer.encode(instruction)) + 14
    tok = bundle.tokenizer([instruction + "a red circle"], padding="max_length", max_length=total,
                           return_tensors="pt")
    full = bundle.text_encoder(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state[0]
    keep = [0, *range(total - 15, total)]
    mask = tok.attention_mask[0, keep].bool()
    assert text.mask[0].tolist() == mask.tolist()
    torch.testing.assert_close(text.embeds[0][mask], full[keep][mask], rtol=1e-5, atol=1e-5)
    assert torch.all(text.embeds[0][~mask] == 0)
