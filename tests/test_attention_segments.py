"""The segments (varlen) primitive equals masked dense attention with a same-segment mask built here,
on every CPU path, with and without lse, with empty segments; gradients (o and lse) match the
reference's autograd."""

import pytest
import torch

from pipeline.attention.backends import select_backend
from pipeline.attention.backends.aligned import split_keys
from pipeline.attention.backends.rows import _as_words, last_dim_words, put_rows, take_rows
from pipeline.attention.backends.segments import choose_path, segment_attention
from pipeline.attention.reference import reference_attention

H, D = 3, 16


def same_segment_mask(counts):
    """(1, 1, T, T) bool: query i sees key j iff they lie in the same segment (loops)."""
    owner = []
    for s, c in enumerate(counts):
        owner += [s] * c
    return torch.tensor([[[[oi == oj for oj in owner] for oi in owner]]])


def packed(counts, dtype=torch.float32):
    t = sum(counts)
    return tuple(torch.randn(t, H, D, dtype=dtype) for _ in range(3))


def cu(counts):
    return torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32)


def reference(q, k, v, counts):
    """(T, H, D) as a batch of one, masked dense; lse (H, T)."""
    o, lse = reference_attention(q[None], k[None], v[None], same_segment_mask(counts), return_lse=True)
    return o[0], lse[0]


@pytest.mark.parametrize("counts, path", [
    ([5, 0, 17, 1, 9, 0], "per_segment"),
    ([5, 0, 17, 1, 9, 0], "auto"),
    ([8, 8, 8, 8], "batched"),
    ([8, 8, 8, 8], "per_segment"),
    ([0, 0, 12], "auto"),
])
@pytest.mark.parametrize("with_lse", [False, True])
def test_segments_equal_reference(counts, path, with_lse):
    q, k, v = packed(counts)
    want_o, want_lse = reference(q, k, v, counts)
    out = segment_attention(q, k, v, cu(counts), return_lse=with_lse, path=path)
    o = out[0] if with_lse else out
    torch.testing.assert_close(o, want_o, atol=1e-5, rtol=1e-5)
    if with_lse:
        torch.testing.assert_close(out[1], want_lse, atol=1e-5, rtol=1e-5)
        assert out[1].dtype == torch.float32 and out[1].shape == (H, sum(counts))


def test_segments_through_the_backend_in_bf16():
    counts = [7, 0, 30, 3]
    q, k, v = packed(counts, torch.bfloat16)
    backend = select_backend("auto", "cpu", torch.bfloat16)
    o, lse = backend.segments(q, k, v, cu(counts), return_lse=True, counts=counts)
    want_o, want_lse = reference(q, k, v, counts)
    assert o.dtype == torch.bfloat16
    torch.testing.assert_close(o.float(), want_o.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, want_lse, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("with_lse", [False, True])
def test_segments_gradients_equal_reference(with_lse):
    """Backward through o (SDPA autograd) and through o and lse (the matmul backward)."""
    counts = [6, 0, 11, 3]
    base = packed(counts)
    weights_o, weights_lse = torch.randn(sum(counts), H, D), torch.randn(H, sum(counts))

    def loss_of(fn):
        q, k, v = (x.clone().requires_grad_(True) for x in base)
        o, lse = fn(q, k, v)
        loss = (o * weights_o).sum() + ((lse * weights_lse).sum() if with_lse else 0.0)
        loss.backward()
        return q.grad, k.grad, v.grad

    def ours(q, k, v):
        out = segment_attention(q, k, v, cu(counts), return_lse=with_lse, path="per_segment")
        return out if with_lse else (out, None)

    got, want = loss_of(ours), loss_of(lambda q, k, v: reference(q, k, v, counts))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["per_segment", "batched"])
@pytest.mark.parametrize("per_head", [False, True])
def test_out_scale_multiplies_each_row(path, per_head):
    """The gate fused into the packing equals o * scale (in o's dtype), on every path, and under autograd."""
    counts = [6, 6, 6] if path == "batched" else [6, 0, 9, 2]
    q, k, v = packed(counts, torch.bfloat16)
    t = sum(counts)
    scale = torch.rand(t, H) if per_head else torch.rand(t)
    want = segment_attention(q, k, v, cu(counts), path=path) * scale.to(q.dtype).reshape(t, -1, 1)
    got = segment_attention(q, k, v, cu(counts), path=path, out_scale=scale)
    assert torch.equal(got, want)
    leaf = scale.clone().requires_grad_(True)
    o = segment_attention(q.float(), k.float(), v.float(), cu(counts), path=path, out_scale=leaf)
    o.sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype, shape", [(torch.bfloat16, (7, 3, 8)), (torch.float32, (7, 2, 2)),
                                          (torch.bfloat16, (7, 3)), (torch.float16, (7, 1, 3))])
def test_row_moves_are_bit_exact(dtype, shape):
    """take_rows / put_rows equal index_select / index_copy_ (8-byte words when rows allow, else plain)."""
    x = torch.randn(*shape).to(dtype)
    assert (_as_words(x) is not None) == (x[0].numel() * x.element_size() % 8 == 0)
    index = torch.tensor([4, 0, 6, 6, 2])
    assert torch.equal(take_rows(x, index), x.index_select(0, index))
    tail = torch.tensor([3, 0, 5])
    assert torch.equal(take_rows(x[1:], tail), x[1:].index_select(0, tail))  # a slice: storage offset
    perm = torch.randperm(shape[0])
    out = torch.zeros_like(x)
    assert torch.equal(put_rows(out, perm, x), torch.zeros_like(x).index_copy_(0, perm, x))
    leaf = x.float().requires_grad_(True)
    take_rows(leaf, index).sum().backward()  # under autograd: the plain op and its backward
    assert torch.equal(leaf.grad, torch.zeros_like(leaf).index_add_(0, index, torch.ones(5, *shape[1:])))


@pytest.mark.parametrize("dtype, shape, words", [(torch.bfloat16, (2, 5, 3, 8), True),
                                                 (torch.bfloat16, (2, 5, 3, 6), False),  # 12-byte rows
                                                 (torch.float32, (2, 5, 3, 4), True)])
def test_last_dim_words_transpose_is_bit_exact(dtype, shape, words):
    """The head-major copy of the gather path through int64 words equals the plain transposing copy."""
    x = torch.randn(*shape).to(dtype)
    w = last_dim_words(x)
    assert (w.dtype == torch.int64) == words and w.shape[:-1] == x.shape[:-1]
    assert torch.equal(w.transpose(1, 2).contiguous().view(dtype), x.transpose(1, 2).contiguous())
    if words:  # 8 bytes per row but starting 1 element in: no word view, the tensor itself comes back
        odd = x[..., 1:1 + 8 // x.element_size()]
        assert last_dim_words(odd) is odd


def test_path_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_path([64, 64, 64], cpu, torch.float32, False) == "batched"
    assert choose_path([5000, 0, 7000], cpu, torch.float32, False) == "per_segment"
    assert choose_path([50, 0, 70], cpu, torch.bfloat16, False) == "per_segment"  # no varlen kernel on CPU
    assert choose_path([50, 0, 70], cuda, torch.bfloat16, True) == "per_segment"  # autograd: SDPA's backward
    assert choose_path([50, 0, 70], cuda, torch.float32, False) == "per_segment"  # varlen kernels are half only


def test_bad_inputs_are_refused():
    q, k, v = packed([4, 4])
    with pytest.raises(ValueError, match="sum to 9"):
        segment_attention(q, k, v, cu([4, 5]))
    with pytest.raises(ValueError, match="equal"):
        segment_attention(q, k[:4], v, cu([4, 4]))


@pytest.mark.parametrize("counts, path", [([5, 0, 17, 1, 9, 0], "per_segment"), ([12, 12, 12], "batched")])
@pytest.mark.parametrize("with_lse", [False, True])
def test_key_tile_split_equals_reference(counts, path, with_lse):
    """Segments cut into whole key tiles plus the rest, merged by their lse (what CUDA does with tiles
    of 128, forced here with tiles of 8), equal the reference, with and without the fused gate."""
    q, k, v = packed(counts)
    want_o, want_lse = reference(q, k, v, counts)
    out = segment_attention(q, k, v, cu(counts), return_lse=with_lse, path=path, key_tile=8)
    o = out[0] if with_lse else out
    torch.testing.assert_close(o, want_o, atol=1e-5, rtol=1e-5)
    if with_lse:
        torch.testing.assert_close(out[1], want_lse, atol=1e-5, rtol=1e-5)
    gate = torch.rand(sum(counts))
    got = segment_attention(q, k, v, cu(counts), path=path, out_scale=gate, key_tile=8)
    torch.testing.assert_close(got, want_o * gate[:, None, None], atol=1e-5, rtol=1e-5)


def test_dense_key_tile_split_equals_reference():
    """backend.dense over keys cut into whole tiles plus the rest (forced: tiles of 8) equals the
    reference, with unequal query and key counts and a scale."""
    backend = select_backend("auto", "cpu", torch.float32)
    q, k, v = torch.randn(2, 37, H, D), torch.randn(2, 29, H, D), torch.randn(2, 29, H, D)
    for scale in (None, 0.2):
        want = reference_attention(q, k, v, scale=scale)
        torch.testing.assert_close(backend.dense(q, k, v, scale, key_tile=8), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(backend.dense(q, k, v, scale), want, atol=1e-5, rtol=1e-5)
    if torch.cuda.is_available():  # the rule: 9,000 keys in bf16 are split on CUDA
        qc, kc, vc = (torch.randn(1, 9000, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        cuda = select_backend("auto", "cuda", torch.bfloat16)
        want = reference_attention(qc.float(), kc.float(), vc.float())
        torch.testing.assert_close(cuda.dense(qc, kc, vc).float(), want, atol=3e-2, rtol=3e-2)


def test_key_tile_rule():
    q = torch.zeros(1)
    assert [split_keys(n, q, False, 8) for n in (5, 8, 16, 17, 12)] == [0, 0, 0, 16, 8]  # forced tiles of 8
    assert split_keys(17, q, False, 0) == 0  # 0: never
    assert split_keys(30000, q, False) == 0  # the rule splits on CUDA in half precision only
    if torch.cuda.is_available():
        cuda = torch.zeros(1, device="cuda", dtype=torch.bfloat16)
        assert split_keys(30000, cuda, False) == 29952 and split_keys(30000, cuda, True) == 0
        assert split_keys(29952, cuda, False) == 0 and split_keys(1560, cuda, False) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the lead runs it on the GPU machine)")
@pytest.mark.parametrize("path, counts", [("batched", [512, 512, 512]), ("batched", [8200, 8200]),
                                          ("per_segment", [700, 0, 1300, 37, 3000]),
                                          ("per_segment", [700, 0, 8300, 37]),  # 8300 keys: split
                                          ("varlen", [700, 0, 1300, 37, 3000])])
def test_segments_on_cuda_every_path(path, counts):
    q, k, v = (x.cuda() for x in packed(counts, torch.bfloat16))
    backend = select_backend("auto", "cuda", torch.bfloat16)
    o, lse = backend.segments(q, k, v, cu(counts).cuda(), return_lse=True, counts=counts, path=path)
    qm, km, vm = (x[None].float().cuda() for x in (q, k, v))
    owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).cuda()
    want_o, want_lse = reference_attention(qm, km, vm, (owner[:, None] == owner[None, :])[None, None], return_lse=True)
    torch.testing.assert_close(o.float(), want_o[0], atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(lse, want_lse[0], atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_segment_counts_equal_bincount_without_reading_back(dtype):
    from pipeline.attention.backends.rows import segment_counts

    ids = torch.randint(0, 7, (1000,), dtype=dtype)
    ids[ids == 3] = 4  # an empty segment in the middle
    expected = torch.bincount(ids.long(), minlength=9)  # two empty ones at the end
    assert torch.equal(segment_counts(ids, 9), expected) and segment_counts(ids, 9).dtype == torch.int64
    assert torch.equal(segment_counts(ids.view(10, 100), 9), expected)  # any shape: counted flat
    assert torch.equal(segment_counts(ids[:0], 4), torch.zeros(4, dtype=torch.int64))
