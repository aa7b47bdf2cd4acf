"""Context-parallel attention equals one rank: every method of the registry under Ulysses (and linear
under the state strategy) over real gloo groups of 2 and 4 processes, against the same method run on
the whole sequence in one process (fp32, max |error| <= 1e-5). Pad, routing gather, carried state,
block-causal shards that cut a block, and a rank that holds only pad are all exercised."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from gloo_ranks import spawn
from pipeline.attention import METHODS, build_method
from pipeline.attention.base import AttentionMeta, Routing, StateSlot
from pipeline.attention.rope import apply_rope
from pipeline.config import AttentionConfig
from pipeline.layout import VideoLayout
from pipeline.parallel.groups import ParallelContext, Rendezvous
from pipeline.parallel.shard import ShardPlan, gather, plan_for, shard
from pipeline.parallel.ring import RingAttention
from pipeline.parallel.state import StateParallelAttention
from pipeline.parallel.ulysses import UlyssesAttention, check_heads, gather_routing

B, H, D = 2, 4, 8
TOL = 1e-5
# 5 frames of 3x3 tokens, two shots, two blocks: N = 45 does not divide by 2 or 4 (pad on the last
# ranks); cut on frames over 4 ranks, the last rank holds only pad.
LAYOUT = VideoLayout(frames=5, height=3, width=3, shot_frames=(2, 3), block_frames=(2, 3))


def method(name: str, **section):
    cfg = OmegaConf.merge(OmegaConf.structured(AttentionConfig), {"method": name, **section})
    return build_method(cfg)


def rope(n: int, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) (1, N, 1, D) in the interleaved layout apply_rope reads."""
    angle = torch.rand(1, n, 1, D // 2, generator=torch.Generator().manual_seed(seed)) * 2 * math.pi
    return angle.cos().repeat_interleave(2, -1), angle.sin().repeat_interleave(2, -1)


def qkv(n: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, n, H, D, generator=g) for _ in range(3))


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err = (got - want).abs().max().item()
    assert err <= TOL, f"{what}: max |error| {err:.3g} > {TOL}"


# --- per-rank checks (run inside spawned ranks) ------------------------------------------------------
def check_ulysses_methods(ctx: ParallelContext) -> None:
    """Every softmax method (and linear, with all-gathered rope) under Ulysses, with one exchange per
    rank's heads, with two head sub-groups whose exchanges overlap attention, and with q, k, v in three
    exchanges (staged); lite over 3 steps
    with its skip state per rank; the ranks' pair counts add up to one rank's."""
    plan = plan_for(LAYOUT, ctx.world, by_frames=False)
    cases = {
        "dense": dict(),
        "moga": dict(moga={"num_groups": 3}),
        "stga": dict(stga={"window": [1, 2, 2]}),
        "moga+stga": dict(moga={"num_groups": 3}, stga={"window": [2, 2, 2]}),
        "moc": dict(moc={"chunk_frames": 1, "top_k": 1, "local_frames": 0}),
        "lite": dict(lite={"base": "dense", "full_steps": 1, "threshold": -2.0, "tile": [4, 4]}),
        "linear": dict(linear={"causal": True}),
    }
    assert set(cases) >= set(METHODS), "a new method needs a case here"
    full_rope = rope(LAYOUT.num_tokens)
    g = torch.Generator().manual_seed(11)
    routing = Routing(torch.randint(0, 3, (B, LAYOUT.num_tokens), generator=g),
                      torch.rand(B, LAYOUT.num_tokens, generator=g), 3)
    for (name, section), (chunks, staged) in itertools.product(cases.items(), ((1, False), (2, False), (1, True))):
        one, many = method(name, **section), UlyssesAttention(method(name, **section), ctx, chunks, staged)
        slot_one, slot_many = StateSlot(), StateSlot()
        for step in range(3 if name == "lite" else 1):
            what = f"{name} step {step} P={ctx.world} chunks={chunks} staged={staged}"
            q, k, v = qkv(LAYOUT.num_tokens, seed=step)
            routed = routing if one.needs_routing else None
            meta = AttentionMeta(LAYOUT, step=step, rope=full_rope, state=slot_one, routing=routed)
            assert many.applies_rope  # rotates q and k itself: while packing them, or in a method that rotates
            rotated = (q, k) if one.applies_rope else (apply_rope(q, full_rope), apply_rope(k, full_rope))
            want = one(*rotated, v, meta)
            local = replace(meta, rope=tuple(shard(t, plan, ctx.rank) for t in full_rope), state=slot_many, stats={},
                            routing=routed and Routing(shard(routed.groups, plan, ctx.rank),
                                                       shard(routed.gate, plan, ctx.rank), 3))
            got = many(*(shard(t, plan, ctx.rank) for t in (q, k, v)), local)
            assert got.shape == (B, plan.local_len, H, D)
            assert_close(gather(got, plan, ctx), want, what)
            if "pairs" in meta.stats:
                pairs = torch.tensor([local.stats["pairs"]], dtype=torch.float64)
                dist.all_reduce(pairs, group=ctx.group)
                assert pairs.item() == meta.stats["pairs"], what
            if name == "lite" and chunks == 2 and ctx.world == 2:
                assert many.records_state  # found at step 0: lite writes its slot on every full step
            if name == "lite" and step > 0:
                assert local.stats["density"] < 1.0  # skips in force, on this rank's heads
                skip_heads = slot_one.value.skip[:, ctx.rank * H // ctx.world:(ctx.rank + 1) * H // ctx.world]
                assert torch.equal(slot_many.value.skip, skip_heads)


def check_rolling_cache(ctx: ParallelContext) -> None:
    """Wan's dense layers carry a rolling KV cache in block mode (pipeline.models.carry): under Ulysses
    each rank caches its own heads. Joint calls (empty slot, no commit) still split into overlapping
    head sub-groups; a commit and the next block's call (reading the cache) use one exchange."""
    from pipeline.models.carry import RollingCacheAttention, RollingKVCache

    first = replace(LAYOUT, shot_frames=(5,), block_frames=(5,))
    later = replace(first, frame_offset=5)
    one = RollingCacheAttention(method("dense"))
    many = UlyssesAttention(RollingCacheAttention(method("dense")), ctx, chunks=2)
    slot_one, slot_many = StateSlot(), StateSlot()
    for call, (layout, slot_value, commit) in enumerate([(first, None, False), (first, "cache", True),
                                                         (later, "cache", False)]):
        if slot_value and slot_one.value is None:
            slot_one.value, slot_many.value = RollingKVCache.empty(1, 2), RollingKVCache.empty(1, 2)
        plan = plan_for(layout, ctx.world, by_frames=False)
        q, k, v = qkv(layout.num_tokens, seed=30 + call)
        want = one(q, k, v, AttentionMeta(layout, state=slot_one, commit=commit))
        local = AttentionMeta(layout, state=slot_many, commit=commit)
        got = many(*(shard(t, plan, ctx.rank) for t in (q, k, v)), local)
        assert_close(gather(got, plan, ctx), want, f"rolling cache call {call} P={ctx.world}")
    assert not many.records_state  # the joint call was split: the method left its slot alone
    heads = slice(ctx.rank * H // ctx.world, (ctx.rank + 1) * H // ctx.world)
    assert torch.equal(slot_many.value.k, slot_one.value.k[:, :, heads])
    assert torch.equal(slot_many.value.frames, slot_one.value.frames)


def check_routing_gather(ctx: ParallelContext) -> None:
    """Local (B, L) group ids and gates -> the whole sequence's, pad dropped, dtypes kept."""
    plan = plan_for(LAYOUT, ctx.world, by_frames=False)
    g = torch.Generator().manual_seed(3)
    groups, gate = torch.randint(0, 5, (B, LAYOUT.num_tokens), generator=g), torch.rand(B, LAYOUT.num_tokens, generator=g)
    full = gather_routing(Routing(shard(groups, plan, ctx.rank), shard(gate, plan, ctx.rank), 5), ctx,
                          LAYOUT.num_tokens)
    assert full.groups.dtype == torch.int64 and full.num_groups == 5
    assert torch.equal(full.groups, groups) and torch.equal(full.gate, gate)


def check_linear_state(ctx: ParallelContext, by_frames: bool) -> None:
    """Linear under the state strategy: bidirectional and block-causal, two blocks of a video with the
    carried state committed by the first, each against one rank."""
    for causal in (False, True):
        one = method("linear", linear={"causal": causal})
        many = StateParallelAttention(method("linear", linear={"causal": causal}), ctx, by_frames)
        slot_one, slot_many = StateSlot(), StateSlot()
        for call, layout in enumerate((LAYOUT, replace(LAYOUT, frame_offset=5))):
            plan = plan_for(layout, ctx.world, by_frames)
            q, k, v = qkv(layout.num_tokens, seed=10 + call)
            full_rope = rope(layout.num_tokens, seed=call)
            meta = AttentionMeta(layout, rope=full_rope, state=slot_one, commit=call == 0)
            want = one(q, k, v, meta)
            local = replace(meta, rope=tuple(shard(t, plan, ctx.rank) for t in full_rope), state=slot_many)
            got = many(*(shard(t, plan, ctx.rank) for t in (q, k, v)), local)
            what = f"linear causal={causal} call {call} P={ctx.world} by_frames={by_frames}"
            assert_close(gather(got, plan, ctx), want, what)
            start, end = plan.token_range(ctx.rank)
            assert not got[:, end - start:].any(), f"{what}: pad rows are not zero"
        assert_close(slot_many.value.S, slot_one.value.S, "carried S")
        assert_close(slot_many.value.z, slot_one.value.z, "carried z")


def check_ring(ctx: ParallelContext) -> None:
    """Ring attention (dense, K/V rotated around the ranks, LSE merge) with 3 heads, which do not divide
    over 2 or 4 ranks; pad keys on the last shards stay out."""
    plan = plan_for(LAYOUT, ctx.world, by_frames=False)
    g = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(B, LAYOUT.num_tokens, 3, D, generator=g) for _ in range(3))
    want = method("dense")(q, k, v, AttentionMeta(LAYOUT))
    got = RingAttention(method("dense"), ctx)(*(shard(t, plan, ctx.rank) for t in (q, k, v)), AttentionMeta(LAYOUT))
    assert_close(gather(got, plan, ctx), want, f"ring P={ctx.world}")
    with pytest.raises(ValueError, match="parallel.ring: ring attention runs dense layers only, not moc"):
        RingAttention(method("moc"), ctx)


def check_head_error(ctx: ParallelContext) -> None:
    many = UlyssesAttention(method("dense"), ctx)
    q = torch.randn(1, plan_for(LAYOUT, ctx.world, False).local_len, 6, D)
    with pytest.raises(ValueError, match=rf"parallel.degree: {ctx.world} does not divide the 6 attention heads"):
        many(q, q, q, AttentionMeta(LAYOUT))


def check_one_video(ctx: ParallelContext) -> None:
    """Batch 1, the shape of a real step: the received q, k, v are views of the exchange's buffer
    (token stride 3 * H/P * D), with and without head sub-groups, the pad cut by the layout (P=4)."""
    plan = plan_for(LAYOUT, ctx.world, by_frames=False)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, LAYOUT.num_tokens, H, D, generator=g) for _ in range(3))
    routing = Routing(torch.randint(0, 3, (1, LAYOUT.num_tokens), generator=g),
                      torch.rand(1, LAYOUT.num_tokens, generator=g), 3)
    for name, chunks in itertools.product(("dense", "moga+stga"), (1, 2)):
        section = dict(moga={"num_groups": 3}, stga={"window": [2, 2, 2]}) if name != "dense" else {}
        routed = routing if name != "dense" else None
        want = method(name, **section)(q, k, v, AttentionMeta(LAYOUT, routing=routed))
        local = AttentionMeta(LAYOUT, routing=routed and Routing(shard(routed.groups, plan, ctx.rank),
                                                                 shard(routed.gate, plan, ctx.rank), 3))
        got = UlyssesAttention(method(name, **section), ctx, chunks)(*(shard(t, plan, ctx.rank) for t in (q, k, v)),
                                                                      local)
        assert_close(gather(got, plan, ctx), want, f"{name} B=1 P={ctx.world} chunks={chunks}")


def check_prepare_first(ctx: ParallelContext) -> None:
    """The processor's order for routed methods: prepare(meta) before q, k, v exist (routing gathered,
    the method's sort launched), then forward: the same output, one routing all-gather in all."""
    import pipeline.parallel.ulysses as ulysses

    plan = plan_for(LAYOUT, ctx.world, by_frames=False)
    g = torch.Generator().manual_seed(5)
    groups = torch.randint(0, 3, (B, LAYOUT.num_tokens), generator=g)
    gate = torch.rand(B, LAYOUT.num_tokens, generator=g)
    q, k, v = (shard(t, plan, ctx.rank) for t in qkv(LAYOUT.num_tokens, seed=21))
    real, calls = ulysses.gather_routing, []
    ulysses.gather_routing = lambda *a: calls.append(1) or real(*a)
    try:
        for name, section in [("moga", dict(moga={"num_groups": 3})),
                              ("moga+stga", dict(moga={"num_groups": 3}, stga={"window": [2, 2, 2]}))]:
            outputs = []
            for prepare_first in (False, True):
                calls.clear()
                local = Routing(shard(groups, plan, ctx.rank), shard(gate, plan, ctx.rank), 3)
                meta = AttentionMeta(LAYOUT, routing=local)
                wrapper = UlyssesAttention(method(name, **section), ctx)
                if prepare_first:
                    wrapper.prepare(meta)
                outputs.append(wrapper(q, k, v, meta))
                assert len(calls) == 1, (name, prepare_first, len(calls))
            assert torch.equal(outputs[0], outputs[1]), name
    finally:
        ulysses.gather_routing = real


def all_checks(ctx: ParallelContext) -> None:
    check_ulysses_methods(ctx)
    check_one_video(ctx)
    check_routing_gather(ctx)
    check_prepare_first(ctx)
    check_rolling_cache(ctx)
    check_linear_state(ctx, by_frames=False)
    check_linear_state(ctx, by_frames=True)
    check_ring(ctx)
    if ctx.world == 4:
        check_head_error(ctx)


# --- tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 4])
def test_every_method_on_p_ranks_equals_one_rank(world):
    spawn(world, all_checks)


def test_shard_plan_cuts_tokens_and_frames():
    tokens, frames = plan_for(LAYOUT, 4, False), plan_for(LAYOUT, 4, True)
    assert (tokens.local_len, tokens.pad) == (12, 3)
    assert [tokens.token_range(r) for r in range(4)] == [(0, 12), (12, 24), (24, 36), (36, 45)]
    assert (frames.local_len, frames.pad) == (18, 27)
    assert [frames.unit_range(r) for r in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]
    x = torch.arange(45).view(1, 45)
    assert torch.equal(shard(x, tokens, 3), torch.tensor([list(range(36, 45)) + [0, 0, 0]]))
    with pytest.raises(ValueError, match="do not split into units of 9"):
        ShardPlan(44, 2, 9)


def test_heads_not_divisible_is_one_line():
    check_heads(12, 4)
    with pytest.raises(ValueError) as e:
        check_heads(12, 5)
    assert str(e.value) == ("parallel.degree: 5 does not divide the 12 attention heads (Ulysses shards heads "
                            "over ranks; use one of 1, 2, 3, 4, 6, 12)")


def test_rendezvous_from_torchrun_env(monkeypatch):
    for key, value in {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    rdzv = Rendezvous.from_env(timeout_s=30)
    assert (rdzv.init_method, rdzv.rank, rdzv.world) == ("tcp://10.0.0.1:29500", 1, 2)
    assert rdzv.backend_for(torch.device("cpu")) == "gloo" and rdzv.backend_for(torch.device("cuda", 0)) == "nccl"
    assert Rendezvous("::1", 1, 0, 1).init_method == "tcp://[::1]:1"
    monkeypatch.delenv("RANK")
    with pytest.raises(ValueError, match="RANK not set"):
        Rendezvous.from_env()
    with pytest.raises(ValueError, match="parallel.backend: unknown backend 'mpi'"):
        Rendezvous("h", 1, 0, 1, "mpi")
    with pytest.raises(ValueError, match="parallel.timeout_s"):
        Rendezvous("h", 1, 0, 1, timeout_s=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the lead runs it on the GPU machine)")
@pytest.mark.parametrize("name", ["dense", "moga+stga"])
def test_received_layout_on_cuda_matches_contiguous(name):
    """Ulysses hands a method q, k, v as views of the receive buffer: a token's q, k, v adjacent
    (token stride 3 * H * D). On CUDA (cuDNN SDPA, the key-tile split at 9,000 keys, the row gathers)
    the result must match the method on contiguous inputs to bf16 rounding, both measured against
    an fp32 computation of the same method."""
    g = torch.Generator().manual_seed(3)
    layout = VideoLayout(frames=5, height=30, width=60)  # 9,000 tokens: whole key tiles + a rest
    n, h, d = layout.num_tokens, 6, 128
    q, k, v = (torch.randn(1, n, h, d, generator=g).cuda() for _ in range(3))
    routing = Routing(torch.randint(0, 3, (1, n), generator=g).cuda(), torch.rand(1, n, generator=g).cuda(), 3)
    section = dict(moga={"num_groups": 3}, stga={"window": [1, 15, 20]}) if name != "dense" else {}
    fn = method(name, **section)
    meta = lambda: AttentionMeta(layout, routing=routing if name != "dense" else None)  # noqa: E731
    want = fn(q, k, v, meta()).float()  # fp32
    bf = [t.bfloat16() for t in (q, k, v)]
    contiguous = fn(*bf, meta()).float()
    packed = torch.stack(bf, dim=2)  # (1, N, 3, H, D): the receive buffer's layout with P * L = N
    views = [packed[:, :, i] for i in range(3)]
    assert views[0].stride(1) == 3 * h * d
    strided = fn(*views, meta()).float()
    err_contiguous = (contiguous - want).abs().max().item()
    err_strided = (strided - want).abs().max().item()
    assert err_strided <= max(2 * err_contiguous, 1e-2), (err_strided, err_contiguous)


def test_staged_exchange_is_picked_for_routed_methods():
    """Unless told: three exchanges for routed methods (they gather their inputs first), one for the
    others (dense attention reads the receive buffer as it lies)."""
    ctx = ParallelContext.single()
    assert UlyssesAttention(method("moga+stga", moga={"num_groups": 3}), ctx).staged
    assert UlyssesAttention(method("moga", moga={"num_groups": 3}), ctx).staged
    assert not UlyssesAttention(method("dense"), ctx).staged
    assert UlyssesAttention(method("dense"), ctx, staged=True).staged
    assert not UlyssesAttention(method("moga", moga={"num_groups": 3}), ctx, staged=False).staged
