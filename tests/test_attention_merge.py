"""merge_rows (moga+stga's last step): out[i] = wa[s] a[s] - wc[s] c[s] + wb[i] b[i], s = src[i],
against that formula written out in fp64; on CUDA the one-pass Triton kernel too."""

import pytest
import torch

from pipeline.attention.backends.merge import fused_available, merge_rows


def _inputs(t, h, d, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randn(t, h, d, generator=g).to(device, dtype) for _ in range(3))
    wa, wb, wc = (torch.rand(t, h, generator=g).to(device) for _ in range(3))
    src = torch.randperm(t, generator=g).to(device)
    return a, wa, b, wb, src, c, wc


def _formula(a, wa, b, wb, src, c=None, wc=None):
    a, b, wa, wb = a.double(), b.double(), wa.double(), wb.double()
    out = (a * wa[..., None])[src] + b * wb[..., None]
    if c is not None:
        out = out - (c.double() * wc.double()[..., None])[src]
    return out


@pytest.mark.parametrize("with_cells", [False, True])
def test_merge_rows_is_the_formula_on_cpu(with_cells):
    a, wa, b, wb, src, c, wc = _inputs(37, 3, 8, "cpu", torch.float32)
    if not with_cells:
        c = wc = None
    out = merge_rows(a, wa, b, wb, src, c, wc)
    torch.testing.assert_close(out.double(), _formula(a, wa, b, wb, src, c, wc), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="merge_rows: a"):
        merge_rows(a[:-1], wa, b, wb, src)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the lead runs it on the GPU machine)")
@pytest.mark.parametrize("with_cells", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_rows_on_cuda_is_the_formula(with_cells, dtype):
    a, wa, b, wb, src, c, wc = _inputs(4099, 12, 128, "cuda", dtype)  # H, D not both powers of two: masks
    if not with_cells:
        c = wc = None
    assert fused_available(a, b)  # the image has Triton: the one-pass kernel is what runs
    out = merge_rows(a, wa, b, wb, src, c, wc)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), _formula(a, wa, b, wb, src, c, wc), atol=tol, rtol=tol)
    with torch.enable_grad():  # a gradient needed: the torch passes, same result
        a.requires_grad_(True)
        assert not fused_available(a, b)
        torch.testing.assert_close(merge_rows(a, wa, b, wb, src, c, wc).detach().double(),
                                   _formula(a.detach(), wa, b, wb, src, c, wc), atol=tol, rtol=tol)
