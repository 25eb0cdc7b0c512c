"""`moelab.diffusion.lean_backward`: the lean expert, upsampling conv and output head are
bit-identical to the composed ops in outputs and every gradient, keeping far fewer activations for
backward; the router's pooling hands back a broadcast gradient. With moelab's compiled CPU kernels
off; with them on (the fused GroupNorm+GELU, the depthwise-conv backward) the lean ops equal the
composed ones to float rounding, as close to a float64 run as PyTorch's kernels are (the tests at
the end; the kernels alone: tests/test_diffusion_fused_norm.py, tests/test_diffusion_depthwise.py)."""

from __future__ import annotations

import pytest
import torch

from moelab.diffusion.blocks import Upsample
import moelab.diffusion.experts as experts_module
from moelab.diffusion import depthwise, fused_norm, kernels
from moelab.diffusion.experts import ResidualConvExperts
from moelab.moe import MoELayer, TopKRouter


@pytest.fixture(autouse=True)
def _lean_at_any_size(monkeypatch):
    """These tests use small tensors; the size rule has its own test."""
    monkeypatch.setattr(experts_module, "LEAN_MIN_NUMEL", 0)


@pytest.fixture(autouse=True)
def _aten_kernels():
    """Bit-identity holds on PyTorch's kernels; moelab's are checked to rounding below."""
    with kernels.enabled(False):
        yield


def _layer(e: int = 4, c: int = 16, k: int = 2, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(TopKRouter(c, e, k), ResidualConvExperts(e, c))
    layer.experts.dispatch_mode = "grouped"
    for p in layer.experts.parameters():  # non-trivial norm affine parameters and biases
        p.data.add_(0.1 * torch.randn_like(p))
    return layer


def _saved_numel(fn, *args):
    saved = [0]
    storages: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:  # elements of every distinct storage saved for backward
        if t.untyped_storage().data_ptr() not in storages:
            storages.add(t.untyped_storage().data_ptr())
            saved[0] += t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, saved[0]


def _step(layer: MoELayer, x: torch.Tensor, lean: bool):
    layer.experts.lean_backward = lean
    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    y, saved = _saved_numel(lambda: layer(xi, router_features=xi.mean((2, 3))))
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), xi.grad.clone(), grads, saved


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
    the two pointwise outputs, plus the block input once (its rows are re-gathered from it), norm
    statistics and parameters."""
    layer = _layer(c=16, k=2)
    n, c, h, w = 8, 16, 16, 16
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    saved_composed = _step(layer, x, lean=False)[3]
    saved_lean = _step(layer, x, lean=True)[3]
    act = n * 2 * c * h * w  # one activation-sized tensor over all k = 2 routed copies of the batch
    params = sum(p.numel() for p in layer.experts.parameters())
    assert saved_composed >= 8 * act
    assert saved_lean <= 2 * act + act // 2 + params + act // 10  # act // 2: the block input, kept once
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
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # autograd's saved-tensor check
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
    for a, b in zip(plain, lean, strict=True):
        assert torch.equal(a, b)
    # plain keeps the upsampled map (4x) and the depthwise output (4x); lean keeps x (plus the
    # depthwise bias, to recompute the depthwise output) on channels-last CPU input, where the
    # pointwise conv is the GEMM form it reproduces, and x and the depthwise output elsewhere
    if channels_last:
        assert saved_plain - saved_lean == 7 * x.numel() - up.conv.depthwise.bias.numel()
    else:
        assert saved_plain - saved_lean == 3 * x.numel()


def _head(channels_last: bool):
    """The output head's norm and conv (non-trivial norm affine parameters) and an input for it."""
    torch.manual_seed(2)
    norm, conv = torch.nn.GroupNorm(4, 16), torch.nn.Conv2d(16, 3, 3, padding=1)
    for p in norm.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    h = torch.randn(3, 16, 10, 10)
    return norm, conv, h.contiguous(memory_format=torch.channels_last) if channels_last else h


def _head_step(fn, h, norm, conv):
    """Output, input gradient and every parameter gradient of ``fn(h)``, and the elements it saved."""
    for p in (*norm.parameters(), *conv.parameters()):
        p.grad = None
    hi = h.clone().requires_grad_(True)
    y, saved = _saved_numel(fn, hi)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return [y.detach(), hi.grad, *(p.grad.clone() for p in (*norm.parameters(), *conv.parameters()))], saved


@pytest.mark.parametrize("channels_last", [False, True])
def test_lean_output_head_is_bit_identical_and_keeps_only_its_input(channels_last):
    """`norm_act_conv` = conv(gelu(group_norm(h))) to the bit, values and every gradient; it keeps
    h and the norm statistics, not the norm's and the GELU's outputs."""
    from moelab.diffusion.activations import gelu
    from moelab.diffusion.lean_backward import norm_act_conv

    norm, conv, h = _head(channels_last)
    plain, saved_plain = _head_step(lambda z: conv(gelu(norm(z))), h, norm, conv)
    lean, saved_lean = _head_step(lambda z: norm_act_conv(z, norm, conv), h, norm, conv)
    for a, b in zip(plain, lean, strict=True):
        assert torch.equal(a, b)
    assert saved_plain - saved_lean == 2 * h.numel() - norm.bias.numel()


def _no_less_accurate(fused, aten, ref64):
    """Each fused result is as close to the float64 result as PyTorch's float32 kernels get (within
    2x, or a float32 rounding of the values' scale)."""
    assert len(fused) == len(aten) == len(ref64)
    for f, a, r in zip(fused, aten, ref64, strict=True):
        err_fused, err_aten = (f.double() - r).abs().max().item(), (a.double() - r).abs().max().item()
        assert err_fused <= 2 * err_aten + 1e-6 * r.abs().max().item(), (err_fused, err_aten)


def _composed_and_float64(results, module, x):
    """``results(module, x, lean=False)`` in float32 and in float64 (the reference); ``module`` is
    left in float32."""
    composed = results(module, x, lean=False)
    ref64 = results(module.double(), x.double(), lean=False)
    module.float()
    return composed, ref64


def _spy(monkeypatch, owner, name, note):
    """Wrap ``owner.name`` for the test; the list it returns gets ``note(*args, **kwargs)`` per call."""
    calls = []
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **kw: calls.append(note(*a, **kw)) or real(*a, **kw))
    return calls


needs_kernel = pytest.mark.skipif(
    fused_norm._library() is None or depthwise._library() is None, reason="no C compiler here: the kernels fall back"
)


@needs_kernel
@pytest.mark.parametrize("k", [1, 2, 3])
def test_lean_expert_on_fused_kernels_equals_the_composed_expert(k, monkeypatch):
    """With moelab's kernels on: same routing, output and every gradient as the composed expert to
    float rounding -- as close to a float64 run as the composed expert on PyTorch's kernels is; and
    the lean expert really ran on the fused norm and depthwise kernels (both depthwise convs, the
    first with the residual's gradient added by the kernel, the second taking its input gradient
    on through the first GELU and the norm's first backward pass), adding its output to grouped
    dispatch's output, reading its output gradient there and adding its input gradient to the
    gather's (k = 3: three experts add to every row)."""

    def results(layer, x, lean):
        y, gx, grads, _ = _step(layer, x, lean)
        return [y, gx, *(grads[n] for n in sorted(grads))]

    layer = _layer(k=k)
    x = torch.randn(6, 16, 12, 12).contiguous(memory_format=torch.channels_last)
    composed, ref64 = _composed_and_float64(results, layer, x)
    calls = _spy(
        monkeypatch, fused_norm, "norm_act_backward",
        lambda *a, **kw: (a[7], kw.get("grad_rows") is not None, kw.get("sums") is not None),
    )
    fwd_calls = _spy(monkeypatch, fused_norm, "norm_act", lambda *a, **kw: (a[5], kw.get("out") is not None))
    dw_calls = _spy(monkeypatch, depthwise, "backward", lambda *a, **kw: (kw.get("add") is not None, kw.get("into") is not None))
    through = _spy(monkeypatch, depthwise, "backward_through_gelu", lambda *a, **kw: 1)
    with kernels.enabled(True):
        fused = results(layer, x, lean=True)
    gelu, tail = fused_norm.NORM_GELU, fused_norm.NORM_ADD_GELU_SCALE
    assert sorted(set(calls)) == [(gelu, False, True), (tail, True, False)]
    assert sorted(set(fwd_calls)) == [(gelu, False), (tail, True)]
    assert set(dw_calls) == {(True, True)} and len(through) == len(dw_calls)  # the second conv: through the GELU
    _no_less_accurate(fused, composed, ref64)


@pytest.mark.parametrize("on", [False, True])
def test_lean_and_composed_calls_in_one_block(on, monkeypatch):
    """A block whose larger expert calls run lean (adding into grouped dispatch's output and, on the
    kernels, into the gather's input gradient) and whose smaller ones run composed (returning their
    output and input gradient): equal to the all-composed block -- to the bit with the kernels off,
    as close to float64 as it with them on."""
    if on and (fused_norm._library() is None or depthwise._library() is None):
        pytest.skip("no C compiler here: the kernels fall back")

    def results(layer, x, lean):
        y, gx, grads, _ = _step(layer, x, lean)
        return [y, gx, *(grads[n] for n in sorted(grads))]

    layer = _layer(e=4, k=2, seed=2)
    x = torch.randn(8, 16, 10, 10).contiguous(memory_format=torch.channels_last)
    composed, ref64 = _composed_and_float64(results, layer, x)
    monkeypatch.setattr(experts_module, "LEAN_MIN_NUMEL", 3 * x[0].numel())  # calls of 3+ samples run lean
    lean_calls = _spy(monkeypatch, experts_module, "lean_ds_expert", lambda *a, **kw: a[0].shape[0])
    composed_calls = _spy(monkeypatch, layer.experts, "_expert", lambda *a, **kw: a[0].shape[0])
    with kernels.enabled(on):
        mixed = results(layer, x, lean=True)
    assert lean_calls and min(lean_calls) >= 3
    assert any(n < 3 for n in composed_calls)  # (the reference runs above counted no calls: spied after)
    if on:
        _no_less_accurate(mixed, composed, ref64)
    else:
        assert all(torch.equal(a, b) for a, b in zip(mixed, composed, strict=True))


@needs_kernel
def test_output_head_on_fused_kernels_equals_composed_ops():
    from moelab.diffusion.activations import gelu
    from moelab.diffusion.lean_backward import norm_act_conv

    norm, conv, h = _head(channels_last=True)
    with kernels.enabled(True):
        assert fused_norm.supports(h, norm.num_groups)
        fused = _head_step(lambda z: norm_act_conv(z, norm, conv), h, norm, conv)[0]
    composed = _head_step(lambda z: conv(gelu(norm(z))), h, norm, conv)[0]
    norm.double(), conv.double()
    ref64 = _head_step(lambda z: conv(gelu(norm(z))), h.double(), norm, conv)[0]
    _no_less_accurate(fused, composed, ref64)


@needs_kernel
def test_lean_upsample_on_the_depthwise_kernel_equals_composed_ops(monkeypatch):
    """The upsampling conv's depthwise gradient on `moelab.diffusion.depthwise`'s kernel: output and
    every gradient as close to a float64 run as the composed ops on PyTorch's kernels are."""

    def results(up, x, lean):
        up.lean_backward = lean
        up.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = up(xi)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        return [y.detach(), xi.grad, *(p.grad.clone() for p in up.parameters())]

    torch.manual_seed(1)
    up = Upsample(16, 32, use_dsconv=True)
    x = torch.randn(3, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    composed, ref64 = _composed_and_float64(results, up, x)
    calls = _spy(monkeypatch, depthwise, "backward", lambda *a, **kw: 1)
    with kernels.enabled(True):
        fused = results(up, x, lean=True)
    assert calls == [1]
    _no_less_accurate(fused, composed, ref64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_spatial_mean_matches_autograd_mean_and_returns_a_broadcast_gradient(dtype, channels_last):
    """The router's pooling: the same values and gradient as ``x.float().mean((2, 3))``, the gradient
    an expanded view (stride 0 over H and W) instead of a materialised full-size tensor."""
    from moelab.diffusion.lean_backward import spatial_mean

    torch.manual_seed(3)
    x = torch.randn(4, 8, 6, 5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(4, 8)
    x0, x1 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y0, y1 = x0.float().mean(dim=(2, 3)), spatial_mean(x1)
    assert torch.equal(y0, y1) and y1.dtype == torch.float32
    (g0,) = torch.autograd.grad(y0, x0, g)
    (g1,) = torch.autograd.grad(y1, x1, g)
    assert torch.equal(g0, g1) and g1.dtype == dtype
    assert g1.stride()[2:] == (0, 0)


def test_model_with_lean_backward_is_bit_identical_to_composed_ops(monkeypatch):
    """The whole MoEFsDiC (lean experts, upsampling convs and output head) against
    ``set_lean_backward(False)``: same prediction, router logits and every parameter gradient."""
    from moelab.diffusion.config import load_config
    from moelab.diffusion.models import build_model, prepare_for_training

    cfg = load_config("default", {"model.model_channels": 16, "model.channel_mults": [1, 2], "model.image_size": 16})
    torch.manual_seed(0)
    model = prepare_for_training(build_model(cfg).train(), cfg.train)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(6, 3, 16, 16, generator=g), torch.randn(6, 3, 16, 16, generator=g)
    t, c = torch.randint(0, 1000, (6,), generator=g), torch.randint(0, 11, (6,), generator=g)
    results = []
    for lean in (False, True):
        model.set_lean_backward(lean)
        model.zero_grad(set_to_none=True)
        pred, logits = model(x, t, c)
        loss = ((pred - noise) * torch.linspace(-1, 1, pred.numel()).view_as(pred)).square().sum()
        (loss + sum(lg.square().mean() for lg in logits)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((pred.detach(), [lg.detach() for lg in logits], grads))
    (p0, l0, g0), (p1, l1, g1) = results
    assert torch.equal(p0, p1) and all(torch.equal(a, b) for a, b in zip(l0, l1, strict=True))
    assert g0.keys() == g1.keys() and "out_norm.weight" in g1 and "ups.0.conv.depthwise.weight" in g1
    assert [n for n in g0 if not torch.equal(g0[n], g1[n])] == []


def test_train_config_switches_lean_backward_off_and_on():
    """``train.lean_backward`` reaches every expert bank and upsampling conv of the model (default
    on); the dense baseline, which has neither, accepts the key."""
    from moelab.diffusion.config import load_config
    from moelab.diffusion.lit import MoEFsDiCLit

    for value in (True, False):
        module = MoEFsDiCLit(load_config("digits", {"train.lean_backward": value}))
        banks = [m for m in module.model.modules() if isinstance(m, (ResidualConvExperts, Upsample))]
        assert len({type(b) for b in banks}) == 2 and all(b.lean_backward is value for b in banks)
        assert module.model.lean_backward is value  # the output head
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


def test_lean_backward_releases_the_block_input():
    """The rows are re-gathered from the block input, which the lean expert saves as an autograd
    saved tensor: released once backward has used it, although the graph itself stays referenced
    (each MoE layer's ``last_routing`` keeps it until the next forward). Held on ``ctx`` instead,
    every MoE block's input stayed alive through the rest of backward and the next step."""
    from torch.multiprocessing.reductions import StorageWeakRef

    layer = _layer()
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    h = x * 1.0
    block_input = StorageWeakRef(h.untyped_storage())
    y = layer(h, router_features=h.mean((2, 3)).detach())
    del h
    assert not block_input.expired()  # kept for backward
    y.sum().backward()
    assert layer.last_routing is not None and layer.last_routing.logits.grad_fn is not None  # graph still referenced
    assert block_input.expired()


@pytest.mark.parametrize("on", [False, True])
def test_inference_runs_the_lean_expert_adding_into_the_output(on, monkeypatch):
    """Without autograd (sampling) grouped dispatch runs the lean expert as well: with the kernels
    on, the fused GroupNorm+GELU forward adding each weighted output into the layer output. Equal
    to the composed experts' inference path (`expert_runner`, weight, row-add) -- to the bit on
    PyTorch's kernels, as close to float64 as it on moelab's -- and the same as the training
    forward's output."""
    if on and (fused_norm._library() is None or depthwise._library() is None):
        pytest.skip("no C compiler here: the kernels fall back")
    from moelab.moe.dispatch import _grouped

    layer = _layer(k=2, seed=3).eval()
    x = torch.randn(6, 16, 12, 12).contiguous(memory_format=torch.channels_last)
    routing = layer.router(x.mean((2, 3)))

    def composed(inp):
        return _grouped(layer.experts.expert_runner(), layer.experts.num_experts, inp, routing)

    with torch.no_grad():
        reference = composed(x)
        layer.experts.double()
        ref64 = composed(x.double())
        layer.experts.float()
        lean_calls = _spy(monkeypatch, experts_module, "lean_ds_expert", lambda *a, **kw: kw.get("into") is not None)
        with kernels.enabled(on):
            got = layer(x, router_features=x.mean((2, 3)))
    assert lean_calls and all(lean_calls)  # every call lean, each adding into the layer output
    assert got.is_contiguous(memory_format=torch.channels_last)
    if on:
        _no_less_accurate([got], [reference], [ref64])
    else:
        assert torch.equal(got, reference)
    with kernels.enabled(on):
        trained = layer(x.clone().requires_grad_(True), router_features=x.mean((2, 3)))
        with torch.inference_mode():  # Lightning's validation and prediction loops
            inferred = layer(x, router_features=x.mean((2, 3)))
    assert torch.equal(trained.detach(), got)  # the training forward gives the same output
    assert torch.equal(inferred, got)
