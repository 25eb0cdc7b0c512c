"""`moelab.diffusion.activations`: exact GELU on channels-last tensors through their contiguous
view -- the values and gradients PyTorch gives the same activations stored NCHW, to the bit, in
every form the model uses (out of place under autograd, in place, the backward into a fresh
tensor or into its own gradient), and other layouts passed through unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelab.diffusion.activations import GELU, gelu, gelu_, gelu_backward

CL = torch.channels_last


def _pair(*shape: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(*shape, generator=g)
    return x, x.contiguous(memory_format=CL)


@pytest.mark.parametrize("shape", [(2, 16, 5, 7), (3, 40, 9, 9), (1, 128, 8, 8)])
def test_gelu_on_channels_last_equals_gelu_on_nchw_values_and_gradient(shape):
    x, xc = _pair(*shape)
    a = x.clone().requires_grad_(True)
    b = xc.clone().requires_grad_(True)
    ya, yb = F.gelu(a), gelu(b)
    assert yb.is_contiguous(memory_format=CL)  # stays channels-last: no layout change downstream
    assert torch.equal(ya, yb)
    g = torch.randn(shape)
    ya.backward(g)
    yb.backward(g.contiguous(memory_format=CL))
    assert torch.equal(a.grad, b.grad)


def test_in_place_and_backward_forms_agree_with_the_out_of_place_ones():
    x, xc = _pair(4, 24, 6, 6, seed=1)
    g, gc = _pair(4, 24, 6, 6, seed=2)
    y = xc.clone()
    assert gelu_(y) is y
    assert torch.equal(y, F.gelu(x))
    fresh = gelu_backward(gc, xc)
    assert fresh.is_contiguous(memory_format=CL)
    assert torch.equal(fresh, torch.ops.aten.gelu_backward(g, x))
    into_grad = gc.clone()
    assert gelu_backward(into_grad, xc, out=into_grad) is into_grad  # the lean expert's in-place form
    assert torch.equal(into_grad, fresh)


def test_other_layouts_go_to_pytorch_unchanged():
    x = torch.randn(5, 7)
    assert torch.equal(gelu(x), F.gelu(x))
    nchw = torch.randn(2, 3, 4, 4)
    assert torch.equal(gelu(nchw), F.gelu(nchw)) and gelu(nchw).is_contiguous()
    mixed_grad = torch.randn(2, 8, 4, 4)  # NCHW gradient, channels-last input: PyTorch's own kernel
    xc = torch.randn(2, 8, 4, 4).contiguous(memory_format=CL)
    assert torch.equal(gelu_backward(mixed_grad, xc), torch.ops.aten.gelu_backward(mixed_grad, xc))
    t = xc[:, :, ::2]  # a strided view: not channels-last
    assert torch.equal(gelu(t), F.gelu(t))


def test_gelu_module_is_nn_gelu_without_state():
    m = GELU()
    assert isinstance(m, torch.nn.GELU) and m.approximate == "none"
    assert m.state_dict() == {}
    _, xc = _pair(2, 8, 4, 4)
    assert torch.equal(m(xc), gelu(xc))
