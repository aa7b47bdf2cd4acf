"""MoC equals masked dense attention with a chunk mask this test builds on its own; the block-mask
primitive's block lists, pair counts and FlexAttention BlockMask agree with the token-level mask."""

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.attention import build_method
from pipeline.attention.backends.blockmask import (SegmentMask, block_lists, choose_block_sparse_path, count_pairs,
                                                   flex_available, flex_block_mask, flex_block_sparse, masked_sdpa)
from pipeline.attention.backends.gathered import _slab_sizes, gathered_attention
from pipeline.attention.base import AttentionMeta
from pipeline.attention.reference import reference_attention
from pipeline.config import AttentionConfig
from pipeline.layout import VideoLayout


def moc_config(**moc):
    return OmegaConf.merge(OmegaConf.structured(AttentionConfig), {"method": "moc", "moc": moc})


def expected_mask(q, k, layout, chunk_frames, top_k, causal, local_frames, text_anchor):
    """(B, H, N, N) bool from the MoC rules, written out with plain loops."""
    tpf, text = layout.height * layout.width, layout.text_tokens
    chunks = []  # (start, end, shot or None, first frame, last frame)
    if text:
        chunks.append((0, text, None, None, None))
    shot_first = 0
    for shot, frames in enumerate(layout.shot_frames):
        f = 0
        while f < frames:
            g = min(f + chunk_frames, frames)
            a, z = shot_first + f, shot_first + g - 1
            chunks.append((text + a * tpf, text + (z + 1) * tpf, shot, a, z))
            f = g
        shot_first += frames
    b_, n, h_, _ = q.shape
    mask = torch.zeros(b_, h_, n, n, dtype=torch.bool)
    for b in range(b_):
        for h in range(h_):
            kbar = [k[b, s:e, h].mean(0) for s, e, *_ in chunks]
            qbar = [q[b, s:e, h].mean(0) for s, e, *_ in chunks]
            for i, (s, e, shot, a, z) in enumerate(chunks):
                if shot is None:
                    mask[b, h, s:e, :] = True
                    continue
                anchors = {i}
                if text and text_anchor:
                    anchors.add(0)
                for j, (_, _, shot2, a2, z2) in enumerate(chunks):
                    if shot2 != shot:
                        continue
                    if min(abs(x - y) for x in range(a, z + 1) for y in range(a2, z2 + 1)) <= local_frames:
                        anchors.add(j)
                candidates = [j for j in range(len(chunks)) if j not in anchors and (not causal or chunks[j][0] <= s)]
                ranked = sorted(candidates, key=lambda j: -float(qbar[i] @ kbar[j]))[:top_k]
                for j in anchors | set(ranked):
                    mask[b, h, s:e, chunks[j][0]:chunks[j][1]] = True
    return mask


CASES = [
    # layout, moc settings
    (VideoLayout(7, 4, 4, shot_frames=(3, 4)), dict(chunk_frames=1, top_k=2, causal=True, local_frames=1,
                                                    text_anchor=True)),
    (VideoLayout(8, 2, 4, shot_frames=(5, 3), text_tokens=8), dict(chunk_frames=2, top_k=1, causal=False,
                                                                   local_frames=0, text_anchor=True)),
    (VideoLayout(9, 4, 2, shot_frames=(2, 4, 3), text_tokens=5), dict(chunk_frames=3, top_k=5, causal=True,
                                                                      local_frames=2, text_anchor=False)),
    (VideoLayout(6, 4, 4), dict(chunk_frames=1, top_k=0, causal=True, local_frames=1, text_anchor=True)),
]


@pytest.mark.parametrize("layout, settings", CASES)
def test_moc_equals_reference_with_independent_mask(layout, settings):
    method = build_method(moc_config(**settings))
    b, h, d, n = 2, 2, 16, layout.num_tokens
    q, k, v = (torch.randn(b, n, h, d) for _ in range(3))
    meta = AttentionMeta(layout=layout)
    o = method(q, k, v, meta)
    mask = expected_mask(q, k, layout, **settings)
    torch.testing.assert_close(o, reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    assert meta.stats["pairs"] == mask.sum().item()
    assert method.flops(meta, q.shape) == 4 * d * mask.sum().item()
    assert meta.stats["density"] < 1.0


@pytest.mark.parametrize("layout, settings", CASES)
def test_moc_gather_path_equals_reference(layout, settings):
    """The dense-over-gathered-keys path (what CUDA runs for large chunks), forced on the CPU, in slabs."""
    method = build_method(moc_config(**settings))
    b, h, d, n = 2, 2, 16, layout.num_tokens
    q, k, v = (torch.randn(b, n, h, d) for _ in range(3))
    mask = method.route(q, k, layout)
    want = reference_attention(q, k, v, mask.token_mask())
    torch.testing.assert_close(gathered_attention(q, k, v, mask), want, atol=1e-5, rtol=1e-5)
    slab = 3 * 2 * d * 4 * (2 * n)  # about 3 items per dense call: many slabs, powers of two
    torch.testing.assert_close(gathered_attention(q, k, v, mask, slab_bytes=slab), want, atol=1e-5, rtol=1e-5)
    o = method.backend.block_sparse(q, k, v, (mask,), path="gather")
    torch.testing.assert_close(o, want, atol=1e-5, rtol=1e-5)
    # every call cut into whole key tiles of 7 plus the rest, merged by lse (CUDA: tiles of 128)
    torch.testing.assert_close(gathered_attention(q, k, v, mask, key_tile=7), want, atol=1e-5, rtol=1e-5)


def test_gather_path_with_scattered_segments_broadcast_tables_and_empty_rows():
    """Segments that are not contiguous runs, an allowed table shared by batch rows, a query segment
    that sees nothing (its rows are 0) and an empty segment."""
    b, h, nq, nk, d = 2, 3, 40, 50, 8
    mask = random_mask(1, h, nq, nk, 5, 6, 0.5)
    allowed = mask.allowed.clone()
    allowed[:, :, 2] = False  # query segment 2 sees no key
    q_segment = mask.q_segment.clone()
    q_segment[q_segment == 4] = 3  # query segment 4 is empty
    mask = SegmentMask(q_segment, mask.k_segment, allowed)
    q, k, v = torch.randn(b, nq, h, d), torch.randn(b, nk, h, d), torch.randn(b, nk, h, d)
    token = mask.token_mask()
    rows = token.any(-1).transpose(1, 2)[..., None].expand(b, nq, h, 1)  # (B, N, H, 1): rows with a key
    for scale, tile in ((None, None), (0.3, None), (0.3, 4)):
        got = gathered_attention(q, k, v, mask, scale=scale, key_tile=tile)
        want = torch.where(rows, reference_attention(q, k, v, token, scale=scale), 0.0)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not rows.all() and (got[~rows.expand_as(got)] == 0).all()


def test_block_sparse_path_rule_and_slab_sizes():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    chunks = SegmentMask(torch.arange(8192) // 2048, torch.arange(8192) // 2048, torch.ones(1, 1, 4, 4, dtype=torch.bool))
    tiles = SegmentMask(torch.arange(8192) // 128, torch.arange(8192) // 128, torch.ones(1, 1, 64, 64, dtype=torch.bool))
    assert choose_block_sparse_path((chunks,), 8192, cuda, torch.bfloat16, False) == "gather"
    assert choose_block_sparse_path((chunks,), 8192, cpu, torch.bfloat16, False) == "masked"
    flex_or_masked = "flex" if flex_available() else "masked"
    assert choose_block_sparse_path((tiles,), 8192, cuda, torch.bfloat16, False) == flex_or_masked  # small segments
    assert choose_block_sparse_path((chunks,), 8192, cuda, torch.bfloat16, True) == flex_or_masked  # autograd
    assert choose_block_sparse_path((chunks,), 8192, cuda, torch.float32, False) == flex_or_masked
    assert choose_block_sparse_path((chunks, tiles), 8192, cuda, torch.bfloat16, False) == flex_or_masked
    assert _slab_sizes(37, 16) == [16, 16, 4, 1] and _slab_sizes(8, 16) == [8] and _slab_sizes(0, 4) == []


def test_moc_routes_per_head_and_per_batch_row():
    layout = VideoLayout(8, 2, 2)
    method = build_method(moc_config(chunk_frames=1, top_k=1, causal=False, local_frames=0))
    q, k = torch.randn(2, layout.num_tokens, 4, 8), torch.randn(2, layout.num_tokens, 4, 8)
    allowed = method.route(q, k, layout).allowed  # (B, H, C, C)
    flat = allowed.flatten(0, 1)
    assert any(not torch.equal(flat[0], flat[i]) for i in range(1, flat.shape[0]))


# ---------------------------------------------------------------------------------------------
# The block-mask primitive
# ---------------------------------------------------------------------------------------------


def random_mask(b, h, nq, nk, sq, sk, density=0.4):
    return SegmentMask(torch.randint(0, sq, (nq,)), torch.randint(0, sk, (nk,)), torch.rand(b, h, sq, sk) < density)


def pooled(token_mask, block):
    """(B, H, nQB, nKB) any / all of a (B, H, Nq, Nk) mask over blocks (padding ignored)."""
    b, h, nq, nk = token_mask.shape
    nqb, nkb = -(-nq // block), -(-nk // block)
    real = torch.zeros(nqb * block, nkb * block, dtype=torch.bool)
    real[:nq, :nk] = True
    padded = torch.zeros(b, h, nqb * block, nkb * block, dtype=torch.bool)
    padded[:, :, :nq, :nk] = token_mask
    blocks = lambda x: x.reshape(*x.shape[:-2], nqb, block, nkb, block).transpose(-3, -2)
    anyb = blocks(padded).any(-1).any(-1)
    allb = (blocks(padded) | ~blocks(real)).all(-1).all(-1)
    return anyb, allb


def test_block_lists_match_the_pooled_token_mask():
    b, h, nq, nk, block = 2, 3, 100, 90, 16
    one = random_mask(b, h, nq, nk, 7, 5)
    token = one.token_mask()
    visit, full = block_lists((one,), nq, nk, block, block, b, h)
    anyb, allb = pooled(token, block)
    assert torch.equal(visit, anyb) and torch.equal(full, allb)
    # contiguous segments with a broadcast (1, 1) table: many full and empty blocks
    seg = torch.arange(nq) // 20
    band = SegmentMask(seg, seg, (seg.unique()[:, None] - seg.unique()[None, :]).abs()[None, None] <= 1)
    visit, full = block_lists((band,), nq, nq, block, block, b, h)
    anyb, allb = pooled(band.token_mask().expand(b, h, -1, -1), block)
    assert torch.equal(visit, anyb) and torch.equal(full, allb)
    assert full.any() and (~visit).any() and (visit & ~full).any()
    # two masks: full is exact, visit covers every block with an allowed pair
    two = (one, random_mask(1, h, nq, nk, 4, 6, 0.7))
    token = two[0].token_mask() & two[1].token_mask()
    visit, full = block_lists(two, nq, nk, block, block, b, h)
    anyb, allb = pooled(token, block)
    assert torch.equal(full, allb) and bool((visit | ~anyb).all())


@pytest.mark.parametrize("second", [False, True])
def test_count_pairs_is_exact(second):
    b, h, nq, nk = 2, 3, 50, 70
    masks = (random_mask(b, h, nq, nk, 6, 9),) + ((random_mask(b, 1, nq, nk, 3, 4, 0.6),) if second else ())
    token = masks[0].token_mask()
    for m in masks[1:]:
        token = token & m.token_mask()
    assert count_pairs(masks, b, h) == token.sum().item()


def test_masked_sdpa_equals_reference_in_slabs(monkeypatch):
    import pipeline.attention.backends.blockmask as blockmask

    monkeypatch.setattr(blockmask, "_SLAB_ELEMENTS", 2 * 3 * 70 * 7)  # 7 query rows per slab
    b, h, nq, nk, d = 2, 3, 50, 70, 8
    masks = (random_mask(b, h, nq, nk, 6, 9, 0.5), random_mask(1, 1, nq, nk, 3, 4, 0.8))
    q, k, v = torch.randn(b, nq, h, d), torch.randn(b, nk, h, d), torch.randn(b, nk, h, d)
    token = masks[0].token_mask() & masks[1].token_mask()
    torch.testing.assert_close(masked_sdpa(q, k, v, masks), reference_attention(q, k, v, token), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not flex_available(), reason="FlexAttention not in this torch")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_lists_the_right_blocks_and_attends_exactly():
    b, h, n, d, block = 2, 2, 100, 16, 16
    masks = (random_mask(b, h, n, n, 5, 5, 0.5), SegmentMask(torch.arange(n) // 10, torch.arange(n) // 10,
                                                          torch.rand(1, 1, 10, 10) < 0.6))
    bm = flex_block_mask(masks, n, n, b, h, block)
    visit, full = block_lists(masks, n, n, block, block, b, h)
    assert torch.equal(bm.to_dense().bool(), visit)
    assert torch.equal(bm.full_kv_num_blocks, full.sum(-1, dtype=torch.int32))
    q, k, v = (torch.randn(b, n, h, d) for _ in range(3))
    token = masks[0].token_mask() & masks[1].token_mask()
    o = flex_block_sparse(q, k, v, masks, compiled=False, block=block)  # eager flex on CPU
    expected = reference_attention(q, k, v, token)
    rows = token.any(-1).transpose(1, 2)[..., None]  # (B, N, H, 1): rows with a key
    torch.testing.assert_close(torch.where(rows, o, 0), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the lead runs it on the GPU machine)")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
def test_moc_on_cuda_compiled_flex_equals_reference(dtype, tol):
    """Compiled FlexAttention with partial blocks (320-token frames, 77 text tokens) is exact per token."""
    layout = VideoLayout(12, 16, 20, shot_frames=(5, 7), text_tokens=77)
    method = build_method(moc_config(chunk_frames=1, top_k=2, causal=True, local_frames=1), device="cuda", dtype=dtype)
    q, k, v = (torch.randn(2, layout.num_tokens, 4, 64, device="cuda", dtype=dtype) for _ in range(3))
    meta = AttentionMeta(layout=layout)
    o = method(q, k, v, meta)
    mask = method.route(q, k, layout).token_mask()
    assert 0.05 < meta.stats["density"] < 0.6
    torch.testing.assert_close(o.float(), reference_attention(q, k, v, mask).float(), atol=tol, rtol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the lead runs it on the GPU machine)")
@pytest.mark.parametrize("layout, top_k, batch", [
    (VideoLayout(6, 32, 32, shot_frames=(3, 3), text_tokens=64), 1, 2),
    # up to 64 + 6 x 2,048 keys per item: not whole 128-key tiles, above aligned.MIN_KEYS (the split)
    (VideoLayout(12, 32, 32, shot_frames=(6, 6), text_tokens=64), 3, 1),
])
def test_moc_on_cuda_gather_path_equals_reference(layout, top_k, batch):
    """Chunks of >= 1024 tokens in bf16: the dense-over-gathered-keys path (cuDNN), text chunk included."""
    method = build_method(moc_config(chunk_frames=2, top_k=top_k, causal=True, local_frames=0), device="cuda",
                          dtype=torch.bfloat16)
    q, k, v = (torch.randn(batch, layout.num_tokens, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = method.route(q, k, layout)
    assert choose_block_sparse_path((mask,), layout.num_tokens, q.device, q.dtype, False) == "gather"
    o = method(q, k, v, AttentionMeta(layout=layout))
    want = reference_attention(q, k, v, mask.token_mask()).float()
    torch.testing.assert_close(o.float(), want, atol=3e-2, rtol=3e-2)
