"""STGA equals masked dense attention with a window mask built here by loops over coordinates
(non-dividing windows, shot cuts with cross_shots on and off, text tokens, the equal-window fast
path); lite with base stga equals masked dense with the STGA mask and the skips recomputed here."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.attention import build_method
from pipeline.attention.base import AttentionMeta, StateSlot
from pipeline.attention.reference import reference_attention
from pipeline.attention.stga import window_ids
from pipeline.config import AttentionConfig
from pipeline.layout import VideoLayout

H, D = 2, 16


def config(method="stga", window=(1, 8, 8), cross_shots=False, **extra):
    return OmegaConf.merge(OmegaConf.structured(AttentionConfig), {
        "method": method, "stga": {"window": list(window), "cross_shots": cross_shots}, **extra})


def window_keys(layout, window, cross_shots):
    """Per token of the sequence: ("text",) or (time window, y window, x window), by loops."""
    wt, wy, wx = window
    runs = [layout.frames] if cross_shots else list(layout.shot_frames)
    frame_window, index = [], 0
    for frames in runs:
        for f in range(frames):
            frame_window.append(index + f // wt)
        index += -(-frames // wt)
    keys = [("text",)] * layout.text_tokens
    for t in range(layout.frames):
        for y in range(layout.height):
            for x in range(layout.width):
                keys.append((frame_window[t], y // wy, x // wx))
    return keys


def stga_rule_mask(layout, window, cross_shots):
    """(1, 1, N, N): text rows see text; video rows see their window and every text key."""
    keys = window_keys(layout, window, cross_shots)
    rows = [[kj == ki or (kj == ("text",) and ki != ("text",)) or (ki == kj == ("text",)) for kj in keys]
            for ki in keys]
    return torch.tensor(rows)[None, None]


CASES = [
    # layout, window, cross_shots, uses the batched fast path
    (VideoLayout(5, 5, 7), (2, 2, 3), False, False),  # nothing divides: smaller edge windows
    (VideoLayout(5, 4, 6, shot_frames=(2, 3)), (2, 2, 3), False, False),  # cut: shot 2 starts a window
    (VideoLayout(5, 4, 6, shot_frames=(2, 3)), (3, 2, 3), True, False),  # a window spans the cut
    (VideoLayout(4, 4, 6, shot_frames=(2, 2)), (2, 2, 3), False, True),  # equal windows: one batched call
    (VideoLayout(3, 4, 6), (1, 4, 6), False, True),  # whole-frame windows: the permutation is a view
    (VideoLayout(4, 4, 4, shot_frames=(1, 3), text_tokens=6), (2, 3, 4), False, False),  # text tokens
]


@pytest.mark.parametrize("layout, window, cross_shots, fast", CASES)
def test_stga_equals_reference_with_independent_mask(layout, window, cross_shots, fast):
    method = build_method(config(window=window, cross_shots=cross_shots))
    n = layout.num_tokens
    q, k, v = (torch.randn(2, n, H, D) for _ in range(3))
    meta = AttentionMeta(layout=layout)
    o = method(q, k, v, meta)
    mask = stga_rule_mask(layout, window, cross_shots)
    torch.testing.assert_close(o, reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    assert meta.stats["pairs"] == mask.sum().item() * 2 * H
    assert (window_ids(layout, window, cross_shots).grid is not None) == fast
    assert torch.equal(method.mask(layout).token_mask(), mask)


def test_window_permutation_is_built_once_per_batch_with_the_counts_of_a_bincount():
    layout, window = VideoLayout(5, 5, 7), (2, 2, 3)  # unequal windows: the permutation path
    windows = window_ids(layout, window)
    for batch in (1, 2):
        perm = windows.permutation(batch, "cpu")
        assert windows.permutation(batch, "cpu") is perm  # every layer and step reuse it
        segment = (torch.arange(batch)[:, None] * windows.count + windows.token_window).flatten()
        assert perm.counts == torch.bincount(segment, minlength=batch * windows.count).tolist()
        assert torch.equal(segment[perm.order], segment.sort(stable=True).values)
        assert torch.equal(perm.order[perm.inverse], torch.arange(segment.numel()))
    method = build_method(config(window=window))  # batch 1 after batch 2 on the same windows: still exact
    mask = stga_rule_mask(layout, window, False)
    for batch in (2, 1):
        q, k, v = (torch.randn(batch, layout.num_tokens, H, D) for _ in range(3))
        torch.testing.assert_close(method(q, k, v, AttentionMeta(layout=layout)), reference_attention(q, k, v, mask),
                                   atol=1e-5, rtol=1e-5)


def test_stga_backward_matches_reference():
    layout, window = VideoLayout(3, 3, 5), (2, 2, 2)
    method = build_method(config(window=window))
    base = [torch.randn(1, layout.num_tokens, H, D) for _ in range(3)]
    mask = stga_rule_mask(layout, window, False)
    grads = []
    for fn in (lambda q, k, v: method(q, k, v, AttentionMeta(layout=layout)),
               lambda q, k, v: reference_attention(q, k, v, mask)):
        leaves = [x.clone().requires_grad_(True) for x in base]
        (fn(*leaves) * base[0]).sum().backward()
        grads.append([x.grad for x in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def margins_with_base(q, k, mask, tile):
    """Lite's tile margins (log2 units) over the keys `mask` allows, by loops."""
    b_, n, h_, d = q.shape
    tq, tk = tile
    out = torch.full((b_, h_, -(-n // tq), -(-n // tk)), float("-inf"))
    for b in range(b_):
        for h in range(h_):
            s = (q[b, :, h] @ k[b, :, h].T / math.sqrt(d)).masked_fill(~mask[0, 0], float("-inf"))
            row_max = s.max(1).values
            for t in range(out.shape[2]):
                for u in range(out.shape[3]):
                    tile_max = s[t * tq:(t + 1) * tq, u * tk:(u + 1) * tk].max(1).values
                    diff = (tile_max - row_max[t * tq:(t + 1) * tq]) / math.log(2)
                    diff = diff.masked_fill(torch.isneginf(tile_max), float("-inf"))
                    out[b, h, t, u] = diff.max()
    return out


def test_lite_with_stga_base_equals_reference_with_its_mask():
    layout, window, tile, threshold = VideoLayout(4, 4, 6, text_tokens=3), (2, 2, 3), (8, 8), -3.0
    method = build_method(config("lite", window=window, lite={"base": "stga", "full_steps": 2,
                                                              "threshold": threshold, "tile": list(tile)}))
    n = layout.num_tokens
    base = stga_rule_mask(layout, window, False)
    slot, skip = StateSlot(), None
    for step in range(3):
        q, k, v = 6.0 * torch.randn(2, n, H, D), torch.randn(2, n, H, D), torch.randn(2, n, H, D)
        meta = AttentionMeta(layout=layout, step=step, state=slot)
        o = method(q, k, v, meta)
        if step < 2:
            torch.testing.assert_close(o, reference_attention(q, k, v, base), atol=1e-5, rtol=1e-5)
            now = margins_with_base(q, k, base, tile) < threshold
            for t in range(now.shape[2]):  # kept always: tiles with a pair (i, i) or touching text
                for u in range(now.shape[3]):
                    rows, cols = set(range(t * tile[0], (t + 1) * tile[0])), set(range(u * tile[1], (u + 1) * tile[1]))
                    if rows & cols or min(rows) < layout.text_tokens or min(cols) < layout.text_tokens:
                        now[:, :, t, u] = False
            skip = now if skip is None else skip | now
        else:
            qt, kt = torch.arange(n) // tile[0], torch.arange(n) // tile[1]
            mask = base & ~skip[:, :, qt][:, :, :, kt]
            torch.testing.assert_close(o, reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
            assert meta.stats["pairs"] == mask.sum().item()
    assert torch.equal(slot.value.skip, skip) and skip.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the lead runs it on the GPU machine)")
@pytest.mark.parametrize("layout, window", [
    (VideoLayout(4, 30, 52), (1, 30, 52)),  # 480p frames, whole-frame windows: one batched cuDNN call
    (VideoLayout(5, 30, 52, shot_frames=(2, 3)), (2, 8, 8)),  # uneven windows: varlen
    (VideoLayout(3, 16, 20, text_tokens=77), (1, 8, 8)),  # text: FlexAttention block mask
])
def test_stga_on_cuda_bf16_equals_reference(layout, window):
    method = build_method(config(window=window), "cuda", torch.bfloat16)
    q, k, v = (torch.randn(1, layout.num_tokens, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    o = method(q, k, v, AttentionMeta(layout=layout))
    mask = method.mask(layout, "cuda").token_mask()
    torch.testing.assert_close(o.float(), reference_attention(q, k, v, mask).float(), atol=3e-2, rtol=3e-2)
