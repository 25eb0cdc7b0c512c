"""MoEFsDiC's fast block paths compute exactly what the plain ones do: the GEMM pointwise conv,
the channels-last layout and the two expert-bank dispatches, up to the whole U-Net; plus the
wall-clock training budget of `fit` / `compare`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moelab.diffusion.blocks import Conditioning, DilatedFusionBlock, Downsample
from moelab.diffusion.config import load_config
from moelab.diffusion.convs import PointwiseConv2d, pointwise_conv
from moelab.diffusion.experts import ResidualConvExperts
from moelab.diffusion.unet import MoEFsDiC_UNet
from moelab.errors import ConfigError

TOL = dict(atol=1e-10, rtol=1e-10)  # float64: the paths differ only in summation order
TINY = {
    "model": {"in_channels": 1, "model_channels": 8, "channel_mults": [1, 2], "image_size": 16, "num_classes": 3},
    "moe": {"num_experts": 4, "k_active": 2, "router_hidden": 8},
}


@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_conv_equals_conv2d_in_values_and_gradients(channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 5, 4, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(7, 6, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, ref = pointwise_conv(x1, w, b), F.conv2d(x2, w, b)
    torch.testing.assert_close(y, ref, **TOL)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for a, r in zip(torch.autograd.grad(y, [x1, w, b], go), torch.autograd.grad(ref, [x2, w, b], go), strict=True):
        torch.testing.assert_close(a, r, **TOL)


@pytest.mark.parametrize("max_channels", [512, 4])
def test_pointwise_conv_float32_input_gradient_by_either_kernel(monkeypatch, max_channels):
    """Float32 channels-last on CPU: the input gradient by oneDNN's 1x1 convolution (channels within
    the limit) or by a GEMM (above it) is conv2d's, to float32 rounding, and stays channels-last."""
    import moelab.diffusion.convs as convs

    monkeypatch.setattr(convs, "ONEDNN_INPUT_GRAD_MAX_CHANNELS", max_channels)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 6, 5, 4, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(7, 6, generator=g, requires_grad=True)
    b = torch.randn(7, generator=g, requires_grad=True)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, ref = pointwise_conv(x1, w, b), F.conv2d(x2, w[:, :, None, None], b)
    go = torch.randn(ref.shape, generator=g).contiguous(memory_format=torch.channels_last)
    grads = torch.autograd.grad(y, [x1, w, b], go)
    for a, r in zip(grads, torch.autograd.grad(ref, [x2, w, b], go), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    assert convs._onednn_input_grad(go, w) == (convs._ONEDNN and max_channels >= 7)


@pytest.mark.parametrize("x_grad, with_bias", [(False, True), (True, False)])
def test_pointwise_conv_gradients_of_partial_inputs(x_grad, with_bias):
    """Only what needs a gradient gets one (a frozen input, a bias-free conv), still exactly conv2d's."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(x_grad)
    w = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    y, ref = pointwise_conv(x, w, b), F.conv2d(x, w[:, :, None, None], b)
    torch.testing.assert_close(y, ref, **TOL)
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for a, r in zip(torch.autograd.grad(y, inputs, go), torch.autograd.grad(ref, inputs, go), strict=True):
        torch.testing.assert_close(a, r, **TOL)


def test_pointwise_conv_under_cpu_autocast_runs_in_bfloat16():
    """Under autocast the GEMM path runs (autocast casts its inputs); gradients reach float32 weights."""
    x = torch.randn(2, 6, 4, 4).contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, 6, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pointwise_conv(x, w, b)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    y.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32 and b.grad is not None
    torch.testing.assert_close(y.float(), F.conv2d(x, w.detach()[:, :, None, None], b.detach()), atol=0.1, rtol=0.02)


def test_pointwise_of_parts_under_cpu_autocast_runs_in_bfloat16():
    """The skip merge under bf16 autocast (precision: bf16-mixed): every part's GEMM in bfloat16."""
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(2, c, 4, 4, generator=g).contiguous(memory_format=torch.channels_last) for c in (6, 3)]
    w = torch.randn(5, 9, 1, 1, generator=g)
    b = torch.zeros(5)
    merge = PointwiseConv2d(9, 5)
    with torch.no_grad():
        merge.weight.copy_(w)
        merge.bias.zero_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = merge(*xs)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    y.float().sum().backward()
    assert merge.weight.grad is not None and merge.weight.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), F.conv2d(torch.cat(xs, dim=1), w, b), atol=0.1, rtol=0.02)


def test_pointwise_module_is_a_drop_in_for_conv2d_1x1():
    """Same parameters, init distribution and state-dict keys: old checkpoints load unchanged."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 1)
    pw = PointwiseConv2d(6, 5)
    assert pw.state_dict().keys() == conv.state_dict().keys()
    assert [p.shape for p in pw.parameters()] == [p.shape for p in conv.parameters()]
    pw.load_state_dict(conv.state_dict())
    x = torch.randn(2, 6, 3, 3).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(pw(x), conv(x), atol=1e-6, rtol=1e-5)


def _cond(b: int, dim: int) -> Conditioning:
    g = torch.Generator().manual_seed(1)
    return Conditioning(torch.randn(b, dim, generator=g, dtype=torch.float64), torch.randn(b, dim, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("block", ["fusion", "down"])
def test_blocks_compute_the_same_on_either_layout(block):
    torch.manual_seed(2)
    m = (DilatedFusionBlock(channels=16, emb_dim=12, use_dsconv=True) if block == "fusion" else Downsample(16, 32, True)).double()
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    run = (lambda z: m(z, _cond(2, 12))) if block == "fusion" else m
    torch.testing.assert_close(run(x), run(x.contiguous(memory_format=torch.channels_last)), **TOL)


def _model_outputs(model: MoEFsDiC_UNet, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list]:
    model.zero_grad()
    out, logits = model(x, t, c)
    (out.square().mean() + sum(lg.square().mean() for lg in logits)).backward()
    return out.detach(), [lg.detach() for lg in logits], [p.grad.clone() for p in model.parameters()]


def test_unet_output_and_gradients_equal_across_dispatch_modes():
    """The whole U-Net: gathered and grouped expert dispatch give the same routing, the same
    noise prediction and the same gradient of every parameter; the output comes back NCHW."""
    torch.manual_seed(3)
    model = MoEFsDiC_UNet(load_config(TINY)).double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 1, 16, 16, generator=g, dtype=torch.float64)
    t, c = torch.randint(0, 1000, (5,), generator=g), torch.randint(0, 4, (5,), generator=g)
    banks = [m for m in model.modules() if isinstance(m, ResidualConvExperts)]
    assert banks
    results = {}
    for mode in ("gathered", "grouped"):
        for b in banks:
            b.dispatch_mode = mode
        results[mode] = _model_outputs(model, x, t, c)
    (out_a, lg_a, gr_a), (out_b, lg_b, gr_b) = results["gathered"], results["grouped"]
    assert out_a.is_contiguous() and out_a.shape == x.shape
    torch.testing.assert_close(out_a, out_b, **TOL)
    for a, b in zip(lg_a, lg_b, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    for a, b in zip(gr_a, gr_b, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_budget_must_be_positive(tmp_path):
    from moelab.diffusion.compare import compare
    from moelab.diffusion.training import fit

    with pytest.raises(ConfigError, match="--budget-seconds"):
        fit(TINY, checkpoint_dir=tmp_path, max_time=0)
    with pytest.raises(ConfigError, match="--budget-seconds"):
        compare(TINY, tmp_path, budget_seconds=-1)


def test_wall_clock_budget_stops_training_with_a_checkpoint(tmp_path):
    """A budget far below the configured epochs stops training by time and still leaves the
    checkpoint of the cut run (the step count it reaches depends on the machine; that it is cut
    does not: 10,000 epochs cannot run in 2 seconds)."""
    from moelab.diffusion.checkpoints import read_checkpoint
    from moelab.diffusion.training import fit

    cfg = load_config(
        {**TINY, "model": {**TINY["model"], "channel_mults": [1], "num_classes": 10},
         "train": {"batch_size": 16, "epochs": 10_000, "checkpoint_every": 1, "ema": False},
         "data": {"dataset": "digits", "fit": "pad", "subset": 32}}
    )
    last = fit(cfg, checkpoint_dir=tmp_path, max_time=2.0, progress=False)
    steps = int(read_checkpoint(last)["global_step"])
    assert 1 <= steps < 10_000 * 2


@pytest.mark.parametrize("sizes", [(3, 5), (3, 5, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_of_parts_equals_pointwise_of_concatenation(channels_last, sizes):
    """The skip merge's concat-free 1x1 conv: values and gradients of conv1x1(cat(a, b, ...)); on
    channels-last CPU input one autograd node (no in-place-on-view copies in backward)."""
    g = torch.Generator().manual_seed(3)
    parts = [torch.randn(2, c, 5, 4, generator=g, dtype=torch.float64) for c in sizes]
    if channels_last:
        parts = [t.contiguous(memory_format=torch.channels_last) for t in parts]
    merge = PointwiseConv2d(sum(sizes), 6).double()
    mine, theirs = [t.clone().requires_grad_(True) for t in parts], [t.clone().requires_grad_(True) for t in parts]
    y, ref = merge(*mine), F.conv2d(torch.cat(theirs, 1), merge.weight, merge.bias)
    torch.testing.assert_close(y, ref, **TOL)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    if channels_last:
        assert "PointwiseConcatRows" in type(y.grad_fn).__name__
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    params = list(merge.parameters())
    got = torch.autograd.grad(y, [*mine, *params], go)
    want = torch.autograd.grad(ref, [*theirs, *params], go)
    for x, r in zip(got, want, strict=True):
        torch.testing.assert_close(x, r, **TOL)
    # only some inputs asked for
    (g_b,) = torch.autograd.grad(merge(*mine), [mine[1]], go)
    torch.testing.assert_close(g_b, want[1], **TOL)


def test_pointwise_of_parts_refuses_a_channel_mismatch():
    a = torch.randn(1, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="weight expects 8"):
        PointwiseConv2d(8, 4)(a, a)
