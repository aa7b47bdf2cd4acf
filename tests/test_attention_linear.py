"""ReLU linear attention equals the formula written out with masks; carried state over K blocks
equals one block-causal pass; split sums (context parallelism) equal one pass; state round-trips."""

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.attention import build_method
from pipeline.attention.base import AttentionMeta, StateSlot
from pipeline.attention.linear import BlockSums, LinearState
from pipeline.config import AttentionConfig
from pipeline.layout import VideoLayout

B, H, D = 2, 2, 8


def linear_method(causal: bool, eps: float = 1e-15):
    cfg = OmegaConf.merge(OmegaConf.structured(AttentionConfig),
                          {"method": "linear", "linear": {"causal": causal, "eps": eps}})
    return build_method(cfg)


def random_rope(n):
    """(cos, sin) in the interleaved layout, and the angles (n, D/2) they encode."""
    theta = torch.rand(n, D // 2) * 6.3
    cos = torch.cos(theta).repeat_interleave(2, -1)[None, :, None]
    sin = torch.sin(theta).repeat_interleave(2, -1)[None, :, None]
    return (cos, sin), theta


def rotate(x, theta):
    """x (B, n, H, D): pairs (x[2i], x[2i+1]) as complex numbers times e^{i theta}."""
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    turn = torch.polar(torch.ones_like(theta.double()), theta.double())[None, :, None]  # (1, n, 1, D/2)
    return torch.view_as_real(z * turn).flatten(-2)


def expected(q, k, v, theta, sees, eps=1e-15):
    """O_i = sum_j sees[i, j] v_j (k~_j . q~_i) / (sum_j sees[i, j] phi(k_j) . phi(q_i) + eps), float64."""
    pq, pk = torch.relu(q.double()), torch.relu(k.double())
    rq, rk = rotate(pq, theta), rotate(pk, theta)
    num = torch.einsum("bihd,bjhd,ij,bjhe->bihe", rq, rk, sees.double(), v.double())
    den = torch.einsum("bihd,bjhd,ij->bih", pq, pk, sees.double())
    return (num / (den + eps)[..., None]).float()


def token_blocks(layout):
    return torch.repeat_interleave(torch.arange(len(layout.block_frames)),
                                   torch.tensor(layout.block_frames) * layout.tokens_per_frame)


def inputs(n):
    return tuple(torch.randn(B, n, H, D) for _ in range(3))


@pytest.mark.parametrize("causal", [False, True])
def test_linear_equals_the_formula(causal):
    layout = VideoLayout(4, 2, 4, block_frames=(1, 2, 1))
    n = layout.num_tokens
    q, k, v = inputs(n)
    rope, theta = random_rope(n)
    blk = token_blocks(layout)
    sees = blk[None, :] <= blk[:, None] if causal else torch.ones(n, n, dtype=torch.bool)
    o = linear_method(causal)(q, k, v, AttentionMeta(layout=layout, rope=rope))
    torch.testing.assert_close(o, expected(q, k, v, theta, sees), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_kv_sum_in_token_chunks_equals_the_formula(monkeypatch, causal):
    """The kv sum split over (head, token chunk) pairs (what long sequences run) equals the formula;
    blocks of 12 and 8 tokens split into 4- and 2-token chunks, a block of 5 does not split."""
    import pipeline.attention.linear as linear

    monkeypatch.setattr(linear, "CHUNK_TOKENS", 2)
    monkeypatch.setattr(linear, "MAX_CHUNKS", 4)
    assert [linear._token_chunks(n) for n in (12, 8, 5)] == [4, 4, 1]
    layout = VideoLayout(5, 1, 4, block_frames=(3, 2))  # blocks of 12 and 8 tokens
    n = layout.num_tokens
    q, k, v = inputs(n)
    rope, theta = random_rope(n)
    blk = token_blocks(layout)
    sees = blk[None, :] <= blk[:, None] if causal else torch.ones(n, n, dtype=torch.bool)
    o = linear_method(causal)(q, k, v, AttentionMeta(layout=layout, rope=rope))
    torch.testing.assert_close(o, expected(q, k, v, theta, sees), atol=1e-5, rtol=1e-5)
    odd = VideoLayout(5, 1, 1)  # 5 tokens: one chunk
    q5, k5, v5 = inputs(5)
    rope5, theta5 = random_rope(5)
    o5 = linear_method(False)(q5, k5, v5, AttentionMeta(layout=odd, rope=rope5))
    torch.testing.assert_close(o5, expected(q5, k5, v5, theta5, torch.ones(5, 5, dtype=torch.bool)), atol=1e-5,
                               rtol=1e-5)


def test_carried_state_over_blocks_equals_one_block_causal_pass():
    layout = VideoLayout(8, 2, 3, block_frames=(2, 1, 3, 2))
    n, tpf = layout.num_tokens, layout.tokens_per_frame
    q, k, v = inputs(n)
    rope, theta = random_rope(n)
    method = linear_method(causal=True)
    full = method(q, k, v, AttentionMeta(layout=layout, rope=rope))
    blk = token_blocks(layout)
    torch.testing.assert_close(full, expected(q, k, v, theta, blk[None, :] <= blk[:, None]), atol=1e-5, rtol=1e-5)

    slot, outs, frame = StateSlot(), [], 0
    for frames in layout.block_frames:
        sl = slice(frame * tpf, (frame + frames) * tpf)
        meta = AttentionMeta(layout=layout.frames_slice(frame, frame + frames), state=slot, commit=True,
                             rope=(rope[0][:, sl], rope[1][:, sl]))
        outs.append(method(q[:, sl], k[:, sl], v[:, sl], meta))
        frame += frames
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_state_size_does_not_grow_with_blocks():
    layout = VideoLayout(8, 2, 2, block_frames=(1,) * 8)
    tpf = layout.tokens_per_frame
    q, k, v = inputs(layout.num_tokens)
    rope, _ = random_rope(layout.num_tokens)
    method, slot, sizes = linear_method(causal=True), StateSlot(), []
    for f in range(8):
        sl = slice(f * tpf, (f + 1) * tpf)
        method(q[:, sl], k[:, sl], v[:, sl], AttentionMeta(layout=layout.frames_slice(f, f + 1), state=slot,
                                                           commit=True, rope=(rope[0][:, sl], rope[1][:, sl])))
        sizes.append((len(slot.value.to_bytes()), slot.value.nbytes))
    assert sizes[0] == sizes[-1] and len(set(sizes)) == 1
    assert sizes[0][1] == B * H * (D * D + D) * 4


@pytest.mark.parametrize("causal", [False, True])
def test_split_sums_then_attend_equal_one_pass(causal):
    """Two ranks each hold a token range (cut mid-frame); summing their block sums is all they share."""
    layout = VideoLayout(5, 2, 3, block_frames=(2, 3))
    n, cut = layout.num_tokens, 13
    q, k, v = inputs(n)
    rope, _ = random_rope(n)
    method = linear_method(causal)
    carried = LinearState(torch.randn(B, H, D, D), torch.rand(B, H, D))
    whole = method(q, k, v, AttentionMeta(layout=layout, rope=rope, state=StateSlot(carried)))
    ranges = [(0, cut), (cut, n)]
    metas = [AttentionMeta(layout=layout, token_range=r, rope=(rope[0][:, r[0]:r[1]], rope[1][:, r[0]:r[1]]),
                           state=StateSlot(carried)) for r in ranges]
    parts = [method.block_sums(k[:, a:b], v[:, a:b], m) for (a, b), m in zip(ranges, metas)]
    total = BlockSums(parts[0].S + parts[1].S, parts[0].z + parts[1].z)  # the all-reduce
    outs = [method.attend(q[:, a:b], total, m) for (a, b), m in zip(ranges, metas)]
    torch.testing.assert_close(torch.cat(outs, 1), whole, atol=1e-5, rtol=1e-5)


def test_state_save_load_round_trip_and_resume():
    layout = VideoLayout(2, 2, 2, block_frames=(1, 1))
    tpf = layout.tokens_per_frame
    q, k, v = inputs(layout.num_tokens)
    rope, _ = random_rope(layout.num_tokens)
    method, slot = linear_method(causal=True), StateSlot()
    first, second = slice(0, tpf), slice(tpf, 2 * tpf)
    meta = lambda sl, f, s: AttentionMeta(layout=layout.frames_slice(f, f + 1), state=s, commit=True,
                                          rope=(rope[0][:, sl], rope[1][:, sl]))
    method(q[:, first], k[:, first], v[:, first], meta(first, 0, slot))
    state = slot.value
    from_bytes = LinearState.from_bytes(state.to_bytes())
    from_dict = LinearState.from_state_dict(state.state_dict())
    for loaded in (from_bytes, from_dict):
        assert torch.equal(loaded.S, state.S) and torch.equal(loaded.z, state.z)
    resumed = method(q[:, second], k[:, second], v[:, second], meta(second, 1, StateSlot(from_bytes)))
    straight = method(q[:, second], k[:, second], v[:, second], meta(second, 1, slot))
    assert torch.equal(resumed, straight)
    with pytest.raises(ValueError, match="missing tensors"):
        LinearState.from_state_dict({"S": state.S})


def test_batch_rows_keep_their_own_state():
    """CFG: cond and uncond rows in one call equal each row run alone."""
    layout = VideoLayout(2, 2, 2, block_frames=(1, 1))
    tpf = layout.tokens_per_frame
    q, k, v = inputs(layout.num_tokens)
    rope, _ = random_rope(layout.num_tokens)
    method = linear_method(causal=True)

    def run(rows):
        slot, outs = StateSlot(), []
        for f in range(2):
            sl = slice(f * tpf, (f + 1) * tpf)
            m = AttentionMeta(layout=layout.frames_slice(f, f + 1), state=slot, commit=True,
                              rope=(rope[0][:, sl], rope[1][:, sl]))
            outs.append(method(q[rows, sl], k[rows, sl], v[rows, sl], m))
        return torch.cat(outs, 1)

    both = run(slice(0, 2))
    torch.testing.assert_close(both[:1], run(slice(0, 1)), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(both[1:], run(slice(1, 2)), atol=1e-6, rtol=1e-6)


def test_output_dtype_and_bad_inputs():
    layout = VideoLayout(2, 2, 2)
    q, k, v = inputs(layout.num_tokens)
    rope, _ = random_rope(layout.num_tokens)
    method = linear_method(causal=False)
    o = method(q.bfloat16(), k.bfloat16(), v.bfloat16(), AttentionMeta(layout=layout, rope=rope))
    assert o.dtype == torch.bfloat16
    with_text = VideoLayout(2, 2, 2, text_tokens=3)
    with pytest.raises(ValueError, match="text_tokens=3"):
        method(*inputs(with_text.num_tokens), AttentionMeta(layout=with_text, rope=random_rope(11)[0]))
    with pytest.raises(ValueError, match="meta.rope"):
        method(q, k, v, AttentionMeta(layout=layout))
    with pytest.raises(ValueError, match="no slot to commit"):
        method(q, k, v, AttentionMeta(layout=layout, rope=rope, commit=True))
    with pytest.raises(ValueError, match="carried state"):
        method(q, k, v, AttentionMeta(layout=layout, rope=rope, state=StateSlot(LinearState.zeros(3, H, D))))
    assert method.flops(AttentionMeta(layout=layout), q.shape) == 4.0 * B * layout.num_tokens * H * D * (D + 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the lead runs it on the GPU machine)")
def test_linear_on_cuda_equals_the_formula():
    layout = VideoLayout(6, 8, 8, block_frames=(2, 2, 2))
    n = layout.num_tokens
    q, k, v = inputs(n)
    rope, theta = random_rope(n)
    blk = token_blocks(layout)
    o = linear_method(True)(q.cuda(), k.cuda(), v.cuda(),
                            AttentionMeta(layout=layout, rope=(rope[0].cuda(), rope[1].cuda())))
    torch.testing.assert_close(o.cpu(), expected(q, k, v, theta, blk[None, :] <= blk[:, None]), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the lead runs it on the GPU machine)")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_linear_on_cuda_in_token_chunks_equals_the_formula(dtype, tol):
    """Blocks of 2048 tokens: the kv sum runs in (head, chunk) pairs; bf16 in, fp32 inside, bf16 out."""
    layout = VideoLayout(4, 32, 32, block_frames=(2, 2))
    n = layout.num_tokens
    q, k, v = (x.cuda() for x in inputs(n))
    rope, theta = random_rope(n)
    blk = token_blocks(layout).cuda()
    o = linear_method(True)(q.to(dtype), k.to(dtype), v.to(dtype),
                            AttentionMeta(layout=layout, rope=(rope[0].cuda(), rope[1].cuda())))
    assert o.dtype == dtype
    want = expected(q.to(dtype), k.to(dtype), v.to(dtype), theta.cuda(), blk[None, :] <= blk[:, None])
    torch.testing.assert_close(o.float(), want, atol=tol, rtol=tol)
