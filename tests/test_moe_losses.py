import math

import pytest
import torch

from moelab.moe import aux_loss, switch_loss, variance_loss, z_loss


def test_switch_loss_perfectly_balanced_is_one():
    e = 4
    logits = 10 * torch.eye(e).repeat(3, 1)  # each expert first choice of exactly 3 units
    assert switch_loss(logits, 1).item() == pytest.approx(1.0, abs=1e-6)


def test_switch_loss_all_units_on_one_expert_is_e():
    e = 8
    logits = torch.zeros(16, e)
    logits[:, 3] = 1e4
    assert switch_loss(logits, 1).item() == pytest.approx(e, abs=1e-6)


def test_switch_loss_hand_computed():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.1, 0.3]]))
    # k=1: both units on expert 0 -> f = [1, 0, 0]; P_0 = (0.7 + 0.6)/2 = 0.65 -> 3 * 0.65
    assert switch_loss(logits, 1).item() == pytest.approx(3 * 0.65, abs=1e-6)
    # k=2: assignments {0,1},{0,2} -> f = [0.5, 0.25, 0.25]; P = [0.65, 0.15, 0.2]
    expected = 3 * (0.5 * 0.65 + 0.25 * 0.15 + 0.25 * 0.2)
    assert switch_loss(logits, 2).item() == pytest.approx(expected, abs=1e-6)


def test_variance_loss_uniform_zero_and_one_hot():
    e = 4
    assert variance_loss(torch.zeros(5, e)).item() == pytest.approx(0.0, abs=1e-7)
    one_hot = torch.full((5, e), -1e4)
    one_hot[:, 1] = 0
    assert variance_loss(one_hot).item() == pytest.approx((e - 1) / e**2, abs=1e-6)


def test_z_loss_hand_computed():
    logits = torch.zeros(3, 4)
    assert z_loss(logits).item() == pytest.approx(math.log(4) ** 2, abs=1e-6)


def test_aux_loss_averages_layers_and_adds_z():
    a = 10 * torch.eye(4)
    b = torch.zeros(4, 4)
    b[:, 0] = 1e4
    assert aux_loss([a, b], 1).item() == pytest.approx((1 + 4) / 2, abs=1e-5)
    z = (z_loss(a) + z_loss(b)) / 2
    assert aux_loss([a, b], 1, z_coef=0.1).item() == pytest.approx(2.5 + 0.1 * z.item(), rel=1e-5)
    assert aux_loss([], 2).item() == 0.0
    with pytest.raises(ValueError, match="unknown load-loss kind"):
        aux_loss([a], 1, kind="nope")  # type: ignore[arg-type]


def test_losses_have_gradients_towards_balance():
    logits = torch.zeros(8, 4)
    logits[:, 0] = 3.0
    logits.requires_grad_(True)
    switch_loss(logits, 1).backward()
    assert logits.grad[:, 0].gt(0).all()  # descending lowers the over-used expert's logit


def _reference_switch(logits, indices):
    """E * sum_i f_i P_i written out from the definition, f_i over the given (unit, slot) choices."""
    n, e = logits.shape
    p = logits.double().softmax(-1).mean(0)
    f = torch.zeros(e, dtype=torch.float64)
    for row in indices.tolist():
        for i in row:
            f[i] += 1.0 / indices.numel()
    return e * float((f * p).sum())


@pytest.mark.parametrize("k", [1, 2, 4])
def test_moe_loss_and_model_aux_loss_use_each_layers_recorded_routing(k):
    """MoELoss, told nothing about k, equals the Switch loss over the indices each layer recorded,
    exactly, for any k; so does model_aux_loss; with jitter the recorded (not re-derived) choice counts."""
    from torch import nn

    from moelab import MoELoss
    from moelab.moe import MoELayer, TopKRouter, model_aux_loss

    torch.manual_seed(k)
    layers = nn.ModuleList(
        MoELayer(TopKRouter(6, 8, k, jitter=0.5), nn.ModuleList(nn.Linear(6, 6) for _ in range(8))) for _ in range(2)
    ).train()
    x = torch.randn(32, 6)
    h = x
    for layer in layers:
        h = layer(h)
    routings = [layer.last_routing for layer in layers]
    logits = [r.logits for r in routings]
    want = torch.stack([switch_loss(r.logits, indices=r.indices) for r in routings]).mean()
    _, _, load = MoELoss(lambda_load=0.01)(h, torch.zeros_like(h), logits)
    assert torch.equal(load, want)
    assert torch.equal(model_aux_loss(layers), want)
    for r in routings:
        assert switch_loss(r.logits, indices=r.indices).item() == pytest.approx(_reference_switch(r.logits.detach(), r.indices), abs=1e-6)
    # a wrong k_active no longer matters for a model's logits; a stated k serves only unrecorded logits
    assert torch.equal(MoELoss(k_active=2)(h, torch.zeros_like(h), logits)[2], want)


def test_moe_loss_exact_for_moefsdic_config_with_k4():
    """moe_variants-like MoEFsDiC (16 experts, k = 4): the quick-start call equals the recorded Switch loss."""
    from moelab import MoEFsDiC_UNet, MoELoss

    cfg = {"model": {"model_channels": 8, "channel_mults": [1, 2], "image_size": 16, "in_channels": 1, "num_classes": 3},
           "moe": {"num_experts": 16, "k_active": 4}}
    torch.manual_seed(0)
    model = MoEFsDiC_UNet(cfg)
    x = torch.randn(4, 1, 16, 16)
    pred, moe_logits = model(x, torch.randint(0, 1000, (4,)), torch.randint(0, 3, (4,)))
    routings = [m.last_routing for m in model.modules() if getattr(m, "last_routing", None) is not None]
    assert routings and all(r.k == 4 for r in routings)
    want = torch.stack([switch_loss(r.logits, indices=r.indices) for r in routings]).mean()
    _, _, load = MoELoss(lambda_load=0.01)(pred, x, moe_logits)
    assert torch.equal(load, want)
    assert not torch.equal(load, aux_loss([lg.detach() for lg in moe_logits], 2))  # the old k = 2 assumption differs


def test_unrecorded_logits_need_k():
    from moelab.errors import ConfigError

    with pytest.raises(ConfigError, match="pass k"):
        switch_loss(torch.randn(4, 3))
