"""MoGA equals gate * masked dense attention with a same-group mask built here by loops (B = 2, empty
groups, odd N); the router gets a gradient through the gate; L_gb is alpha for uniform routing and
larger when routing collapses; k-means routing agrees with the clusters it found."""

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.attention import build_method
from pipeline.attention.base import AttentionMeta, Routing
from pipeline.attention.moga import MoGARouter, group_balance_loss, kmeans_init
from pipeline.attention.reference import reference_attention
from pipeline.config import AttentionConfig
from pipeline.layout import VideoLayout

H, D = 2, 16


def moga_method(device="cpu", dtype=torch.float32):
    cfg = OmegaConf.merge(OmegaConf.structured(AttentionConfig), {"method": "moga"})
    return build_method(cfg, device, dtype)


def group_mask(groups):
    """(B, 1, N, N) bool: i sees j iff same group in the same batch row."""
    rows = groups.tolist()
    return torch.tensor([[[[gi == gj for gj in row] for gi in row]] for row in rows])


def test_moga_equals_gated_reference_with_independent_mask():
    layout = VideoLayout(3, 3, 5, shot_frames=(1, 2))  # 45 tokens: odd N
    n, m = layout.num_tokens, 6
    groups = torch.randint(0, 4, (2, n))  # groups 4 and 5 stay empty in both rows
    groups[1, :7] = 3  # the two rows group differently
    gate = torch.rand(2, n)
    q, k, v = (torch.randn(2, n, H, D) for _ in range(3))
    meta = AttentionMeta(layout=layout, routing=Routing(groups, gate, m))
    o = moga_method()(q, k, v, meta)
    mask = group_mask(groups)
    want = reference_attention(q, k, v, mask) * gate[:, :, None, None]
    torch.testing.assert_close(o, want, atol=1e-5, rtol=1e-5)
    assert meta.stats["pairs"] == mask.sum().item() * H
    assert moga_method().flops(meta, q.shape) == 4 * D * H * mask.sum().item()


def test_moga_refuses_missing_or_partial_routing():
    layout = VideoLayout(2, 2, 2)
    q = torch.randn(1, 8, H, D)
    with pytest.raises(ValueError, match="meta.routing is None"):
        moga_method()(q, q, q, AttentionMeta(layout=layout))
    partial = Routing(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4), 2)
    with pytest.raises(ValueError, match="full sequence"):
        moga_method()(q, q, q, AttentionMeta(layout=layout, routing=partial))


def test_router_gets_gradient_through_the_gate():
    layout = VideoLayout(2, 3, 4)
    n, c = layout.num_tokens, 24
    router = MoGARouter(c, 3, balance_weight=0.0)
    hidden = torch.randn(2, n, c)
    routing, _ = router(hidden)
    q, k, v = (torch.randn(2, n, H, D) for _ in range(3))
    o = moga_method()(q, k, v, AttentionMeta(layout=layout, routing=routing))
    (o * torch.randn_like(o)).sum().backward()
    grad = router.proj.weight.grad
    assert grad is not None and grad.abs().max() > 0 and torch.isfinite(grad).all()


def test_group_balance_loss_uniform_and_collapsed():
    alpha, m, n = 0.01, 5, 50
    uniform = torch.full((2, n, m), 1.0 / m)
    balanced = torch.arange(2 * n).view(2, n) % m
    assert torch.isclose(group_balance_loss(uniform, balanced, alpha), torch.tensor(alpha))
    collapsed = torch.full((2, n, m), 0.01)
    collapsed[..., 0] = 0.96
    loss = group_balance_loss(collapsed, torch.zeros(2, n, dtype=torch.long), alpha)
    assert loss > 4 * alpha  # alpha * M * 0.96
    router = MoGARouter(8, m, alpha)
    with torch.no_grad():
        router.proj.weight.zero_()  # uniform probabilities: argmax picks group 0 for every token
    routing, loss = router(torch.randn(1, n, 8))
    assert torch.isclose(loss, torch.tensor(alpha))  # F = (1, 0, ...), P = 1/M each: alpha * M * 1/M
    assert (routing.gate == 1.0 / m).all() and (routing.groups == 0).all()


def test_kmeans_router_recovers_clusters():
    torch.manual_seed(0)
    m, c, per = 4, 32, 40
    centres = torch.nn.functional.normalize(torch.randn(m, c), dim=-1) * 5.0
    labels = torch.arange(m).repeat_interleave(per)
    hidden = (centres[labels] + 0.3 * torch.randn(m * per, c))[torch.randperm(m * per)][None]  # (1, N, C)
    router = MoGARouter(c, m)
    kmeans_init(router, hidden, iters=10)
    routing, _ = router(hidden)
    found = routing.groups[0]
    truth = ((hidden[0] @ centres.T).argmax(-1))
    # the same partition up to a relabelling
    pairs_same = found[:, None] == found[None, :]
    assert torch.equal(pairs_same, truth[:, None] == truth[None, :])
    assert routing.gate.min() > 0.9  # sharp gates: pretrained outputs are barely scaled


def window_of_tokens(layout, window):
    """moga+stga's windows by loops: text is one window; video boxes tiled shot by shot."""
    wt, wy, wx = window
    frame_window, index = [], 0
    for frames in layout.shot_frames:
        frame_window += [index + f // wt for f in range(frames)]
        index += -(-frames // wt)
    keys = [("text",)] * layout.text_tokens
    keys += [(frame_window[t], y // wy, x // wx) for t in range(layout.frames) for y in range(layout.height)
             for x in range(layout.width)]
    return keys


def moga_stga_method(merge, window, device="cpu", dtype=torch.float32):
    cfg = OmegaConf.merge(OmegaConf.structured(AttentionConfig), {
        "method": "moga+stga", "merge": merge, "stga": {"window": list(window)}})
    return build_method(cfg, device, dtype)


MOGA_STGA_CASES = [
    (VideoLayout(5, 3, 5, shot_frames=(2, 3)), (2, 2, 3)),  # uneven windows, a cut
    (VideoLayout(4, 4, 6), (2, 2, 3)),  # equal windows: the batched window branch
    (VideoLayout(3, 2, 5, text_tokens=4), (1, 2, 2)),  # text is a window of its own
]


@pytest.mark.parametrize("layout, window", MOGA_STGA_CASES)
@pytest.mark.parametrize("merge", ["lse", "sum"])
def test_moga_stga_equals_reference_with_independent_masks(layout, window, merge):
    n, m = layout.num_tokens, 5
    groups = torch.randint(0, 4, (2, n))  # group 4 empty
    gate = torch.rand(2, n)
    q, k, v = (torch.randn(2, n, H, D) for _ in range(3))
    meta = AttentionMeta(layout=layout, routing=Routing(groups, gate, m))
    o = moga_stga_method(merge, window)(q, k, v, meta)
    keys = window_of_tokens(layout, window)
    same_window = torch.tensor([[ki == kj for kj in keys] for ki in keys])[None, None]
    same_group = group_mask(groups)
    g = gate[:, :, None, None]
    if merge == "lse":
        union = same_group | same_window
        want = reference_attention(q, k, v, union) * g
        assert meta.stats["pairs"] == union.sum().item() * H
    else:
        want = reference_attention(q, k, v, same_group) * g + reference_attention(q, k, v, same_window)
        assert meta.stats["pairs"] == (same_group.sum() * H + same_window.sum() * 2 * H).item()
    torch.testing.assert_close(o, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias_bytes", [1 << 31, 4 * 12 * 16 * 2])  # one dense call; one window per call
def test_moga_stga_bias_route_equals_reference(monkeypatch, bias_bytes):
    """The "bias" route (window branch over W \\ G, no cells), forced on the CPU: equal windows, B = 2,
    one window whose every token is in the query's group (W \\ G empty for those rows)."""
    import pipeline.attention.moga_stga as moga_stga

    monkeypatch.setattr(moga_stga, "BIAS_BYTES", bias_bytes)
    layout, window = VideoLayout(4, 4, 6), (1, 4, 6)  # whole-frame windows of 24 tokens
    n = layout.num_tokens
    groups = torch.randint(0, 3, (2, n))
    groups[0, 24:48] = 2  # frame 1 of row 0: its window lies inside one group
    gate = torch.rand(2, n)
    q, k, v = (3.0 * torch.randn(2, n, H, D) for _ in range(3))
    meta = AttentionMeta(layout=layout, routing=Routing(groups, gate, 4))
    method = moga_stga_method("lse", window)
    method.route = "bias"
    o = method(q, k, v, meta)
    keys = window_of_tokens(layout, window)
    same_window = torch.tensor([[ki == kj for kj in keys] for ki in keys])[None, None]
    union = group_mask(groups) | same_window
    torch.testing.assert_close(o, reference_attention(q, k, v, union) * gate[:, :, None, None], atol=1e-5, rtol=1e-5)
    assert meta.stats["pairs"] == union.sum().item() * H
    assert meta.stats["kernel_pairs"] == (group_mask(groups).sum() + 2 * same_window.sum()).item() * H  # no cells
    with torch.no_grad():  # forced "cells" on the same inputs: the same attention, more kernel pairs
        method.route = "cells"
        meta = AttentionMeta(layout=layout, routing=Routing(groups, gate, 4))
        torch.testing.assert_close(method(q, k, v, meta), o, atol=1e-5, rtol=1e-5)
        assert meta.stats["kernel_pairs"] > (group_mask(groups).sum() + 2 * same_window.sum()).item() * H
    method.route = "nonsense"
    with pytest.raises(ValueError, match="moga\\+stga: route 'nonsense' cannot run here"):
        method(q, k, v, AttentionMeta(layout=layout, routing=Routing(groups, gate, 4)))


def test_moga_stga_lse_backward_matches_reference_and_reaches_the_router():
    layout, window, c = VideoLayout(3, 3, 4, shot_frames=(1, 2)), (2, 2, 2), 12
    n = layout.num_tokens
    hidden = torch.randn(1, n, c)
    base = [torch.randn(1, n, H, D) for _ in range(3)]
    weights = torch.randn(1, n, H, D)
    router = MoGARouter(c, 3, 0.0)
    keys = window_of_tokens(layout, window)
    same_window = torch.tensor([[ki == kj for kj in keys] for ki in keys])[None, None]
    grads = []
    for ours in (True, False):
        router.zero_grad()
        routing, _ = router(hidden)
        leaves = [x.clone().requires_grad_(True) for x in base]
        if ours:
            o = moga_stga_method("lse", window)(*leaves, AttentionMeta(layout=layout, routing=routing))
        else:
            union = group_mask(routing.groups) | same_window
            o = reference_attention(*leaves, union) * routing.gate[:, :, None, None]
        (o * weights).sum().backward()
        grads.append([x.grad for x in leaves] + [router.proj.weight.grad.clone()])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert grads[0][-1].abs().max() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the lead runs it on the GPU machine)")
def test_moga_on_cuda_bf16_equals_reference():
    layout = VideoLayout(8, 16, 20)
    n = layout.num_tokens
    groups = torch.randint(0, 5, (2, n), device="cuda")
    gate = torch.rand(2, n, device="cuda")
    q, k, v = (torch.randn(2, n, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    o = moga_method("cuda", torch.bfloat16)(q, k, v, AttentionMeta(layout=layout, routing=Routing(groups, gate, 5)))
    mask = (groups[:, :, None] == groups[:, None, :])[:, None]
    want = reference_attention(q, k, v, mask).float() * gate[:, :, None, None]
    torch.testing.assert_close(o.float(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the lead runs it on the GPU machine)")
@pytest.mark.parametrize("window, route", [((1, 30, 52), "cells"), ((1, 30, 52), "bias"), ((2, 8, 8), "cells")])
def test_moga_stga_on_cuda_bf16_equals_reference(window, route):
    """cells (the default: cuDNN groups, windows and cells); bias, forced (one batched window call over
    W \\ G, equal windows only); all with lse, merged exactly."""
    layout = VideoLayout(4, 30, 52, shot_frames=(1, 3))
    n = layout.num_tokens
    groups = torch.randint(0, 5, (1, n), device="cuda")
    groups[:, :30 * 52] = 2  # frame 0 inside one group: W minus G is empty for its rows (bias route)
    gate = torch.rand(1, n, device="cuda")
    q, k, v = (torch.randn(1, n, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    method = moga_stga_method("lse", window, "cuda", torch.bfloat16)
    assert method.route == "cells"
    method.route = route
    o = method(q, k, v, AttentionMeta(layout=layout, routing=Routing(groups, gate, 5)))
    windows = method.windows(layout).token_window.cuda()
    union = (groups[:, :, None] == groups[:, None, :]) | (windows[:, None] == windows[None, :])
    want = reference_attention(q, k, v, union[:, None]).float() * gate[:, :, None, None]
    torch.testing.assert_close(o.float(), want, atol=3e-2, rtol=3e-2)
