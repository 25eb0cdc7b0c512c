"""`moelab.diffusion.lean_backward`: the lean expert and the lean upsampling conv are bit-identical
to the composed ops in outputs and every gradient, keeping far fewer activations for backward."""

from __future__ import annotations

import pytest
import torch

from moelab.diffusion.blocks import Upsample
import moelab.diffusion.experts as experts_module
from moelab.diffusion.experts import ResidualConvExperts
from moelab.moe import MoELayer, TopKRouter


@pytest.fixture(autouse=True)
def _lean_at_any_size(monkeypatch):
    """These tests use small tensors; the size rule has its own test."""
    monkeypatch.setattr(experts_module, "LEAN_MIN_NUMEL", 0)


def _layer(e: int = 4, c: int = 16, k: int = 2, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(TopKRouter(c, e, k), ResidualConvExperts(e, c))
    layer.experts.dispatch_mode = "grouped"
    for p in layer.experts.parameters():  # non-trivial norm affine parameters and biases
        p.data.add_(0.1 * torch.randn_like(p))
    return layer


def _step(layer: MoELayer, x: torch.Tensor, lean: bool):
    layer.experts.lean_backward = lean
    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(xi, router_features=xi.mean((2, 3)))
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), xi.grad.clone(), grads, saved[0]


@pytest.mark.parametrize("k", [1, 2])
def test_lean_expert_is_bit_identical_to_the_composed_expert(k):
    """Same output and same input, router and expert gradients, to the bit (torch.equal)."""
    layer = _layer(k=k)
    x = torch.randn(6, 16, 12, 12).contiguous(memory_format=torch.channels_last)
    y0, gx0, g0, _ = _step(layer, x, lean=False)
    y1, gx1, g1, _ = _step(layer, x, lean=True)
    assert torch.equal(y0, y1)
    assert torch.equal(gx0, gx1)
    assert g0.keys() == g1.keys() and "router.net.weight" in g1 and "experts.pw1_weight" in g1
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name


def test_lean_expert_keeps_fewer_activations():
    """Composed, a routed sample keeps 9 activation-sized tensors per expert for backward; lean keeps
    the two pointwise outputs (plus norm statistics and parameters)."""
    layer = _layer(c=16, k=2)
    n, c, h, w = 8, 16, 16, 16
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    saved_composed = _step(layer, x, lean=False)[3]
    saved_lean = _step(layer, x, lean=True)[3]
    act = n * 2 * c * h * w  # one activation-sized tensor over all k = 2 routed copies of the batch
    params = sum(p.numel() for p in layer.experts.parameters())
    assert saved_composed >= 8 * act
    assert saved_lean <= 2 * act + params + act // 10
    assert saved_lean >= 2 * act


def test_lean_expert_refuses_an_input_changed_before_backward():
    """The expert's rows are re-gathered from the MoE input in backward; if that input was modified
    in place meanwhile, backward fails with a clear error instead of wrong gradients."""
    layer = _layer()
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    h = x * 1.0
    y = layer(h, router_features=h.mean((2, 3)).detach())
    with torch.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


def test_lean_expert_is_not_used_on_nchw_or_for_checkpointing():
    """NCHW inputs and ``gradient_checkpointing`` take the composed expert (lean needs channels-last
    pointwise rows; checkpointing recomputes everything anyway): still equal to the lean path."""
    layer = _layer()
    x = torch.randn(4, 16, 8, 8)
    y_nchw, gx_nchw, _, _ = _step(layer, x, lean=True)
    layer.gradient_checkpointing = True
    y_ckpt, gx_ckpt, _, _ = _step(layer, x.contiguous(memory_format=torch.channels_last), lean=True)
    layer.gradient_checkpointing = False
    y_lean, gx_lean, _, _ = _step(layer, x.contiguous(memory_format=torch.channels_last), lean=True)
    torch.testing.assert_close(y_nchw, y_lean)
    torch.testing.assert_close(gx_nchw, gx_lean)
    assert torch.equal(y_ckpt, y_lean) and torch.equal(gx_ckpt, gx_lean)


def test_small_expert_calls_stay_composed(monkeypatch):
    """Below `LEAN_MIN_NUMEL` input elements per expert call the composed expert runs (the lean
    Function's fixed cost would show, the memory it spares would not)."""
    layer = _layer(k=2)
    x = torch.randn(8, 16, 16, 16).contiguous(memory_format=torch.channels_last)
    composed = _step(layer, x, lean=False)[3]
    monkeypatch.setattr(experts_module, "LEAN_MIN_NUMEL", x.numel() + 1)  # more than any expert's rows
    assert _step(layer, x, lean=True)[3] == composed
    monkeypatch.setattr(experts_module, "LEAN_MIN_NUMEL", 1)
    assert _step(layer, x, lean=True)[3] * 2 < composed


@pytest.mark.parametrize("channels_last", [False, True])
def test_lean_upsample_is_bit_identical_and_keeps_only_its_input(channels_last):
    torch.manual_seed(1)
    up = Upsample(8, 16, use_dsconv=True)
    x = torch.randn(3, 8, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    results = []
    for lean in (False, True):
        up.lean_backward = lean
        up.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        saved = [0]

        def pack(t: torch.Tensor, saved=saved) -> torch.Tensor:
            saved[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = up(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y.detach(), xi.grad, *(p.grad.clone() for p in up.parameters()), saved[0]))
    (*plain, saved_plain), (*lean, saved_lean) = results
    for a, b in zip(plain, lean):
        assert torch.equal(a, b)
    # plain keeps the upsampled map (4x) and the depthwise output (4x); lean keeps x and the depthwise output
    assert saved_plain - saved_lean == 3 * x.numel()


def test_train_config_switches_lean_backward_off_and_on():
    """``train.lean_backward`` reaches every expert bank and upsampling conv of the model (default
    on); the dense baseline, which has neither, accepts the key."""
    from moelab.diffusion.config import load_config
    from moelab.diffusion.lit import MoEFsDiCLit

    for value in (True, False):
        module = MoEFsDiCLit(load_config("digits", {"train.lean_backward": value}))
        banks = [m for m in module.model.modules() if isinstance(m, (ResidualConvExperts, Upsample))]
        assert len({type(b) for b in banks}) == 2 and all(b.lean_backward is value for b in banks)
    MoEFsDiCLit(load_config("digits", {"model.arch": "unet2d", "train.lean_backward": False}))


def test_double_backward_through_lean_ops_is_refused():
    """The lean backwards are computed outside autograd: a second-order gradient raises rather than
    silently missing terms."""
    layer = _layer()
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = layer(x, router_features=x.mean((2, 3)))
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()
