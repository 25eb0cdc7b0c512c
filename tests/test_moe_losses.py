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
