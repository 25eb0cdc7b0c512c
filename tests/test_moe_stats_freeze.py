import copy

import pytest
import torch
from torch import nn

from moelab.moe import (
    ExpertUsage,
    MoELayer,
    TokenMoE,
    TopKRouter,
    freeze_non_moe,
    model_aux_loss,
    moe_usage,
    reset_moe_stats,
    router_logits,
    trainable_report,
)
from moelab.moe.stats import routing_mutual_information


def test_usage_counts_exact_and_accumulate_until_reset():
    u = ExpertUsage(4)
    u.update(torch.tensor([[0, 1], [0, 3], [0, 1]]))
    u.update(torch.tensor([[2, 0]]))
    assert u.counts.tolist() == [4, 2, 1, 1]
    s = u.summary()
    assert s["total"] == 8 and s["max_share"] == 0.5 and s["min_share"] == 0.125
    f = torch.tensor([0.5, 0.25, 0.125, 0.125])
    assert abs(s["entropy"] - float(-(f * f.log()).sum() / torch.log(torch.tensor(4.0)))) < 1e-9
    u.reset()
    assert u.total == 0 and u.counts.tolist() == [0, 0, 0, 0]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 6)
        ffn = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6))
        self.moe = TokenMoE.upcycle(ffn, num_experts=3, k=2, router_in_features=6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.moe(self.inp(x)))


def test_layer_stats_through_model_and_reset():
    m = Tiny()
    m(torch.randn(2, 5, 6))
    m(torch.randn(1, 5, 6))
    usage = moe_usage(m)
    assert list(usage) == ["moe"] and usage["moe"]["total"] == (2 * 5 + 5) * 2
    assert len(router_logits(m)) == 1 and router_logits(m)[0].shape == (5, 3)
    assert model_aux_loss(m).item() > 0
    reset_moe_stats(m)
    assert moe_usage(m)["moe"]["total"] == 0


def test_freeze_non_moe_counts_exact():
    m = Tiny()
    rep = freeze_non_moe(m)
    expert = 6 * 12 + 12 + 12 * 6 + 6
    router = 6 * 3 + 3
    assert rep.trainable == 3 * expert + router
    assert rep.tensors == 3 * 4 + 2
    assert rep.total == sum(p.numel() for p in m.parameters())
    assert all(not p.requires_grad for p in m.inp.parameters())
    assert trainable_report(m) == rep
    assert "frozen" in str(rep)


def test_upcycled_layer_equals_dense():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6))
    for k in (1, 2, 4):
        layer = TokenMoE.upcycle(copy.deepcopy(dense), num_experts=4, k=k, router_in_features=6)
        x = torch.randn(3, 7, 6)
        torch.testing.assert_close(layer(x), dense(x), atol=1e-6, rtol=0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    layer = MoELayer.upcycle(conv, num_experts=3, k=2, router_in_features=4)
    x = torch.randn(5, 4, 6, 6)
    torch.testing.assert_close(layer(x, x.mean((2, 3))), conv(x), atol=1e-6, rtol=0)


def _routed(layer: MoELayer, expert: int, n: int = 10) -> None:
    layer.usage.update(torch.full((n, 1), expert))


def test_collapse_monitor_warns_after_patience_and_keeps_counters():
    import warnings

    from moelab.moe.callbacks import ExpertCollapseWarning, ExpertUsageMonitor

    m = Tiny()
    mon = ExpertUsageMonitor(interval=1, max_share=0.8, patience=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _routed(m.moe, 0)
        _routed(m.moe, 1, 5)
        assert mon.check(m)["moe/moe/max_share"] == 10 / 15  # balanced enough: no strike
        _routed(m.moe, 2)
        assert mon.check(m)["moe/moe/max_share"] == 1.0  # only this interval's routing counts
        assert not caught
        _routed(m.moe, 2)
        mon.check(m)
    assert len(caught) == 1 and issubclass(caught[0].category, ExpertCollapseWarning)
    assert "MoE block 'moe'" in str(caught[0].message) and "raise the load-loss coefficient" in str(caught[0].message)
    assert m.moe.usage.counts.tolist() == [10, 5, 20]  # the monitor never resets the layer's counters
    reset_moe_stats(m)
    _routed(m.moe, 1)
    assert mon.check(m)["moe/moe/max_share"] == 1.0 and mon.strikes["moe"] == 3


def test_usage_counts_are_not_buffers_and_follow_the_routing_device():
    """Counts are per-process truths: a buffer would be broadcast from rank 0 by DDP."""
    m = Tiny()
    assert not any("counts" in n for n, _ in m.named_buffers())
    assert "moe.usage.counts" not in m.state_dict()
    m(torch.randn(2, 5, 6))
    assert m.moe.usage.global_counts() is m.moe.usage.counts  # not distributed: the counts themselves


def test_idle_experts_get_an_exact_zero_gradient_and_outputs_are_unchanged():
    """Every expert parameter is in every backward (DDP with find_unused_parameters=False)."""
    torch.manual_seed(0)
    experts = nn.ModuleList(nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6)) for _ in range(4))
    router = TopKRouter(6, 4, 1)
    with torch.no_grad():
        router.net.weight.zero_()
        router.net.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))  # every unit goes to expert 0
    layer = MoELayer(router, experts)
    x = torch.randn(9, 6)
    y = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(y, experts[0](x), atol=0, rtol=0)
    y.sum().backward()
    assert experts[0][0].weight.grad.abs().sum() > 0
    for e in (1, 2, 3):
        for p in experts[e].parameters():
            assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


def test_core_imports_without_lightning():
    """`import moelab.moe` needs only PyTorch; the Lightning callback lives in moelab.moe.callbacks."""
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    code = "import sys, moelab.moe; bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]; assert not bad, bad"
    r = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "PYTHONPATH": src}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_mutual_information_extremes():
    assert routing_mutual_information(torch.eye(4) * 5) == pytest.approx(1.0)
    assert routing_mutual_information(torch.ones(3, 4)) == pytest.approx(0.0, abs=1e-12)
