"""`moelab.diffusion.depthwise`: the compiled 3x3 depthwise-conv backward against float64 autograd
(input, weight and bias gradients, any subset, with and without an added residual gradient, image
edges, 1 and 2 threads), its determinism and where it runs. In the lean expert:
tests/test_diffusion_lean_backward.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelab.diffusion import depthwise, kernels

CL = torch.channels_last
needs_kernel = pytest.mark.skipif(depthwise._library() is None, reason="no C compiler here: the kernel falls back")


pytestmark = pytest.mark.usefixtures("kernels_on")


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = torch.randn(shape, generator=g).contiguous(memory_format=CL)
    grad = torch.randn(shape, generator=g).contiguous(memory_format=CL)
    weight, bias = torch.randn(c, 1, 3, 3, generator=g), torch.randn(c, generator=g)
    add = torch.randn(shape, generator=g).contiguous(memory_format=CL)
    return x, grad, weight, bias, add


def _reference(x, grad, weight, bias):
    """float64 autograd of ``F.conv2d(x, weight, bias, padding=1, groups=C)`` at ``grad``."""
    xx, ww, bb = (t.detach().double().requires_grad_(True) for t in (x, weight, bias))
    F.conv2d(xx, ww, bb, padding=1, groups=x.shape[1]).backward(grad.double())
    return xx.grad, ww.grad, bb.grad


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 16, 9, 7), (3, 32, 1, 5), (1, 48, 6, 1), (2, 16, 1, 1), (4, 64, 2, 3)])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_backward_matches_float64_autograd(shape, nthreads, threads):
    threads(nthreads)
    x, grad, weight, bias, add = _inputs(shape)
    gx64, gw64, gb64 = _reference(x, grad, weight, bias)
    gx, gw, gb = depthwise.backward(grad, x, weight, [True, True, True])
    n_terms = shape[0] * shape[2] * shape[3]  # pixels summed into each weight and bias gradient
    for got, ref in ((gx, gx64), (gw, gw64), (gb, gb64)):
        assert got.dtype == torch.float32 and got.shape == ref.shape
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6 * max(1.0, n_terms**0.5))
    assert gx.is_contiguous(memory_format=CL)
    # the residual's gradient is added as the input gradient is written
    gx_add = depthwise.backward(grad, x, weight, [True, False, False], add=add)[0]
    torch.testing.assert_close(gx_add.double(), gx64 + add.double(), rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True], [False, True, True]])
def test_backward_computes_only_what_is_asked_for(mask):
    x, grad, weight, bias, _ = _inputs((2, 16, 5, 4))
    full = depthwise.backward(grad, x, weight, [True, True, True])
    got = depthwise.backward(grad, x, weight, mask)
    for want, a, b in zip(mask, got, full, strict=True):
        assert (a is None) != want
        if want:
            assert torch.equal(a, b)  # the same sums whichever others are made


@needs_kernel
def test_backward_takes_a_non_channels_last_gradient_and_residual():
    x, grad, weight, bias, add = _inputs((2, 32, 6, 6))
    a = depthwise.backward(grad, x, weight, [True, True, True], add=add)
    b = depthwise.backward(grad.contiguous(), x, weight, [True, True, True], add=add.contiguous())
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


@needs_kernel
def test_backward_is_deterministic_for_a_thread_count(threads):
    threads(2)
    x, grad, weight, bias, _ = _inputs((3, 32, 16, 16))
    first = depthwise.backward(grad, x, weight, [True, True, True])
    for _ in range(3):
        again = depthwise.backward(grad, x, weight, [True, True, True])
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_supports_only_3x3_padding_1_channels_in_sixteens_on_channels_last_float32():
    x = torch.randn(2, 16, 5, 5).contiguous(memory_format=CL)
    w = torch.randn(16, 1, 3, 3)
    built = depthwise._library() is not None
    assert depthwise.supports(x, w, 1) == built
    assert not depthwise.supports(x, w, 2)  # another padding (a dilated conv's)
    assert not depthwise.supports(x, torch.randn(16, 1, 5, 5), 2)
    assert not depthwise.supports(x.contiguous(), w, 1)  # NCHW
    assert not depthwise.supports(x.double(), w.double(), 1)
    x24 = torch.randn(2, 24, 5, 5).contiguous(memory_format=CL)
    assert not depthwise.supports(x24, torch.randn(24, 1, 3, 3), 1)
    with kernels.enabled(False):
        assert not depthwise.supports(x, w, 1)


@needs_kernel
@pytest.mark.parametrize("nthreads", [1, 2])
def test_backward_adds_the_input_gradient_into_given_rows(nthreads, threads):
    """``into``/``into_rows``: each sample's input gradient (plus ``add``) is added to its row of a
    larger units-last tensor, to the bit ``index_add`` of the plain input gradient; the weight and
    bias gradients are unchanged; bad rows are refused."""
    threads(nthreads)
    x, grad, weight, _, add = _inputs((3, 32, 6, 5), seed=4)
    rows = torch.tensor([2, 5, 0])
    base = torch.randn(6, 6, 5, 32)
    gx, gw, gb = depthwise.backward(grad, x, weight, [True, True, True], add=add)
    into = base.clone()
    got, gw2, gb2 = depthwise.backward(grad, x, weight, [True, True, True], add=add, into=into, into_rows=rows)
    assert got is into
    assert torch.equal(into, base.clone().index_add_(0, rows, gx.permute(0, 2, 3, 1)))
    assert torch.equal(gw, gw2) and torch.equal(gb, gb2)
    with pytest.raises(ValueError, match="into and into_rows go together"):
        depthwise.backward(grad, x, weight, [True, False, False], into=into)
    with pytest.raises(ValueError, match="sample indices"):
        depthwise.backward(grad, x, weight, [True, False, False], into=into, into_rows=torch.tensor([0, 1, -1]))


@needs_kernel
@pytest.mark.parametrize("nthreads", [1, 2])
def test_backward_through_gelu_matches_float64(nthreads, threads):
    """`backward_through_gelu`: the input gradient of a depthwise conv whose input is
    ``gelu(group_norm(a))`` (the float64 reference from the norm's affine form ``a * scale + shift``),
    taken on through that GELU, and its per-sample channel sums (of it
    and of it times ``a``), against float64 autograd; weight and bias gradients as `backward`'s;
    then GroupNorm+GELU's backward from those sums equals the one that makes them itself."""
    from moelab.diffusion import fused_norm

    threads(nthreads)
    g = torch.Generator().manual_seed(6)
    n, c, h, w, groups = 3, 32, 6, 5, 8
    a = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=CL)
    gamma, beta = torch.randn(c, generator=g), torch.randn(c, generator=g)
    d, mean, rstd = fused_norm.norm_act(a, gamma, beta, groups, 1e-5, fused_norm.NORM_GELU)
    rep = c // groups
    scale = rstd.repeat_interleave(rep, 1) * gamma
    shift = beta - mean.repeat_interleave(rep, 1) * scale
    grad = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=CL)
    weight = torch.randn(c, 1, 3, 3, generator=g)
    got, gw, gb, sums = depthwise.backward_through_gelu(grad, d, weight, [True, True], a, mean, rstd, gamma, beta, groups)
    gx, gw0, gb0 = depthwise.backward(grad, d, weight, [True, True, True])
    assert torch.equal(gw, gw0) and torch.equal(gb, gb0)
    s64 = a.double() * scale.double()[:, :, None, None] + shift.double()[:, :, None, None]
    gd64 = 0.5 * (1 + torch.erf(s64 / 2**0.5)) + s64 * torch.exp(-0.5 * s64**2) / (2 * torch.pi) ** 0.5
    want = _reference(d, grad, weight, torch.zeros(c))[0] * gd64
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert sums.shape == (n, 2, c) and sums.dtype == torch.float64
    torch.testing.assert_close(sums[:, 0], want.sum((2, 3)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sums[:, 1], (want * a.double()).sum((2, 3)), rtol=1e-5, atol=1e-4)
    # the norm's backward from these sums, against the one that takes gx through the GELU itself
    plain = fused_norm.norm_act_backward(gx, a, mean, rstd, gamma, beta, groups, fused_norm.NORM_GELU, need_dx_sum=True)
    from_sums = fused_norm.norm_act_backward(got, a, mean, rstd, gamma, beta, groups, fused_norm.NORM_GELU, need_dx_sum=True, sums=sums)
    assert from_sums[0] is got  # written over the given gradient
    for p, q in zip(plain, from_sums, strict=True):
        assert (p is None) == (q is None)
        if p is not None:
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="act_x"):
        depthwise.backward_through_gelu(grad, d, weight, [True, True], a[:2], mean, rstd, gamma, beta, groups)
    with pytest.raises(ValueError, match="mean and rstd"):
        depthwise.backward_through_gelu(grad, d, weight, [True, True], a, mean[:, :4], rstd, gamma, beta, groups)
    with pytest.raises(ValueError, match="mean and rstd"):
        depthwise.backward_through_gelu(grad, d, weight, [True, True], a, mean, rstd, gamma, beta, 5)
    with pytest.raises(ValueError, match=f"expected {c} values"):  # the kernel would read c of them
        depthwise.backward_through_gelu(grad, d, weight, [True, True], a, mean, rstd, gamma[:-1], beta, groups)
    with pytest.raises(ValueError, match="NORM_GELU only"):
        fused_norm.norm_act_backward(got, a, mean, rstd, gamma, beta, groups, fused_norm.NORM, sums=sums)
