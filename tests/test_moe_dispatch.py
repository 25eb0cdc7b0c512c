"""Grouped and gathered dispatch equal a naive per-unit loop, in outputs and in gradients."""

import pytest
import torch
from torch import nn

from moelab.diffusion.experts import ResidualConvExperts
from moelab.moe import ExpertBank, MoELayer, Routing, TokenMoE, TopKRouter, dispatch, route

TOL = 1e-5


def _ffn_experts(e: int, d: int = 6) -> nn.ModuleList:
    return nn.ModuleList(nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d)) for _ in range(e))


def _conv_experts(e: int, c: int = 4) -> nn.ModuleList:
    return nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, c, 1)) for _ in range(e))


def _run_expert(experts, e: int, xi: torch.Tensor) -> torch.Tensor:
    if isinstance(experts, ExpertBank):
        return experts.expert_forward(xi, e)
    return experts[e](xi)


def _reference(experts, x, indices, weights):
    """The quick-start's loop: over units, then over each unit's k experts."""
    rows = []
    for n in range(x.shape[0]):
        yn = 0
        for j in range(indices.shape[1]):
            yn = yn + weights[n, j] * _run_expert(experts, int(indices[n, j]), x[n : n + 1])
        rows.append(yn)
    return torch.cat(rows)


def _routing(n: int, e: int, k: int, allowed: list[int] | None = None, seed: int = 0) -> Routing:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, e, generator=g)
    if allowed is not None:  # experts outside `allowed` receive no unit
        mask = torch.full((e,), float("-inf"))
        mask[allowed] = 0
        logits = logits + mask
    r = route(logits, k)
    return Routing(r.logits, r.indices, r.weights.detach().clone().requires_grad_(True))


def _compare(experts, x, routing):
    # float64 so that the comparison measures the algorithm, not float32 summation order
    experts.double()
    x = x.double()
    routing = Routing(routing.logits.double(), routing.indices, routing.weights.detach().double().requires_grad_(True))
    x1 = x.clone().requires_grad_(True)
    y = dispatch(experts, x1, routing)
    g_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x1, routing.weights, *experts.parameters()], g_out, allow_unused=True)
    x2 = x.clone().requires_grad_(True)
    y_ref = _reference(experts, x2, routing.indices, routing.weights)
    grads_ref = torch.autograd.grad(y_ref, [x2, routing.weights, *experts.parameters()], g_out, allow_unused=True)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, atol=TOL, rtol=TOL)
    for a, b in zip(grads, grads_ref, strict=True):
        if a is None or b is None:
            assert (a is None or a.abs().max() == 0) and (b is None or b.abs().max() == 0)
        else:
            torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


CASES = [(1, None), (2, None), (4, None), (2, [0, 2])]  # k = 1, 2, E, and experts with no unit


@pytest.mark.parametrize("k,allowed", CASES)
def test_token_ffn_experts_match_reference(k, allowed):
    torch.manual_seed(1)
    experts = _ffn_experts(4)
    x = torch.randn(2 * 7, 6)  # tokens flattened from [B=2, T=7, D=6]
    _compare(experts, x, _routing(14, 4, k, allowed))


@pytest.mark.parametrize("k,allowed", CASES)
def test_sample_conv_module_experts_match_reference(k, allowed):
    torch.manual_seed(2)
    experts = _conv_experts(4)
    x = torch.randn(6, 4, 8, 8)
    _compare(experts, x, _routing(6, 4, k, allowed, seed=3))


def _bank(dsconv: bool = True, mode: str = "auto") -> ResidualConvExperts:
    torch.manual_seed(3)
    bank = ResidualConvExperts(4, 8, use_dsconv=dsconv, dispatch_mode=mode)
    with torch.no_grad():  # make experts differ in every parameter, norms included
        for p in bank.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return bank


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", ["gathered", "grouped"])
@pytest.mark.parametrize("dsconv", [True, False])
@pytest.mark.parametrize("k,allowed", CASES)
def test_conv_bank_matches_reference(k, allowed, dsconv, mode, channels_last):
    """Both bank paths (per-sample gathered weights; samples grouped by expert), on both memory
    layouts MoEFsDiC uses, equal the per-sample loop in outputs and in every gradient."""
    bank = _bank(dsconv, mode)
    x = torch.randn(5, 8, 8, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _compare(bank, x, _routing(5, 4, k, allowed, seed=4))


def test_auto_dispatch_groups_on_cpu_and_gathers_elsewhere(monkeypatch):
    """The cost model: CPU groups samples by expert; any other device stays on the gathered path,
    which never reads routing results back to the host."""
    bank = _bank()
    r = _routing(5, 4, 2, seed=4)
    x = torch.randn(5, 8, 8, 8)
    assert bank.prefers_grouped(x, r)
    assert not bank.prefers_grouped(torch.empty(5, 8, 8, 8, device="meta"), r)
    calls = []
    monkeypatch.setattr(ResidualConvExperts, "forward_gathered", lambda self, z, idx: calls.append("gathered") or z)
    monkeypatch.setattr(ResidualConvExperts, "expert_runner", lambda self: lambda e, z: calls.append("grouped") or z)
    monkeypatch.setattr(ResidualConvExperts, "weighted_runner", lambda self: lambda e, z, w, rg, into: calls.append("grouped") or z)
    for grad in (True, False):  # training (weighted runner) and sampling (plain runner)
        with torch.set_grad_enabled(grad):
            dispatch(bank, x, r)
        assert set(calls) == {"grouped"} and len(calls) == len(set(r.indices.flatten().tolist()))
        calls.clear()
    bank.dispatch_mode = "gathered"
    dispatch(bank, x, r)
    assert calls == ["gathered", "gathered"]  # one call per routing slot


def test_bad_dispatch_mode_is_refused():
    with pytest.raises(ValueError, match="dispatch_mode"):
        ResidualConvExperts(4, 8, dispatch_mode="sorted")


def test_grouped_dispatch_keeps_channels_last():
    bank = _bank(mode="grouped")
    x = torch.randn(6, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    y = dispatch(bank, x, _routing(6, 4, 2, seed=1))
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


def test_unselected_experts_get_exactly_zero_gradient():
    torch.manual_seed(4)
    bank = ResidualConvExperts(4, 8)
    layer = MoELayer(TopKRouter(8, 4, 1), bank)
    x = torch.randn(6, 8, 8, 8)
    with torch.no_grad():
        layer.router.net.bias.copy_(torch.tensor([5.0, -5.0, 5.0, -5.0]))
        layer.router.net.weight.zero_()
        layer.router.net.weight[0].fill_(1.0)  # positive pooled features prefer 0, negative prefer 2
    feats = torch.cat([torch.ones(3, 8), -torch.ones(3, 8)])
    layer(x, feats).sum().backward()
    used = set(layer.last_routing.indices.flatten().tolist())
    assert used == {0, 2}
    for name, p in bank.named_parameters():
        per_expert = p.grad.reshape(4, -1).abs().sum(1)
        for e in range(4):
            assert (per_expert[e] > 0) == (e in used), (name, e)


def test_token_moe_layer_shapes_and_units():
    torch.manual_seed(5)
    layer = TokenMoE(TopKRouter(6, 4, 2), _ffn_experts(4))
    x = torch.randn(3, 5, 6)
    y = layer(x)
    assert y.shape == x.shape
    assert layer.last_routing.indices.shape == (15, 2)  # one routing decision per token
    flat = dispatch(layer.experts, x.reshape(15, 6), layer.last_routing).reshape(3, 5, 6)
    torch.testing.assert_close(y, flat)


def test_grouped_dispatch_runs_each_expert_once():
    calls = []

    class Counting(nn.Module):
        def __init__(self, e):
            super().__init__()
            self.e, self.lin = e, nn.Linear(3, 3)

        def forward(self, x):
            calls.append((self.e, x.shape[0]))
            return self.lin(x)

    experts = nn.ModuleList(Counting(e) for e in range(4))
    r = _routing(10, 4, 2, allowed=[0, 1, 3])
    dispatch(experts, torch.randn(10, 3), r)
    counts = torch.bincount(r.indices.flatten(), minlength=4).tolist()
    assert sorted(calls) == sorted((e, c) for e, c in enumerate(counts) if c > 0)
    assert 2 not in [e for e, _ in calls]


@pytest.mark.parametrize("mode", ["grouped", "gathered"])
def test_gradient_checkpointing_gives_same_gradients(mode):
    """Per-expert-call recompute: same output, same input and parameter gradients, in both dispatches."""
    torch.manual_seed(6)
    experts = ResidualConvExperts(4, 8)
    experts.dispatch_mode = mode
    layer = MoELayer(TopKRouter(8, 4, 2), experts)
    x = torch.randn(4, 8, 8, 8, requires_grad=True)
    results, saved = [], []
    for recompute in (False, True):
        layer.zero_grad()
        x.grad = None
        layer.gradient_checkpointing = recompute
        kept = [0]

        def pack(t, kept=kept):
            kept[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x, x.mean((2, 3)))
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in layer.parameters()]))
        saved.append(kept[0])
    (y0, gx0, g0), (y1, gx1, g1) = results
    assert saved[1] * 3 < saved[0], f"recompute should keep no expert activations for backward: {saved}"
    torch.testing.assert_close(y0, y1)
    torch.testing.assert_close(gx0, gx1)
    assert len(g0) == len(g1)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b)



def test_grouped_gather_backward_adds_parts_without_concatenating():
    """`_GatherRows` (grouped dispatch's gather under autograd) equals ``index_select`` + ``split``
    in values and, to the bit, in the input gradient, and its backward concatenates nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from moelab.moe.dispatch import _GatherRows

    torch.manual_seed(7)
    x = torch.randn(5, 3, 4)
    index = torch.tensor([0, 3, 3, 1, 4, 0, 2, 4, 1, 2])
    counts = [3, 0, 4, 3]  # an expert with no rows
    grads = [torch.randn(n, 3, 4) for n in counts]
    x0 = x.clone().requires_grad_(True)
    parts0 = x0.index_select(0, index).split(counts)
    x1 = x.clone().requires_grad_(True)
    parts1 = _GatherRows.apply(x1, None, *index.split(counts))
    assert all(torch.equal(a, b) for a, b in zip(parts0, parts1, strict=True))
    (g0,) = torch.autograd.grad(parts0, x0, grads)

    class Ops(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        (g1,) = torch.autograd.grad(parts1, x1, grads)
    assert torch.equal(g0, g1)
    assert torch.ops.aten.cat.default not in ops.seen and torch.ops.aten.index_add_.default in ops.seen


def test_regather_returns_the_rows_and_refuses_a_changed_input():
    """`Regather` re-selects an expert's rows from the layer input (channels-last rows stay
    channels-last) and refuses to do so once that input was modified in place."""
    from moelab.moe.dispatch import Regather, _units_last

    x = torch.randn(5, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    xv, back = _units_last(x)
    idx = torch.tensor([3, 0, 4])
    rows = Regather(xv, idx, back)()
    assert torch.equal(rows, x.index_select(0, idx))
    assert rows.is_contiguous(memory_format=torch.channels_last)
    regather = Regather(xv, idx, back)
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        regather()


def test_grouped_gather_backward_adds_to_what_the_calls_added_to_its_sink():
    """A part whose expert call added its gradient to the `GatherGrad` sink itself gets None from
    autograd; the gather's backward adds the other parts to the sink's buffer (and takes it: nothing
    is left on the sink), so the input gradient is the same as with every part returned."""
    from moelab.moe.dispatch import GatherGrad, _GatherRows

    torch.manual_seed(3)
    x = torch.randn(5, 3, 4)
    index = torch.tensor([0, 3, 3, 1, 4, 0, 2, 4, 1, 2])
    counts = [3, 3, 4]
    parts_idx = index.split(counts)
    grads = [torch.randn(n, 3, 4) for n in counts]
    x0 = x.clone().requires_grad_(True)
    (g0,) = torch.autograd.grad(x0.index_select(0, index).split(counts), x0, grads)

    class AddsToSink(torch.autograd.Function):  # what the lean expert does with its rows' gradient
        @staticmethod
        def forward(ctx, rows, idx, g, sink):
            ctx.idx, ctx.g, ctx.sink = idx, g, sink
            return rows.clone()

        @staticmethod
        def backward(ctx, grad):
            ctx.sink.buffer().index_add_(0, ctx.idx, ctx.g)
            return None, None, None, None

    x1 = x.clone().requires_grad_(True)
    sink = GatherGrad(x1)
    parts = _GatherRows.apply(x1, sink, *parts_idx)
    outs = [AddsToSink.apply(parts[0], parts_idx[0], grads[0], sink), parts[1], AddsToSink.apply(parts[2], parts_idx[2], grads[2], sink)]
    (g1,) = torch.autograd.grad(outs, x1, [grads[0], grads[1], grads[2]])
    torch.testing.assert_close(g1, g0, rtol=0, atol=1e-6)
    assert sink.grad is None


def test_grouped_dispatch_under_autocast_keeps_the_experts_output_dtype():
    """Under CPU autocast the experts run composed (not lean): grouped dispatch sums their outputs
    in the experts' dtype, as gathered dispatch does (the layer output is made from the first
    output, not from the input), and back-propagates."""
    torch.manual_seed(4)
    layer = MoELayer(TopKRouter(16, 4, 2), ResidualConvExperts(4, 16))
    x = torch.randn(6, 16, 8, 8).contiguous(memory_format=torch.channels_last).bfloat16().requires_grad_(True)
    outs = {}
    for mode in ("grouped", "gathered"):
        layer.experts.dispatch_mode = mode
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[mode] = layer(x, router_features=x.float().mean((2, 3)))
    assert outs["grouped"].dtype == outs["gathered"].dtype
    torch.testing.assert_close(outs["grouped"].float(), outs["gathered"].float(), rtol=2e-2, atol=2e-2)
    outs["grouped"].float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
