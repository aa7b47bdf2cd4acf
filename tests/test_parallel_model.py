"""parallelize(adapter, ctx): the sharded forward of tiny Wan and tiny SANA-Video, with every attention
method, equals the one-process forward (fp32, max |error| <= 1e-5) over gloo, on 2 ranks as Ray actors
(as the WorkerGroup runs them) and on 4 spawned processes; diffusers' own Ulysses
(ContextParallelConfig(ulysses_degree=2)) on the stock tiny Wan is a second oracle."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf

from gloo_ranks import run_rank, spawn
from pipeline.attention import METHODS, AttentionMeta
from pipeline.config import load_config
from pipeline.layout import VideoLayout
from pipeline.parallel import parallelize
from pipeline.parallel.groups import ParallelContext, free_port

TOL = 1e-5
B, S, L = 2, 2, 4  # batch rows (CFG's uncond and cond), shots (text rows), text tokens per shot
# 5 latent frames of 3x3 tokens (45 tokens: pad on 2 and 4 ranks; on 4 ranks cut on frames the
# last rank holds only pad), two shots, two blocks for block-causal linear attention.
LAYOUT = VideoLayout(frames=5, height=3, width=3, shot_frames=(2, 3), block_frames=(2, 3))
WAN_METHODS = {
    "dense": {},
    # k-means routers fitted at the first step: under CP on the whole sequence's hidden states
    "moga": {"moga": {"num_groups": 3, "router_init": "kmeans"}},
    "stga": {"stga": {"window": [1, 2, 2]}},
    "moga+stga": {"moga": {"num_groups": 3, "router_init": "kmeans"}, "stga": {"window": [2, 2, 2]}},
    "moc": {"moc": {"chunk_frames": 1, "top_k": 1, "local_frames": 0}},
    "lite": {"lite": {"base": "dense", "full_steps": 1, "threshold": -2.0, "tile": [4, 4]}},
    "linear": {"linear": {"causal": True}},
}


def family_config(family: str):
    return load_config(None, ["model=tiny-sana", "attention=linear"] if family == "sana" else ["model=tiny-wan"])


def build(family: str, method: str, section: dict, cfg=None):
    """A tiny adapter with fixed random weights (the same on every rank); cfg: family_config(family)."""
    from pipeline.models.sana import SanaAdapter
    from pipeline.models.wan import WanAdapter

    cfg = cfg or family_config(family)
    attention = OmegaConf.merge(cfg.attention, {"method": method, **section})
    arch = OmegaConf.to_container(cfg.model.architecture.transformer)
    torch.manual_seed(0)
    if family == "sana":
        from diffusers import SanaVideoTransformer3DModel

        return SanaAdapter(SanaVideoTransformer3DModel(**arch).eval(), attention)
    from diffusers import WanTransformer3DModel

    return WanAdapter(WanTransformer3DModel(**arch).eval(), attention)


def inputs(family: str, layout: VideoLayout, seed: int):
    g = torch.Generator().manual_seed(seed)
    text_dim = 32
    latents = torch.randn(B, 16, layout.frames, 2 * layout.height, 2 * layout.width, generator=g)
    text = torch.randn(B, S, L, text_dim, generator=g)
    mask = torch.ones(B, S, L, dtype=torch.bool)
    mask[:, :, -1] = False  # a padded text position (SANA masks it)
    return latents, torch.tensor([700.0, 300.0]), text, mask


def assert_close(got, want, what):
    err = (got - want).abs().max().item()
    assert err <= TOL, f"{what}: max |error| {err:.3g} > {TOL}"


def compare(ctx: ParallelContext, family: str, method: str, section: dict, calls: list[AttentionMeta], cfg) -> None:
    """Each meta of `calls` in turn (steps of a video, or blocks with a carried state) on one rank and
    on the group, with the same per-layer state slots carried across the calls on each side."""
    one = build(family, method, section, cfg)
    many = parallelize(copy.deepcopy(one), ctx, chunks=2)  # 2 head sub-groups where P leaves 2 heads a rank
    states_one, states_many = one.new_states(), many.new_states()
    for i, meta in enumerate(calls):
        latents, t, text, mask = inputs(family, meta.layout, seed=i)
        with torch.no_grad():
            want = one(latents, t, text, meta.layout, replace(meta), states_one, mask)
            got = many(latents, t, text, meta.layout, replace(meta), states_many, mask)
        assert_close(got, want, f"{family} {method} call {i} P={ctx.world}")


def check_models(ctx: ParallelContext) -> None:
    assert set(WAN_METHODS) >= set(METHODS), "a new method needs a case here"
    wan, sana = family_config("wan"), family_config("sana")
    for method, section in WAN_METHODS.items():
        steps = 2 if method == "lite" else 1  # lite: a full step, then a step with skips from the record
        compare(ctx, "wan", method, section, [AttentionMeta(LAYOUT, step=s) for s in range(steps)], wan)
    later = replace(LAYOUT, frame_offset=LAYOUT.frames)
    for causal in (False, True):  # SANA-Video: two blocks of a video, the first one's sums carried
        compare(ctx, "sana", "linear", {"linear": {"causal": causal}},
                [AttentionMeta(LAYOUT, commit=True), AttentionMeta(later)], sana)


def check_diffusers_ulysses(ctx: ParallelContext) -> None:
    """Stock diffusers Wan with its own Ulysses CP equals our parallel dense forward (one shot: one prompt)."""
    from diffusers import ContextParallelConfig

    torch.accelerator.device_count = lambda: 1  # diffusers takes rank % device_count; 0 on CPU (this process only)
    layout = VideoLayout(4, 3, 3)  # 36 tokens: diffusers' equipartition needs N % P == 0
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    ours = parallelize(build("wan", "dense", {}), ctx)
    stock = build("wan", "dense", {}).transformer  # the same weights (same seed)
    for block in stock.blocks:  # back to diffusers' own processors (the adapter swapped them)
        block.attn1.set_processor(WanAttnProcessor())
        block.attn2.set_processor(WanAttnProcessor())
    stock.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ctx.world))
    latents, t, text, _ = inputs("wan", layout, seed=5)
    with torch.no_grad():
        want = stock(hidden_states=latents, timestep=t, encoder_hidden_states=text[:, 0], return_dict=False)[0]
        got = ours(latents, t, text[:, :1], layout)
    assert_close(got, want, f"diffusers Ulysses P={ctx.world}")


def test_sharded_forward_equals_one_process_on_4_ranks():
    spawn(4, check_models)  # P = 2: in Ray actors below


def test_diffusers_ulysses_is_a_second_oracle():
    spawn(2, check_diffusers_ulysses)


@pytest.fixture(scope="module")
def ray_cluster(s3_server):  # s3_server first: Ray workers inherit the session's environment at start
    from tests.ray_local import local_ray

    return local_ray()


class RankActor:
    """One rank as a Ray actor: joins the gloo group and runs a check, like a WorkerGroup's worker."""

    def run(self, rank: int, world: int, port: int, fn) -> None:
        run_rank(rank, world, port, fn, ())


def test_sharded_forward_equals_one_process_in_ray_actors(ray_cluster):
    import sys

    import gloo_ranks

    ray = ray_cluster
    for module in (sys.modules[__name__], gloo_ranks):  # tests/ is not importable in workers
        ray.cloudpickle.register_pickle_by_value(module)
    actors = [ray.remote(RankActor).options(num_cpus=0.5).remote() for _ in range(2)]
    try:
        port = free_port("127.0.0.1")
        ray.get([a.run.remote(rank, 2, port, check_models) for rank, a in enumerate(actors)])
    finally:
        for a in actors:
            ray.kill(a)
