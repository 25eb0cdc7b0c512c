import pytest
import torch

from moelab.moe import TopKRouter, route


def test_topk_softmax_weights_are_softmax_of_selected_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    r = route(logits, 2)
    assert r.indices.tolist() == [[1, 2]]
    torch.testing.assert_close(r.weights, torch.softmax(torch.tensor([[3.0, 2.0]]), -1))


def test_softmax_topk_renormalises_full_softmax():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    p = torch.softmax(logits, -1)
    r = route(logits, 2, "softmax_topk")
    torch.testing.assert_close(r.weights, p[:, [1, 2]] / p[:, [1, 2]].sum())
    # both gates give the same weights for k = E? no: they agree only in sum; check sums
    assert torch.allclose(route(logits, 4, "softmax_topk").weights.sum(-1), torch.ones(1))


def test_router_hidden_mlp_and_jitter_only_in_training():
    torch.manual_seed(0)
    r = TopKRouter(5, 4, 2, hidden=8, jitter=0.5)
    x = torch.randn(7, 5)
    r.eval()
    a, b = r(x), r(x)
    assert torch.equal(a.logits, b.logits)  # deterministic in eval
    r.train()
    assert not torch.equal(r(x).logits, r(x).logits)  # jitter noise in training
    assert a.logits.shape == (7, 4) and a.indices.shape == (7, 2)


@pytest.mark.parametrize("k", [0, 5])
def test_router_rejects_bad_k(k):
    with pytest.raises(ValueError, match="between 1 and num_experts"):
        TopKRouter(5, 4, k)


@pytest.mark.parametrize("gate", ["topk_softmax", "softmax_topk"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_router_gets_task_gradient_at_every_k(gate, k):
    """The task loss alone (no load loss) must reach the router for every gate and every k, k = 1 included."""
    from torch import nn

    from moelab.moe import MoELayer

    torch.manual_seed(0)
    experts = nn.ModuleList(nn.Linear(6, 3) for _ in range(4))
    layer = MoELayer(TopKRouter(6, 4, k, gate=gate), experts)
    x = torch.randn(16, 6)
    layer(x).pow(2).mean().backward()
    g = layer.router.net.weight.grad
    assert g is not None and g.abs().sum() > 1e-4


def test_k1_gates_switch_probability_and_unit_straight_through():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, -1.0, 0.0, 2.0]], requires_grad=True)
    p = torch.softmax(logits.detach(), -1)
    sw = route(logits, 1, "softmax_topk")
    assert sw.indices.tolist() == [[1], [3]]
    torch.testing.assert_close(sw.weights, p.gather(-1, sw.indices))  # Switch: un-renormalised p
    st = route(logits, 1, "topk_softmax")
    assert torch.equal(st.weights, torch.ones(2, 1))  # exactly 1 forward: upcycled layers stay dense
    (st.weights * torch.tensor([[2.0], [-1.0]])).sum().backward()
    # backward of p / stop_grad(p) is d log p: for row 0, c * (onehot(1) - p)
    expected = torch.stack([2.0 * (torch.eye(4)[1] - p[0]), -1.0 * (torch.eye(4)[3] - p[1])])
    torch.testing.assert_close(logits.grad, expected)


def test_k1_router_learns_input_dependent_expert_from_task_loss_alone():
    """Four clusters, four fixed experts; expert c is the right one for cluster c (its output is
    the cluster's target). A k=1 layer trained with the task loss only (lambda_load = 0) must learn
    to route each cluster to its expert: routing accuracy ~1 vs chance 0.25."""
    from torch import nn

    from moelab.moe import MoELayer

    e, d = 4, 8
    g = torch.Generator().manual_seed(0)
    centres = 3.0 * torch.randn(e, d, generator=g)
    experts = nn.ModuleList()
    for i in range(e):
        lin = nn.Linear(d, e)
        nn.init.zeros_(lin.weight)
        with torch.no_grad():
            lin.bias.copy_(torch.eye(e)[i])
        lin.requires_grad_(False)
        experts.append(lin)

    def batch(n):
        c = torch.randint(0, e, (n,), generator=g)
        return centres[c] + torch.randn(n, d, generator=g), c

    for gate in ("topk_softmax", "softmax_topk"):
        torch.manual_seed(1)
        layer = MoELayer(TopKRouter(d, e, 1, gate=gate), experts)
        x_test, c_test = batch(512)
        with torch.no_grad():
            before = (layer.router(x_test).indices[:, 0] == c_test).float().mean().item()
        opt = torch.optim.Adam(layer.router.parameters(), lr=0.05)
        for _ in range(50):  # >= 0.99 after 40 steps on four data/init seeds tried
            x, c = batch(64)
            loss = (layer(x) - torch.eye(e)[c]).pow(2).sum(-1).mean()  # task loss only
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            after = (layer.router(x_test).indices[:, 0] == c_test).float().mean().item()
        assert after >= 0.95, (gate, before, after)
        assert after - before >= 0.4, (gate, before, after)
