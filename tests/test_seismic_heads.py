"""Head health (`moelab.seismic.heads`) and dormant-channel recycling (`moelab.seismic.dormant`):
exact properties on a small EQTransformer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from seisbench.models import EQTransformer

from moelab.errors import ConfigError
from moelab.seismic.dormant import channel_activity, recycle_dormant
from moelab.seismic.heads import decoder_chains, event_windows, head_health, health_stats, healths_from_stats

N = 2001


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return EQTransformer(in_samples=N).eval()


def _x(seed: int = 0, n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, N, generator=g)


def _cap_p_head(model: EQTransformer, bias: float = 0.3) -> None:
    """Every channel of the P head's output convolution lowers the logit: the head is capped at sigmoid(bias)."""
    with torch.no_grad():
        conv = model.pick_convs[0]
        conv.weight.copy_(-conv.weight.abs())
        conv.bias.fill_(bias)


def test_head_health_counts_live_channels_and_caps_a_head_without_lifting_channels(model):
    _cap_p_head(model, bias=0.3)
    x = _x()
    acts = {}
    hooks = [d.register_forward_hook(lambda _m, _i, o, k=k: acts.__setitem__(k, o)) for k, d in enumerate([model.decoder_d, *model.pick_decoders])]
    with torch.no_grad():
        det, p, s = model(x)
    for h in hooks:
        h.remove()
    report = {h.head: h for h in head_health(model, x)}
    assert list(report) == ["detection", "P", "S"]
    for k, (name, prob) in enumerate(zip(report, (det, p, s), strict=True)):
        assert report[name].channels == 8
        assert report[name].live == int((acts[k].amax(dim=(0, 2)) > 0).sum())
        assert report[name].peak == pytest.approx(float(prob.max()))
        assert report[name].peak <= report[name].ceiling + 1e-6
    assert report["P"].lifting == 0
    assert report["P"].ceiling == pytest.approx(1 / (1 + math.exp(-0.3)))
    assert "P head:" in report["P"].format() and "0 of them lifting" in report["P"].format()


def test_health_round_trips_through_result_columns_and_a_capped_head_says_so(model):
    _cap_p_head(model, bias=0.3)
    report = head_health(model, _x())
    stats = health_stats(report)
    assert set(stats) == {f"{h}_{f}" for h in ("detection", "P", "S") for f in ("channels", "live", "lifting", "ceiling", "peak")}
    assert healths_from_stats(stats) == report  # exact: every field survives as a float column
    assert healths_from_stats({k: v for k, v in stats.items() if not k.startswith("S_")}) == report[:2]
    assert healths_from_stats({**stats, "P_peak": float("nan")}) == [report[0], report[2]]
    assert all(h.capped == (h.lifting == 0) for h in report)
    p = report[1]
    assert p.capped and f"cannot output more than {p.ceiling:.2f}" in p.warning() and "head_prior" in p.warning()


def test_head_health_ceiling_adds_each_lifting_channel_at_its_largest_activation(model):
    _cap_p_head(model, bias=-1.0)
    x = _x()
    with torch.no_grad():
        h = model.pick_decoders[0](model.pick_attentions[0](model.dropout(model.pick_lstms[0](
            model.transformer_d(model.transformer_d0(model.bi_lstm_stack(model.res_cnn_stack(model.encoder(x))))[0])[0].permute(2, 0, 1)
        )[0]).permute(1, 2, 0))[0])
        top = h.amax(dim=(0, 2))
        live = int(top.argmax())
        model.pick_convs[0].weight[0, live] = 0.01  # one live channel raises the logit: kernel sum 0.11
    report = {r.head: r for r in head_health(model, x)}
    assert report["P"].lifting == 1
    assert report["P"].ceiling == pytest.approx(1 / (1 + math.exp(-(-1.0 + 0.11 * float(top[live])))), rel=1e-5)


def test_recycling_resets_only_dormant_channels_and_leaves_the_output_unchanged(model):
    x = _x()
    dec = model.pick_decoders[0].convs[-1]
    with torch.no_grad():  # kill channels 0 and 5 of the P head's last decoder layer
        dec.weight[[0, 5]] = 0.0
        dec.bias[[0, 5]] = -1.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out0 = model(x)
    activity = channel_activity(model, x)
    assert activity[("P", 6)][[0, 5]].tolist() == [0.0, 0.0]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    sum(o.sum() for o in model(x)).backward()
    opt.step()
    model.load_state_dict(before)  # same weights, Adam moments filled
    counts = recycle_dormant(model, x, tau=0.0, generator=torch.Generator().manual_seed(3), optimizer=opt)
    assert counts["P"] >= 2
    model.eval()
    with torch.no_grad():
        out1 = model(x)
    for a, b in zip(out0, out1, strict=True):  # ReDo's invariant: zeroed outgoing weights, the same function
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    reader = model.pick_convs[0]
    assert torch.equal(reader.weight[:, [0, 5]], torch.zeros_like(reader.weight[:, [0, 5]]))
    assert not torch.equal(dec.weight[[0, 5]], before["pick_decoders.0.convs.6.weight"][[0, 5]])
    state = opt.state[reader.weight]
    assert float(state["exp_avg"][:, [0, 5]].abs().sum()) == 0.0 and float(state["exp_avg_sq"][:, [0, 5]].abs().sum()) == 0.0
    # a channel that was not dormant keeps its incoming weights, but for those from recycled channels of the layer below
    keep = (activity[("P", 6)] > 0).nonzero().flatten()
    inputs = (activity[("P", 5)] > 0).nonzero().flatten()
    assert torch.equal(dec.bias[keep], before["pick_decoders.0.convs.6.bias"][keep])
    assert torch.equal(dec.weight[keep][:, inputs], before["pick_decoders.0.convs.6.weight"][keep][:, inputs])


def test_recycling_is_a_function_of_the_generator_and_skips_frozen_layers(model):
    x = _x()
    a, b = EQTransformer(in_samples=N).eval(), EQTransformer(in_samples=N).eval()
    a.load_state_dict(model.state_dict())
    b.load_state_dict(model.state_dict())
    ca = recycle_dormant(a, x, generator=torch.Generator().manual_seed(7))
    cb = recycle_dormant(b, x, generator=torch.Generator().manual_seed(7))
    assert ca == cb and sum(ca.values()) > 0  # PyTorch's init leaves channels off everywhere
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    frozen = EQTransformer(in_samples=N).eval()
    frozen.load_state_dict(model.state_dict())
    for p in frozen.parameters():
        p.requires_grad_(False)
    assert sum(recycle_dormant(frozen, x).values()) == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.state_dict().items())
    assert [name for name, _ in decoder_chains(model)] == ["detection", "P", "S"]


def test_recycling_leaves_a_seismoe_routing_count_as_it_was():
    from moelab.seismic.model import SeisMoE

    torch.manual_seed(0)
    seis = SeisMoE(num_experts=4, num_experts_per_token=2, in_samples=N)
    seis(_x(1))  # some routing counted
    before = {n: m.usage.counts.clone() for n, m in seis.named_modules() if hasattr(m, "usage")}
    assert before and recycle_dormant(seis, _x(2), generator=torch.Generator().manual_seed(0))
    for n, m in seis.named_modules():
        if hasattr(m, "usage"):
            assert torch.equal(m.usage.counts, before[n]), n


def test_looking_at_the_channels_puts_every_module_back_in_its_own_mode(model):
    """A frozen trunk keeps its BatchNorm layers in eval mode while the rest trains; the look must not
    put them back in training mode (their running statistics would drift)."""
    model.train()
    frozen_bn = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert frozen_bn
    for m in frozen_bn:
        m.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    channel_activity(model, _x())
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_recycling_sums_activity_over_ranks_before_judging(model):
    x = _x()
    dec = model.pick_decoders[0].convs[-1]
    with torch.no_grad():
        dec.weight[2] = 0.0
        dec.bias[2] = -1.0
    # another rank saw channel 2 fire: summed, it is not dormant here either
    other = {k: v.clone() for k, v in channel_activity(model, x).items()}
    other[("P", 6)][2] = 1.0

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        return t + torch.cat(list(other.values()))

    before = dec.weight[2].clone()
    recycle_dormant(model, x, tau=0.0, all_reduce=all_reduce)
    assert torch.equal(dec.weight[2], before)


def test_event_windows_are_peak_normalised_windows_around_p(tmp_path):
    import seisbench.data as sbd

    from moelab.seismic.synth import make_dataset

    make_dataset(tmp_path / "d", n_traces=12, seed=0, domain="stead_like", n_samples=3000)
    ds = sbd.WaveformDataset(tmp_path / "d", sampling_rate=100)
    x = event_windows(ds, N, n=3)
    assert x.shape[1:] == (3, N) and 1 <= x.shape[0] <= 3
    assert np.allclose(x.abs().amax(dim=-1).numpy(), 1.0, atol=1e-5)


def test_redo_arguments_are_checked_once_at_the_edge():
    from moelab.seismic.config import validate
    from moelab.seismic.lit import EQTransformerLit

    with pytest.raises(ConfigError, match="redo_every"):
        validate({"model": "EQTransformer", "data": "x/y", "model_args": {"redo_every": 0}})
    with pytest.raises(ConfigError, match="redo_tau"):
        validate({"model": "EQTransformer", "data": "x/y", "model_args": {"redo_tau": 1.5}})
    validate({"model": "SeisMoE", "data": "x/y", "model_args": {"redo_every": 50, "redo_tau": 0.0}})
    with pytest.raises(ConfigError, match="redo_every"):
        EQTransformerLit(in_samples=N, redo_every=2.5)


def test_head_prior_starts_the_pick_heads_at_the_prior_and_only_from_scratch():
    from moelab.seismic.config import validate
    from moelab.seismic.lit import EQTransformerLit, SeisMoELit

    torch.manual_seed(0)
    plain = EQTransformerLit(in_samples=N)
    torch.manual_seed(0)
    lit = SeisMoELit(in_samples=N, num_experts=2, num_experts_per_token=1, head_prior=0.01)
    model = lit.model.eval()
    with torch.no_grad():
        _, p, s = model(_x())
    for prob in (p, s):  # the decoders' tiny signal at init: every sample within a hair of the prior
        assert float((prob - 0.01).abs().max()) < 2e-3
    assert float(model.pick_convs[0].bias.detach()) == pytest.approx(-math.log(99))
    assert torch.equal(model.conv_d.bias, plain.model.conv_d.bias)  # detection (a wide box label) keeps PyTorch's init
    with pytest.raises(ConfigError, match="head_prior must be a probability"):
        EQTransformerLit(in_samples=N, head_prior=1.0)
    with pytest.raises(ConfigError, match="head_prior initialises"):
        validate({"model": "EQTransformer", "data": "x/y", "model_args": {"head_prior": 0.01, "base_model": "stead"}})
    # a checkpoint keeps its trained biases: restoring does not re-apply the prior
    with torch.no_grad():
        lit.model.pick_convs[0].bias.fill_(0.5)
    back = SeisMoELit(**{**lit.hparams, "model_args": lit.model.get_model_args()})
    back.load_state_dict(lit.state_dict())
    assert float(back.model.pick_convs[0].bias.detach()) == 0.5
