"""The core MoE layer's optional shared (always-on) expert: exact output and parameter figures."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moelab.moe import MoELayer, TokenMoE
from moelab.moe.router import TopKRouter


def _dense(d: int = 8, h: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d))


def test_upcycled_with_shared_expert_equals_the_dense_module_and_holds_one_more_copy():
    dense = _dense()
    x = torch.randn(5, 7, 8)
    plain = TokenMoE.upcycle(dense, num_experts=4, k=2, router_in_features=8)
    shared = TokenMoE.upcycle(dense, num_experts=4, k=2, router_in_features=8, shared_expert=True)
    n_dense = sum(p.numel() for p in dense.parameters())
    n_plain = sum(p.numel() for p in plain.parameters())
    assert sum(p.numel() for p in shared.parameters()) == n_plain + n_dense
    assert plain.shared_expert is None and plain.shared_weight == 0.0
    assert isinstance(shared.shared_expert, nn.Sequential) and shared.shared_weight == 0.5
    with torch.no_grad():
        ref = dense(x)
        torch.testing.assert_close(shared(x), ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(plain(x), ref, rtol=0, atol=1e-6)
    # the shared expert is an independent copy, in the state dict under its own name
    assert {k.split(".")[0] for k in shared.state_dict()} == {"router", "experts", "shared_expert"}
    assert shared.shared_expert is not dense and shared.shared_expert[0].weight.data_ptr() != dense[0].weight.data_ptr()


def test_shared_expert_output_is_the_weighted_sum_and_every_unit_trains_it():
    torch.manual_seed(1)
    experts = nn.ModuleList(_dense() for _ in range(3))
    for i, e in enumerate(experts):  # distinct experts
        with torch.no_grad():
            e[2].bias.add_(float(i))
    shared = _dense()
    router = TopKRouter(8, 3, 1)
    layer = MoELayer(router, experts, shared_expert=shared, shared_weight=0.25)
    routed_only = MoELayer(copy.deepcopy(router), copy.deepcopy(experts))
    x = torch.randn(11, 8)
    y = layer(x)
    with torch.no_grad():
        expected = 0.25 * shared(x) + 0.75 * routed_only(x)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in shared.parameters())


def test_no_shared_expert_keeps_the_layer_as_before():
    dense = _dense()
    torch.manual_seed(3)
    a = TokenMoE.upcycle(dense, 4, 2, router_in_features=8)
    torch.manual_seed(3)
    b = TokenMoE.upcycle(dense, 4, 2, router_in_features=8, shared_expert=False)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    x = torch.randn(4, 8)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("w", [0.0, 1.0, -0.5, True, "half"])
def test_bad_shared_weight_is_refused(w):
    with pytest.raises(ValueError, match="shared_weight must be a number in \\(0, 1\\)"):
        MoELayer(TopKRouter(8, 2, 1), nn.ModuleList([_dense(), _dense()]), shared_expert=_dense(), shared_weight=w)
