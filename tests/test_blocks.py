"""Block-autoregressive generation: the carried state against independent full computations.

- SANA-Video (linear attention + Mix-FFN temporal conv): K blocks with the carried state equal one
  forward over the whole video with block-causal linear attention and a temporal conv that does
  not look across a block's end (built from the stock conv by removing that term); and, inside a
  real denoising run, every layer's output equals LinearAttention run block-causally over the
  concatenated q/k/v of the earlier blocks' commit passes and the block's own step.
- Wan (softmax + rolling KV cache): a run equals one whose layers keep every committed K/V and
  attend through masked fp32 reference attention with the sink + window rule as a mask.
- The state has the same size after 1 or 8 blocks (Wan: once the window is full), and a video
  resumed from the serialised state after block k is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.attention import AttentionMeta, StateSlot, build_method
from pipeline.attention.reference import reference_attention
from pipeline.config import ConfigError, load_config
from pipeline.layout import VideoLayout
from pipeline.models import build_adapter, load_model
from pipeline.models.carry import RollingKVCache
from pipeline.models.wan import WanAdapter
from pipeline.sampling.denoise import Denoiser, VideoText
from pipeline.sampling.plan import Block, ShotPlan
from pipeline.sampling.state import CarriedState

TOL = 1e-5
SMALL = ["video.height=48", "video.width=48", "video.fps=4", "sampling.steps=2", "sampling.guidance_scale=3.0",
         "sampling.mode=block"]
# 3 + 1 + 2 latent frames (fps 4: 8, 4 and 6 pixel frames)
SHOTS = "video.shots=[{prompt: a red circle, seconds: 2}, {prompt: a blue square, seconds: 1}, " \
        "{prompt: a green line, seconds: 1.5}]"
LONG = "video.shots=[{prompt: a red circle, seconds: 5}, {prompt: a blue square, seconds: 4}]"  # 6 + 4 frames
FAMILY = {"sana": ["model=tiny-sana", "attention=linear", "attention.linear.causal=true"], "wan": ["model=tiny-wan"]}


def make_cfg(cache, family, *overrides):
    return load_config(None, [f"model.cache_dir={cache}", *FAMILY[family], *SMALL, SHOTS, *overrides])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is several times faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(model_cache, one_thread):
    """family -> (bundle, adapter): one tiny model each, loaded like users' weights."""
    out = {}
    for family in FAMILY:
        bundle = load_model(make_cfg(model_cache, family).model)
        out[family] = (bundle, build_adapter(bundle, make_cfg(model_cache, family).attention))
    return out


def video(models, cache, family, *overrides):
    cfg = make_cfg(cache, family, *overrides)
    bundle, adapter = models[family]
    plan = ShotPlan.from_config(cfg, bundle.transformer.config.in_channels)
    return cfg, adapter, Denoiser(adapter, bundle, cfg), plan


def run_blocks(denoiser, plan, blocks=None, states=None):
    text = denoiser.encode(plan)
    return [denoiser.denoise_block(plan, b, text, states) for b in (blocks or plan.blocks)]


class Recorder:
    """Stands in for a layer's attention callable: calls it, keeps what it was given and gave."""

    def __init__(self, method, adapter):
        self.method, self.adapter, self.calls = method, adapter, []
        self.name, self.cp_strategy = method.name, method.cp_strategy
        self.needs_routing, self.applies_rope = method.needs_routing, method.applies_rope
        self.has_state = method.has_state

    def __call__(self, q, k, v, meta):
        o = self.method(q, k, v, meta)
        self.calls.append({"layout": meta.layout, "commit": meta.commit, "q": q, "k": k, "v": v, "o": o,
                           "shot_runs": list(self.adapter.context.shot_runs)})
        return o


@pytest.fixture
def recorded(models):
    """family -> list of per-layer Recorders installed on that family's adapter (removed afterwards)."""
    installed = {}

    def install(family):
        adapter = models[family][1]
        original = list(adapter.attention)
        recorders = [Recorder(fn, adapter) for fn in original]
        for layer, rec in enumerate(recorders):
            adapter.set_attention(layer, rec)
        installed[family] = original
        return recorders

    yield install
    for family, original in installed.items():
        for layer, fn in enumerate(original):
            models[family][1].set_attention(layer, fn)


# ---------------------------------------------------------------------------------------------
# SANA-Video: linear sums and the temporal-conv tail
# ---------------------------------------------------------------------------------------------


def boundary_free_conv(block_ends: list[int]):
    """A forward hook for conv_temp ((3, 1) kernel over frames of (B, C, T, S)) that removes, at the
    last frame of every block but the video's last, the term its right tap took from the next block."""

    def hook(conv, args, out):
        x, out = args[0], out.clone()
        for f in block_ends[:-1]:
            out[:, :, f:f + 1] -= F.conv2d(x[:, :, f + 1:f + 2], conv.weight[:, :, 2:3])
        return out

    return hook


def test_sana_blocks_with_carried_state_equal_one_block_causal_pass(models, model_cache):
    _, adapter = models["sana"]
    cfg = make_cfg(model_cache, "sana")
    sizes, (h, w) = (2, 1, 3), (3, 3)
    whole = VideoLayout(sum(sizes), h, w, shot_frames=(3, 3), block_frames=sizes)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, whole.frames, 2 * h, 2 * w, generator=g)
    # two rows of text (CFG's uncond and cond: each row keeps its own state), two shots, 4 tokens
    text = VideoText(torch.randn(2, 2, 4, adapter.transformer.config.caption_channels, generator=g),
                     torch.ones(2, 2, 4, dtype=torch.bool))
    text.mask[:, :, -1] = False
    t = torch.tensor([700.0, 700.0])

    ends = torch.tensor(sizes).cumsum(0).sub(1).tolist()
    hooks = [b.ff.conv_temp.register_forward_hook(boundary_free_conv(ends)) for b in adapter.blocks]
    try:
        with torch.no_grad():  # one forward over the whole video, linear.causal over `sizes`
            want = adapter(latents.repeat(2, 1, 1, 1, 1), t, text.embeds, whole, AttentionMeta(whole),
                           adapter.new_states(), text.mask)
    finally:
        for hk in hooks:
            hk.remove()

    denoiser = Denoiser(adapter, models["sana"][0], cfg)

    def blockwise(carry: bool) -> torch.Tensor:
        states, out, start = CarriedState.new(adapter, cfg.sampling), [], 0
        for index, n in enumerate(sizes):
            layout = whole.frames_slice(start, start + n)
            x = latents[:, :, start:start + n]
            with torch.no_grad():
                out.append(adapter(x.repeat(2, 1, 1, 1, 1), t, text.embeds, layout, AttentionMeta(layout), states,
                                   text.mask))
            if carry:  # a commit pass at the step's own timestep writes exactly the block's own sums
                denoiser.commit_block(Block(index, start, start + n, layout, 0), x, text, states, timestep=700.0)
            start += n
        return torch.cat(out, 2)

    got = blockwise(carry=True)
    assert (got - want).abs().max().item() <= TOL
    assert (blockwise(carry=False) - want).abs().max().item() > 1e-3  # the carried state matters


def test_denoised_sana_layers_equal_linear_attention_over_committed_blocks(models, model_cache, recorded):
    cfg, adapter, denoiser, plan = video(models, model_cache, "sana", "sampling.block_frames=2")
    recorders = recorded("sana")
    run_blocks(denoiser, plan)
    causal = build_method(cfg.attention, "cpu", torch.float32, "linear")
    assert causal.cfg.linear.causal
    whole_rope = adapter.rope(plan.layout, "cpu")
    tpf = plan.layout.tokens_per_frame
    for rec in recorders:
        commits = [c for c in rec.calls if c["commit"]]
        assert [c["layout"].frame_offset for c in commits] == [b.frame_start for b in plan.blocks[:-1]]
        for call in (c for c in rec.calls if not c["commit"]):
            layout = call["layout"]
            earlier = [c for c in commits if c["layout"].frame_offset < layout.frame_offset]
            parts = earlier + [call]
            sizes = tuple(c["layout"].frames for c in parts)
            cat = VideoLayout(sum(sizes), layout.height, layout.width, block_frames=sizes)
            rope = tuple(r[:, :cat.frames * tpf] for r in whole_rope)  # absolute positions 0.. of the video
            q, k, v = (torch.cat([c[name] for c in parts], 1) for name in ("q", "k", "v"))
            want = causal(q, k, v, AttentionMeta(cat, rope=rope))[:, -call["q"].shape[1]:]
            assert (call["o"] - want).abs().max().item() <= TOL


def test_sana_state_bytes_are_the_same_after_1_and_8_blocks(models, model_cache):
    cfg, adapter, denoiser, plan = video(models, model_cache, "sana", LONG, "sampling.block_frames=1")
    assert len(plan.blocks) == 10
    text, sizes = denoiser.encode(plan), []
    for block in plan.blocks[:8]:
        denoiser.denoise_block(plan, block, text)
        sizes.append((denoiser.states.nbytes, len(denoiser.states.to_bytes())))
    assert sizes[0] == sizes[7] and sizes[0][0] > 0
    heads, dim = adapter.heads, adapter.head_dim
    linear = 2 * heads * dim * (dim + 1) * 4  # S and z per CFG row, fp32
    tail = 2 * 1 * plan.layout.tokens_per_frame * adapter.dim * 4  # one frame of Mix-FFN input per row
    assert sizes[0][0] == adapter.num_layers * (linear + tail)


# ---------------------------------------------------------------------------------------------
# Wan: the rolling KV cache
# ---------------------------------------------------------------------------------------------


class FullContextReference:
    """Keeps every committed block's keys and values (no eviction) and attends with masked fp32
    reference attention: a query of the block at frame s sees its block, frames < sink and frames
    >= s - window."""

    name, cp_strategy, needs_routing, applies_rope, has_state = "dense", "ulysses", False, False, True

    def __init__(self, sink: int, window: int):
        self.sink, self.window, self.k, self.v, self.frames = sink, window, [], [], []

    def __call__(self, q, k, v, meta):
        layout = meta.layout
        start = layout.frame_offset
        frames = torch.arange(start, start + layout.frames).repeat_interleave(layout.tokens_per_frame)
        keys, values = torch.cat(self.k + [k], 1), torch.cat(self.v + [v], 1)
        key_frames = torch.cat(self.frames + [frames])
        allowed = (key_frames >= start - self.window) | (key_frames < self.sink)
        o = reference_attention(q, keys, values, allowed[None, None, None, :])
        if meta.commit:
            self.k, self.v, self.frames = self.k + [k], self.v + [v], self.frames + [frames]
        return o


@pytest.mark.parametrize("sink, window", [(1, 64), (1, 2), (0, 1), (2, 1)])
def test_wan_rolling_cache_equals_masked_full_context(models, model_cache, sink, window):
    """window 64 covers the whole video: every block sees all earlier ones (full causal context)."""
    cfg, adapter, denoiser, plan = video(models, model_cache, "wan", "sampling.block_frames=1",
                                         f"sampling.sink_frames={sink}", f"sampling.window_frames={window}")
    got = run_blocks(denoiser, plan)
    original, again = list(adapter.attention), Denoiser(adapter, models["wan"][0], cfg)
    try:
        for layer in range(adapter.num_layers):
            adapter.set_attention(layer, FullContextReference(sink, window))
        reference = CarriedState([StateSlot() for _ in original], [None] * len(original), ["reference"] * len(original))
        want = run_blocks(again, plan, states=reference)
    finally:
        for layer, fn in enumerate(original):
            adapter.set_attention(layer, fn)
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() <= TOL
    if window < 64:  # the window shapes the result: full context gives another video
        full = run_blocks(video(models, model_cache, "wan", "sampling.block_frames=1", "sampling.window_frames=64")[2],
                          plan)
        assert max((a - b).abs().max().item() for a, b in zip(got, full)) > 1e-4


def test_wan_cache_memory_is_bounded(models, model_cache):
    cfg, adapter, denoiser, plan = video(models, model_cache, "wan", LONG, "sampling.block_frames=1",
                                         "sampling.sink_frames=1", "sampling.window_frames=2")
    text, sizes, held = denoiser.encode(plan), [], []
    for block in plan.blocks[:8]:
        denoiser.denoise_block(plan, block, text)
        sizes.append(denoiser.states.nbytes)
        held.append(denoiser.states[0].value.frames.tolist())
    assert held[:4] == [[0], [0, 1], [0, 1, 2], [0, 2, 3]] and held[7] == [0, 6, 7]
    assert sizes[0] < sizes[1] < sizes[2] == sizes[7]
    per_frame = 2 * 2 * plan.layout.tokens_per_frame * adapter.heads * adapter.head_dim * 4  # k, v; CFG rows; fp32
    assert sizes[2] == adapter.num_layers * (3 * per_frame + 3 * 8 + 2 * 8)  # + frame indices, sink and window


def test_block_mode_refuses_what_cannot_carry(models, model_cache):
    sana_cp = ["model=tiny-sana", "attention=linear", "parallel.degree=2"]
    for extra, key in ((["attention=moc"], "attention.method"), (sana_cp, "parallel.degree")):
        with pytest.raises(ConfigError) as err:
            load_config(None, [*SMALL, *extra])
        assert str(err.value).startswith(f"{key}: sampling.mode=block on") and "\n" not in str(err.value)
    # the same rule where a state is made (adapters built for joint mode, then asked to carry)
    joint = make_cfg(model_cache, "wan", "attention=moc", "sampling.mode=joint")
    adapter = WanAdapter(copy.deepcopy(models["wan"][0].transformer), joint.attention)
    assert not CarriedState.new(adapter, joint.sampling).carries
    with pytest.raises(ValueError) as err:
        CarriedState.new(adapter, make_cfg(model_cache, "wan").sampling)
    message = str(err.value)
    assert message.startswith("attention.method: moc (layer 0) cannot carry context") and "\n" not in message


# ---------------------------------------------------------------------------------------------
# Serialisation and resume
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sana", "wan"])
def test_resume_from_serialised_state_is_bit_identical(models, model_cache, family):
    cfg, adapter, denoiser, plan = video(models, model_cache, family, "sampling.block_frames=1",
                                         "sampling.window_frames=2")
    whole = run_blocks(denoiser, plan)
    k = 2
    first = Denoiser(adapter, models[family][0], cfg)
    run_blocks(first, plan, plan.blocks[:k + 1])
    saved = first.states.to_bytes()
    resumed = Denoiser(adapter, models[family][0], cfg)  # a fresh process would start here
    resumed.states.load_bytes(saved)
    rest = run_blocks(resumed, plan, plan.blocks[k + 1:])
    for a, b in zip(whole[k + 1:], rest):
        assert torch.equal(a, b)
    fresh = run_blocks(Denoiser(adapter, models[family][0], cfg), plan, plan.blocks[k + 1:])
    assert not torch.equal(fresh[0], whole[k + 1])  # (the state is what makes it identical)


def test_state_round_trip_reset_and_bad_input(models, model_cache):
    cfg, adapter, denoiser, plan = video(models, model_cache, "wan", "sampling.block_frames=1")
    run_blocks(denoiser, plan, plan.blocks[:2])
    tensors = denoiser.states.to_tensors()
    assert sorted(tensors)[:5] == ["layer.0.kv.frames", "layer.0.kv.k", "layer.0.kv.sink_frames", "layer.0.kv.v",
                                   "layer.0.kv.window_frames"]
    again = CarriedState.new(adapter, cfg.sampling).load_bytes(denoiser.states.to_bytes())
    assert again.to_tensors().keys() == tensors.keys()
    assert all(torch.equal(again.to_tensors()[n], t) for n, t in tensors.items())
    denoiser.states.reset()
    assert isinstance(denoiser.states[0].value, RollingKVCache) and denoiser.states[0].value.k is None
    other = make_cfg(model_cache, "wan", "sampling.window_frames=3")
    with pytest.raises(ValueError, match="sampling.window_frames"):
        CarriedState.new(adapter, other.sampling).load_tensors(tensors)
    with pytest.raises(ValueError, match="unexpected tensor"):
        CarriedState.new(adapter, cfg.sampling).load_tensors({"layer.9.kv.k": tensors["layer.0.kv.k"]})
    joint = make_cfg(model_cache, "wan", "sampling.mode=joint")
    assert CarriedState.new(adapter, joint.sampling).to_tensors() == {}


# ---------------------------------------------------------------------------------------------
# Shots and blocks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_frames", [0, 2])
def test_shot_boundaries_land_where_the_plan_says(models, model_cache, recorded, block_frames):
    """Each block runs on the frames the plan gives it, and every token reads its own shot's prompt:
    with a block per shot, prompts switch exactly at block boundaries."""
    cfg, adapter, denoiser, plan = video(models, model_cache, "sana", f"sampling.block_frames={block_frames}")
    assert plan.shot_frames == (3, 1, 2)
    rec = recorded("sana")[0]
    run_blocks(denoiser, plan)
    steps = [c for c in rec.calls if not c["commit"]]
    assert [(c["layout"].frame_offset, c["layout"].frames) for c in steps[::cfg.sampling.steps]] == \
        [(b.frame_start, b.frames) for b in plan.blocks]
    tpf = plan.layout.tokens_per_frame
    for call in steps:
        layout = call["layout"]
        want = plan.layout.frame_shot[layout.frame_offset:layout.frame_offset + layout.frames]
        got = torch.empty(layout.frames, dtype=torch.int64)
        for row, start, end in call["shot_runs"]:
            got[start // tpf:end // tpf] = row
        assert got.tolist() == want.tolist()
    if block_frames == 0:
        cuts = {0, 3, 4, 6}
        assert {b.frame_start for b in plan.blocks} | {plan.blocks[-1].frame_end} == cuts
        assert all(len(b.shots) == 1 for b in plan.blocks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["sana", "wan"])
def test_block_mode_on_cuda_in_bf16(model_cache, family):
    cfg = make_cfg(model_cache, family, "model.device=cuda", "model.dtype=bfloat16", "video.height=64",
                   "video.width=96", "sampling.block_frames=1", "sampling.window_frames=2")
    bundle = load_model(cfg.model)
    adapter = build_adapter(bundle, cfg.attention)
    plan = ShotPlan.from_config(cfg)
    denoiser, sizes = Denoiser(adapter, bundle, cfg), []
    for block in plan.blocks[:4]:
        out = denoiser.denoise_block(plan, block)
        assert out.device.type == "cuda" and torch.isfinite(out).all()
        sizes.append(denoiser.states.nbytes)
    assert sizes[2] == sizes[3] > 0  # Wan: 1 sink + 2 window frames are full after 3 blocks
    again = CarriedState.new(adapter, cfg.sampling).load_bytes(denoiser.states.to_bytes(), "cuda")
    assert all(torch.equal(a, b) for a, b in zip(again.to_tensors().values(), denoiser.states.to_tensors().values()))
