"""The adapter over diffusers' transformers: its forward equals diffusers' own (Wan dense, SANA-Video
linear; fp32), cross-attention reads each shot's own prompt, batched rows equal separate calls,
RoPE positions are absolute, per-layer attention is replaceable, MoGA routers are owned per layer."""

import copy

import pytest
import torch

from pipeline.attention import AttentionMeta
from pipeline.config import ConfigError, load_config
from pipeline.layout import VideoLayout
from pipeline.models import build_adapter, encode_prompts, load_model
from pipeline.models.processors import ForwardContext, shot_runs

PRESETS = {"wan": ["model=tiny-wan"], "sana": ["model=tiny-sana", "attention=linear"]}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


def _cfg(cache, family, *overrides):
    """CPU unless overridden: the references below run on the CPU (CUDA has its own tests at the end)."""
    return load_config(None, [*PRESETS[family], f"model.cache_dir={cache}", "model.device=cpu", *overrides])


def _setup(cache, family, *overrides):
    """(cfg, bundle, diffusers' transformer with its own processors, adapter over another copy)."""
    cfg = _cfg(cache, family, *overrides)
    bundle = load_model(cfg.model)
    raw = copy.deepcopy(bundle.transformer)  # the adapter swaps the processors of bundle.transformer
    return cfg, bundle, raw, build_adapter(bundle, cfg.attention)


@pytest.fixture(scope="module")
def wan(cache):
    return _setup(cache, "wan")


@pytest.fixture(scope="module")
def sana(cache):
    return _setup(cache, "sana")


def _reference(family, raw, latents, t, text):
    """diffusers' own forward with one prompt per batch row: text.embeds (B, L, C), text.mask (B, L)."""
    if family == "wan":
        return raw(hidden_states=latents, timestep=t, encoder_hidden_states=text.embeds, return_dict=False)[0]
    return raw(hidden_states=latents, encoder_hidden_states=text.embeds, timestep=t,
               encoder_attention_mask=text.mask.long(), return_dict=False)[0]


@pytest.mark.parametrize("family", ["wan", "sana"])
@torch.no_grad()
def test_adapter_forward_equals_diffusers(family, request):
    _, bundle, raw, adapter = request.getfixturevalue(family)
    text = encode_prompts(bundle, ["a red circle moves right", "a green square"], 16)
    latents, t = torch.randn(2, 16, 3, 8, 12), torch.tensor([700.0, 120.0])  # two rows, two timesteps
    layout = VideoLayout(3, 4, 6)
    ours = adapter(latents, t, text.embeds[:, None], layout, states=adapter.new_states(),
                   text_mask=text.mask[:, None])
    ref = _reference(family, raw, latents, t, text)
    assert ours.shape == ref.shape == latents.shape
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["wan", "sana"])
@torch.no_grad()
def test_shots_with_one_prompt_equal_diffusers(family, request):
    """Three shots that share a prompt: per-shot cross-attention then is diffusers' cross-attention."""
    _, bundle, raw, adapter = request.getfixturevalue(family)
    text = encode_prompts(bundle, ["a blue ball"], 16)
    latents, t = torch.randn(1, 16, 4, 8, 8), torch.tensor([400.0])
    layout = VideoLayout(4, 4, 4, shot_frames=(1, 2, 1))
    ours = adapter(latents, t, text.embeds[None].expand(1, 3, -1, -1), layout, states=adapter.new_states(),
                   text_mask=text.mask[None].expand(1, 3, -1))
    assert (ours - _reference(family, raw, latents, t, text)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["wan", "sana"])
@torch.no_grad()
def test_cross_attention_reads_each_shots_own_prompt(family, request):
    """Tokens of shot s attend to prompt s only: diffusers' cross-attention with prompt s alone."""
    _, bundle, raw, adapter = request.getfixturevalue(family)
    text = encode_prompts(bundle, ["a red circle", "a green triangle bounces", "night"], 16)
    layout = VideoLayout(4, 4, 4, shot_frames=(1, 2, 1), first_shot=1)  # a block holding shots 1, 2, 3
    embeds = torch.cat([torch.zeros_like(text.embeds[:1]), text.embeds])[None]  # rows 0..3; row 0 unused
    mask = torch.cat([torch.ones_like(text.mask[:1]), text.mask])[None]
    tokens = adapter.prepare(torch.randn(1, 16, 4, 8, 8), torch.tensor([300.0]), embeds, layout, mask)
    assert tokens.shot.tolist() == [1] * 16 + [2] * 32 + [3] * 16
    hidden = torch.randn(1, layout.num_tokens, adapter.dim)
    adapter.context = ForwardContext(AttentionMeta(layout), [None] * adapter.num_layers, shot_runs(tokens.shot),
                                     tokens.text_len, tokens.cond.get("text_mask"))
    try:
        ours = adapter.blocks[0].attn2(hidden, tokens.cond["text"])
    finally:
        adapter.context = None
    ref_attn = raw.blocks[0].attn2 if family == "wan" else raw.transformer_blocks[0].attn2
    for row, (a, b) in zip((1, 2, 3), [(0, 16), (16, 48), (48, 64)]):
        rows = tokens.cond["text"][:, row * 16:(row + 1) * 16]
        if family == "wan":
            ref = ref_attn(hidden[:, a:b], rows)
        else:
            bias = ((1 - mask[:, row].float()) * -10000.0)[:, None]  # (B, 1, L), as diffusers' forward makes it
            ref = ref_attn(hidden[:, a:b], encoder_hidden_states=rows, attention_mask=bias)
        assert (ours[:, a:b] - ref).abs().max().item() <= 1e-5


@torch.no_grad()
def test_batched_rows_equal_separate_calls(wan):
    _, bundle, _, adapter = wan
    text = encode_prompts(bundle, ["", "a red circle", "a blue square"], 16)
    latents, layout = torch.randn(1, 16, 3, 8, 8), VideoLayout(3, 4, 4, shot_frames=(2, 1))
    embeds = torch.stack([text.embeds[[0, 0]], text.embeds[[1, 2]]])  # (2, S=2, L, C): uncond row, cond row
    both = adapter(latents.expand(2, -1, -1, -1, -1), torch.tensor([500.0, 500.0]), embeds, layout)
    one = [adapter(latents, torch.tensor([500.0]), embeds[i:i + 1], layout) for i in range(2)]
    assert (both - torch.cat(one)).abs().max().item() <= 1e-5


def test_rope_positions_are_absolute(wan):
    _, _, _, adapter = wan
    whole = VideoLayout(6, 4, 4)
    late = whole.frames_slice(4, 6)
    cos_all, sin_all = adapter.rope(whole, "cpu")
    cos, sin = adapter.rope(late, "cpu")
    assert cos.shape == (1, 32, 1, adapter.head_dim) and cos.dtype == torch.float32
    assert torch.equal(cos, cos_all[:, 4 * 16:]) and torch.equal(sin, sin_all[:, 4 * 16:])
    assert not torch.equal(cos, adapter.rope(VideoLayout(2, 4, 4), "cpu")[0])  # frame 0, 1 differ from 4, 5
    with pytest.raises(ConfigError, match="rope_max_seq_len 256"):
        adapter.rope(VideoLayout(300, 4, 4), "cpu")


@torch.no_grad()
def test_a_layers_attention_callable_can_be_replaced(wan):
    _, bundle, _, adapter = wan
    text = encode_prompts(bundle, ["a red circle"], 16)
    latents, t, layout = torch.randn(1, 16, 2, 8, 8), torch.tensor([250.0]), VideoLayout(2, 4, 4)
    before = adapter(latents, t, text.embeds[None], layout)
    method, calls = adapter.attention[1], []

    class Recording:  # what context parallelism's wrapper looks like from here
        needs_routing, applies_rope, has_state = method.needs_routing, method.applies_rope, method.has_state

        def __call__(self, q, k, v, meta):
            calls.append((tuple(q.shape), meta.layer, meta.layout))
            return method(q, k, v, meta)

    adapter.set_attention(1, Recording())
    try:
        after = adapter(latents, t, text.embeds[None], layout)
    finally:
        adapter.set_attention(1, method)
    assert calls == [((1, 32, adapter.heads, adapter.head_dim), 1, layout)]
    assert torch.equal(before, after)


def test_dense_layers_keep_softmax_and_bad_layers_are_refused(cache, wan):
    _, bundle, _, _ = wan
    cfg = _cfg(cache, "wan", "attention.method=moc", "attention.dense_layers=[0]")
    adapter = build_adapter(bundle, cfg.attention)
    assert [fn.name for fn in adapter.attention] == ["dense", "moc"]
    with pytest.raises(ConfigError) as e:
        build_adapter(bundle, _cfg(cache, "wan", "attention.dense_layers=[2]").attention)
    assert str(e.value).startswith("attention.dense_layers: layers [2] do not exist") and "\n" not in str(e.value)


@torch.no_grad()
def test_moga_with_one_group_equals_diffusers(cache, wan):
    """With M = 1 every token is in the one group and the gate is 1: MoGA is dense attention."""
    _, bundle, raw, _ = wan
    cfg = _cfg(cache, "wan", "attention.method=moga", "attention.moga.num_groups=1")
    adapter = build_adapter(bundle, cfg.attention)
    text = encode_prompts(bundle, ["a red circle"], 16)
    latents, t = torch.randn(1, 16, 2, 8, 8), torch.tensor([600.0])
    ours = adapter(latents, t, text.embeds[None], VideoLayout(2, 4, 4))
    assert (ours - _reference("wan", raw, latents, t, text)).abs().max().item() <= 1e-5
    assert len(adapter.aux_losses) == 2


@torch.no_grad()
def test_moga_routers_route_each_layer_and_fit_once_per_video(cache, wan):
    _, bundle, _, _ = wan
    cfg = _cfg(cache, "wan", "attention.method=moga", "attention.moga.num_groups=3", "attention.dense_layers=[0]")
    adapter = build_adapter(bundle, cfg.attention)
    assert sorted(adapter.routers) == ["1"] and adapter.routers_to_fit == {1}  # router_init auto, no checkpoint
    text = encode_prompts(bundle, ["a red circle"], 16)
    layout = VideoLayout(2, 4, 4)
    run = lambda: adapter(torch.randn(2, 16, 2, 8, 8), torch.tensor([600.0, 600.0]),  # noqa: E731
                          text.embeds[None].expand(2, -1, -1, -1), layout)
    run()
    routing = adapter.last_meta[1].routing
    assert routing.groups.shape == (2, 32) and routing.num_groups == 3 and adapter.last_meta[0].routing is None
    assert len(adapter.aux_losses) == 1 and torch.isfinite(adapter.aux_losses[0])
    fitted = adapter.routers["1"].proj.weight.clone()
    run()
    assert torch.equal(adapter.routers["1"].proj.weight, fitted)  # frozen for the rest of the video
    adapter.reset_routers()
    run()
    assert not torch.equal(adapter.routers["1"].proj.weight, fitted)  # the next video fits its own


def test_moga_routers_from_a_checkpoint(cache, wan):
    _, bundle, _, _ = wan
    cfg = _cfg(cache, "wan", "attention.method=moga", "attention.moga.router_init=checkpoint")
    with pytest.raises(ConfigError, match="router_init: the weights ship no"):
        build_adapter(bundle, cfg.attention)
    state = {"0.proj.weight": torch.randn(5, 64), "1.proj.weight": torch.randn(5, 64)}
    adapter = type(build_adapter(bundle, _cfg(cache, "wan").attention))(bundle.transformer, cfg.attention, state)
    assert torch.equal(adapter.routers["1"].proj.weight, state["1.proj.weight"]) and not adapter.routers_to_fit


def test_image_conditioned_wan_is_refused():
    from diffusers import WanTransformer3DModel

    from pipeline.models.wan import WanAdapter

    i2v = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=8, text_dim=16, freq_dim=16, ffn_dim=16,
                                num_layers=1, image_dim=16)
    with pytest.raises(ConfigError, match="only text-to-video Wan"):
        WanAdapter(i2v, load_config(None, []).attention)


# --- CUDA (skipped without a GPU): the same equality on the device, and bf16 as close as diffusers' ---

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("family", ["wan", "sana"])
@torch.no_grad()
def test_adapter_forward_equals_diffusers_on_cuda(family, cache):
    preds = {}
    for dtype in ("float32", "bfloat16"):
        _, bundle, raw, adapter = _setup(cache, family, "model.device=cuda", f"model.dtype={dtype}")
        gen = torch.Generator("cpu").manual_seed(0)
        latents = torch.randn(2, 16, 5, 16, 24, generator=gen).to("cuda", bundle.dtype)
        t = torch.tensor([700.0, 120.0], device="cuda")
        text = encode_prompts(bundle, ["a red circle moves right", "a green square"], 32)
        layout = VideoLayout(5, 8, 12)
        ours = adapter(latents, t, text.embeds[:, None], layout, states=adapter.new_states(),
                       text_mask=text.mask[:, None]).float()
        preds[dtype] = (ours, _reference(family, raw, latents, t, text).float())
    ours32, ref32 = preds["float32"]
    assert (ours32 - ref32).abs().max().item() <= 1e-4  # kernels may differ in summation order on the GPU
    ours16, ref16 = preds["bfloat16"]
    assert (ours16 - ref32).abs().max().item() <= 2 * (ref16 - ref32).abs().max().item() + 1e-2
