"""`moelab.diffusion.fused_norm`: the compiled GroupNorm+GELU kernels against a float64 autograd
reference (values and every gradient, 1 and 2 threads) and where they run. Building, caching and
the fallback without a compiler: tests/test_diffusion_kernels.py. The lean expert and output head
on them, against the composed ops: tests/test_diffusion_lean_backward.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelab.diffusion import fused_norm, kernels

CL = torch.channels_last
needs_kernel = pytest.mark.skipif(fused_norm._library() is None, reason="no C compiler here: the fused kernels fall back")


pytestmark = pytest.mark.usefixtures("kernels_on")


def _reference(x, weight, bias, groups, mode, res, rows, grad):
    """float64 autograd: ``y`` and the gradients of ``(x, weight, bias, res, rows)`` at ``grad``."""
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, weight, bias, res, rows)]
    xx, ww, bb, rr, wr = leaves
    y = F.group_norm(xx, groups, ww, bb)
    if mode == fused_norm.NORM_GELU:
        y = F.gelu(y)
    elif mode == fused_norm.NORM_ADD_GELU_SCALE:
        y = F.gelu(y + rr) * wr[:, None, None, None]
    y.backward(grad.double())
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def _close(actual, expected, scale=1.0):
    # the kernels accumulate in double: well inside float32 rounding of these magnitudes
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=2e-6 * scale)


@needs_kernel
@pytest.mark.parametrize("mode", [fused_norm.NORM, fused_norm.NORM_GELU, fused_norm.NORM_ADD_GELU_SCALE])
@pytest.mark.parametrize("shape,groups,affine", [((2, 32, 9, 7), 8, True), ((3, 64, 4, 4), 32, False), ((1, 12, 5, 6), 3, True)])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_kernels_match_float64_autograd(mode, shape, groups, affine, nthreads, threads):
    threads(nthreads)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3 + 1).contiguous(memory_format=CL)  # an offset mean: cancellation
    weight = torch.rand(shape[1], generator=g) + 0.5 if affine else None
    bias = torch.randn(shape[1], generator=g) if affine else None
    res = torch.randn(shape, generator=g).contiguous(memory_format=CL)
    rows = torch.rand(shape[0], generator=g)
    grad = torch.randn(shape, generator=g).contiguous(memory_format=CL)
    tail = mode == fused_norm.NORM_ADD_GELU_SCALE
    kw = {"res": res, "rows_weight": rows} if tail else {}
    y, mean, rstd = fused_norm.norm_act(x, weight, bias, groups, 1e-5, mode, **kw)
    _, m_ref, r_ref = torch.ops.aten.native_group_norm(x.double(), None, None, shape[0], shape[1], shape[2] * shape[3], groups, 1e-5)
    y_ref, (gx, gw, gb, gres, grows) = _reference(x, weight, bias, groups, mode, res if tail else None, rows if tail else None, grad)
    assert y.shape == x.shape and y.is_contiguous(memory_format=CL) and mean.shape == rstd.shape == (shape[0], groups)
    _close(y, y_ref)
    _close(mean, m_ref)
    _close(rstd, r_ref)
    # backward's recomputation: the statistics given, no statistics pass, the same output to the bit
    y_given, m_given, r_given = fused_norm.norm_act(x, weight, bias, groups, 1e-5, mode, stats=(mean, rstd), **kw)
    assert torch.equal(y_given, y) and torch.equal(m_given, mean) and torch.equal(r_given, rstd)
    dx, dw, db, dres, drows, dx_sum = fused_norm.norm_act_backward(
        grad, x, mean, rstd, weight, bias, groups, mode, need_dx_sum=True, **kw
    )
    n_per_channel = shape[0] * shape[2] * shape[3]  # dweight/dbias sum this many terms
    _close(dx, gx)
    _close(dx_sum, gx.sum((0, 2, 3)), n_per_channel)
    if affine:
        _close(dw, gw, n_per_channel)
        _close(db, gb, n_per_channel)
    else:
        assert dw is None and db is None
    if tail:
        # the gradient at gn(x) + res is the residual's gradient
        _close(dres, gres)
        _close(drows, grows, shape[1] * shape[2] * shape[3])
    else:
        assert dres is None and drows is None
    # deterministic for a given thread count
    again = fused_norm.norm_act_backward(grad, x, mean, rstd, weight, bias, groups, mode, **kw)
    assert torch.equal(again[0], dx) and again[5] is None


@needs_kernel
@pytest.mark.parametrize("mode", [fused_norm.NORM_GELU, fused_norm.NORM_ADD_GELU_SCALE])
def test_gelu_and_its_derivative_accurate_over_the_whole_range(mode):
    """The kernels' GELU and GELU derivative (rational approximations of the Gaussian tail, no exp;
    `moelab_kernels.h`) against float64 over pre-activations from -12 to 12, through the tails where
    the approximation hands over to 0 and 1 (|s| = 5.6): the values within 1e-6 absolute and 3e-7
    relative, and GroupNorm's gradient through the derivative as close to float64 autograd as the
    kernel's float32 pre-activation allows. The affine weight spreads GroupNorm's output so the GELU
    sees the whole range (the tail mode with a zero residual and unit routing weights)."""
    c = 16
    x = torch.linspace(-1.7, 1.7, 2 * c * 24 * 24).reshape(2, 24, 24, c).permute(0, 3, 1, 2)  # channels-last
    weight, bias = torch.full((c,), 7.0), torch.linspace(-0.5, 0.5, c)
    kw = {"res": torch.zeros_like(x), "rows_weight": torch.ones(2)} if mode == fused_norm.NORM_ADD_GELU_SCALE else {}
    y, mean, rstd = fused_norm.norm_act(x, weight, bias, 4, 1e-5, mode, **kw)
    grad = torch.ones_like(x)
    dx = fused_norm.norm_act_backward(grad, x, mean, rstd, weight, bias, 4, mode, **kw)[0]
    # the GELU's input as the kernel forms it (its float32 rounding is inside the tolerance)
    s = (x.double() - mean.double().repeat_interleave(c // 4, 1)[:, :, None, None]) * (
        rstd.double().repeat_interleave(c // 4, 1)[:, :, None, None] * weight.double()[:, None, None]
    ) + bias.double()[:, None, None]
    assert s.min() < -11 and s.max() > 11 and ((s.abs() - 5.6).abs() < 0.05).any()
    torch.testing.assert_close(y.double(), F.gelu(s), rtol=3e-7, atol=1e-6)
    _, (gx, *_) = _reference(x, weight, bias, 4, mode, kw.get("res"), kw.get("rows_weight"), grad)
    # the whole GroupNorm backward through it, against float64 autograd; the gradient is about
    # weight * rstd = 7 times the GELU derivative, and so is the float32 rounding of its input
    _close(dx, gx, scale=8.0)


def test_gelu_fit_script_makes_float32_coefficients_without_bias():
    """bench/gelu_fit.py, which made the kernels' GELU coefficients: its fits of the Gaussian tail c
    and the derivative's tail h are float32 numbers (rounded one at a time, the rest refitted)
    within 2e-8 of the targets and without the systematic error that rounding them all at once
    left (mean error of c -1.4e-8)."""
    import importlib.util
    from pathlib import Path

    import numpy as np

    path = Path(__file__).resolve().parents[1] / "bench" / "gelu_fit.py"
    spec = importlib.util.spec_from_file_location("gelu_fit", path)
    assert spec is not None and spec.loader is not None
    fit_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit_module)
    a = np.linspace(0.0, fit_module.TAIL_A, 4000)
    for name, (n_p, n_q) in (("c", (6, 8)), ("h", (7, 8))):
        y = fit_module._targets(a)[name]
        p, q = fit_module.fit(y, a, n_p, n_q)
        assert len(p) == n_p + 1 and len(q) == n_q + 1 and q[0] == 1.0
        assert all(float(np.float32(v)) == v for v in (*p, *q))
        err = np.polyval(p[::-1], a) / np.polyval(q[::-1], a) - y
        assert np.abs(err).max() < 2e-8 and abs(err.mean()) < 3e-9, (name, np.abs(err).max(), err.mean())


@needs_kernel
def test_kernels_skip_gradients_not_asked_for():
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=CL)
    w, b = torch.ones(8), torch.zeros(8)
    _, mean, rstd = fused_norm.norm_act(x, w, b, 4, 1e-5, fused_norm.NORM_GELU)
    out = fused_norm.norm_act_backward(torch.ones_like(x), x, mean, rstd, w, b, 4, fused_norm.NORM_GELU, need_weight=False, need_bias=False)
    assert out[1] is None and out[2] is None and out[0].shape == x.shape


def test_supports_only_channels_last_float32_cpu_and_divisible_groups():
    x = torch.randn(2, 8, 4, 4)
    assert not fused_norm.supports(x, 4)  # NCHW
    cl = x.contiguous(memory_format=CL)
    assert not fused_norm.supports(cl.double(), 4)
    assert not fused_norm.supports(cl, 3)
    assert not fused_norm.supports(cl, 4, x)  # a companion tensor in another layout
    with kernels.enabled(False):
        assert not fused_norm.supports(cl, 4)
    assert fused_norm.supports(cl, 4) == (fused_norm._library() is not None)


@needs_kernel
def test_tail_adds_into_given_rows_and_reads_its_gradient_there():
    """``out``/``out_rows``: the tail's result is added to the given samples of a larger units-last
    tensor (grouped dispatch's sum over experts), as ``index_add`` of the plain result would; its
    backward with ``grad_rows`` reads each sample's gradient there, to the bit what it computes from
    the gathered rows. Wrong tensors or rows are refused with a clear error."""
    torch.manual_seed(5)
    n, c, h, w, g = 3, 32, 5, 4, 8
    x, res, grad_rows_src = (torch.randn(n, c, h, w).contiguous(memory_format=CL) for _ in range(3))
    weight, bias, rw = torch.randn(c), torch.randn(c), torch.rand(n)
    rows = torch.tensor([4, 0, 2])
    y0 = torch.randn(6, h, w, c)
    tail = fused_norm.NORM_ADD_GELU_SCALE
    out, mean, rstd = fused_norm.norm_act(x, weight, bias, g, 1e-5, tail, res=res, rows_weight=rw)
    y = y0.clone()
    got, mean2, rstd2 = fused_norm.norm_act(x, weight, bias, g, 1e-5, tail, res=res, rows_weight=rw, out=y, out_rows=rows)
    assert got is y and torch.equal(mean, mean2) and torch.equal(rstd, rstd2)
    torch.testing.assert_close(y, y0.clone().index_add_(0, rows, out.permute(0, 2, 3, 1)), rtol=1e-6, atol=1e-6)
    assert torch.equal(y[[1, 3, 5]], y0[[1, 3, 5]])  # rows no sample goes to are untouched

    big_grad = torch.randn(6, h, w, c)
    plain = fused_norm.norm_act_backward(
        big_grad.index_select(0, rows).permute(0, 3, 1, 2), x, mean, rstd, weight, bias, g, tail, res=res, rows_weight=rw,
        need_dx_sum=True,
    )
    by_rows = fused_norm.norm_act_backward(
        big_grad, x, mean, rstd, weight, bias, g, tail, res=res, rows_weight=rw, need_dx_sum=True, grad_rows=rows
    )
    for a, b in zip(plain, by_rows, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)

    with pytest.raises(ValueError, match="out and out_rows go together"):
        fused_norm.norm_act(x, weight, bias, g, 1e-5, tail, res=res, rows_weight=rw, out=y)
    with pytest.raises(ValueError, match="only with NORM_ADD_GELU_SCALE"):
        fused_norm.norm_act(x, weight, bias, g, 1e-5, fused_norm.NORM_GELU, out=y, out_rows=rows)
    with pytest.raises(ValueError, match="sample indices"):
        fused_norm.norm_act(x, weight, bias, g, 1e-5, tail, res=res, rows_weight=rw, out=y, out_rows=torch.tensor([0, 6, 1]))
    with pytest.raises(ValueError, match="contiguous float32"):
        fused_norm.norm_act(x, weight, bias, g, 1e-5, tail, res=res, rows_weight=rw, out=y.permute(0, 3, 1, 2), out_rows=rows)
    with pytest.raises(ValueError, match="sample indices"):
        fused_norm.norm_act_backward(big_grad, x, mean, rstd, weight, bias, g, tail, res=res, rows_weight=rw, grad_rows=rows[:2])
