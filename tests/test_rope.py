"""apply_rope against complex multiplication: pairs (x[2i], x[2i+1]) as x[2i] + i x[2i+1], times e^(i theta)."""

import pytest
import torch

from pipeline.attention.rope import apply_rope


def rope_and_reference(n, d, seed=0):
    theta = torch.rand(1, n, 1, d // 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 6.3
    cos = torch.cos(theta).repeat_interleave(2, -1).float()  # diffusers' layout: each angle twice
    sin = torch.sin(theta).repeat_interleave(2, -1).float()

    def reference(x):
        pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
        return torch.view_as_real(pairs * torch.polar(torch.ones_like(theta), theta)).flatten(-2)

    return (cos, sin), reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_is_a_rotation_of_each_pair(dtype):
    rope, reference = rope_and_reference(12, 8)
    x = torch.randn(2, 12, 3, 8).to(dtype)
    got = apply_rope(x, rope)
    assert got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.double(), reference(x), atol=tol, rtol=tol)


def test_apply_rope_into_a_strided_buffer_and_with_a_gradient():
    rope, reference = rope_and_reference(10, 8, seed=1)
    x = torch.randn(1, 10, 4, 8)
    buffer = torch.zeros(2, 1, 10, 3, 2, 8)  # the exchange's (P, B, L, T, Hc, D) send buffer, q at T = 0
    part = x.view(1, 10, 2, 2, 8).permute(2, 0, 1, 3, 4)  # (P, B, L, Hc, D) heads of rank j at [j]
    apply_rope(part, rope, out=buffer[:, :, :, 0])
    want = reference(x).float().view(1, 10, 2, 2, 8).permute(2, 0, 1, 3, 4)
    torch.testing.assert_close(buffer[:, :, :, 0], want, atol=1e-6, rtol=1e-6)
    assert not buffer[:, :, :, 1:].any()  # nothing written beside q's slot
    leaf = x.clone().requires_grad_()
    apply_rope(leaf, rope).square().sum().backward()  # |rotated|^2 = |x|^2 per pair: gradient 2x
    torch.testing.assert_close(leaf.grad, 2 * x, atol=1e-5, rtol=1e-5)
