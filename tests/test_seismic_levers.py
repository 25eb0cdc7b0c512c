"""SeisMoE's upcycling levers: expert noise at upcycling and the shared always-on expert.

Exact properties only: outputs at upcycling, parameter figures, what the noise touches, the model
arguments and their save/load round trip, config checks. Whether a lever helps is measured by
perf/seismoe_quality.py, not here."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("seisbench")
from seisbench.models import EQTransformer  # noqa: E402

from moelab.errors import ConfigError  # noqa: E402
from moelab.moe import freeze_non_moe  # noqa: E402
from moelab.seismic.config import validate  # noqa: E402
from moelab.seismic.lit import SeisMoELit  # noqa: E402
from moelab.seismic.model import MOE_BLOCKS, SeisMoE, add_upcycle_noise  # noqa: E402

N = 600
FFN = 16 * 128 + 128 + 128 * 16 + 16  # one EQTransformer transformer FFN: 4,240 parameters


def _max_diff(a, b) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(a, b))


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return EQTransformer(in_samples=N).eval()


def _x():
    return torch.randn(2, 3, N, generator=torch.Generator().manual_seed(5))


def test_zero_noise_gives_exact_copies_and_the_dense_output(dense):
    torch.manual_seed(1)
    plain = SeisMoE.from_eqtransformer(dense).eval()
    torch.manual_seed(2)  # another RNG state: noise 0 draws nothing, the weights are the same
    zero = SeisMoE.from_eqtransformer(dense, upcycle_noise=0.0).eval()
    assert zero.state_dict().keys() == plain.state_dict().keys()
    for k, v in plain.state_dict().items():
        if ".ff.router." not in k:
            assert torch.equal(zero.state_dict()[k], v), k
    for name in MOE_BLOCKS:
        ff = getattr(zero, name).ff
        dense_ff = getattr(dense, name).ff.state_dict()
        for e in ff.experts:
            assert all(torch.equal(e.state_dict()[k], dense_ff[k]) for k in dense_ff)
    with torch.no_grad():
        assert _max_diff(zero(_x()), dense(_x())) < 1e-6


def test_noise_perturbs_each_routed_expert_by_its_relative_std_and_nothing_else(dense):
    torch.manual_seed(3)
    noisy = SeisMoE.from_eqtransformer(dense, upcycle_noise=0.05)
    for name in MOE_BLOCKS:
        ff = getattr(noisy, name).ff
        dense_ff = getattr(dense, name).ff.state_dict()
        deltas = []
        for e in ff.experts:
            sd = e.state_dict()
            d = {k: sd[k] - dense_ff[k] for k in dense_ff}
            deltas.append(d)
            for k, v in d.items():
                # noise std / the dense tensor's std ~ 0.05 (loose bound: a draw of >= 16 values)
                ratio = float(v.std() / dense_ff[k].std())
                assert 0.02 < ratio < 0.09, (name, k, ratio)
        # independent per expert: no two experts got the same noise
        assert not torch.equal(deltas[0]["lin1.weight"], deltas[1]["lin1.weight"])
    # routers keep their initialisation; the trunk is the dense model's
    own = noisy.state_dict()
    for k, v in dense.state_dict().items():
        if not any(k.startswith(f"{b}.ff.") for b in MOE_BLOCKS):
            assert torch.equal(own[k], v), k


def test_noise_leaves_a_shared_expert_exact_and_add_upcycle_noise_zero_is_a_no_op(dense):
    torch.manual_seed(4)
    moe = SeisMoE.from_eqtransformer(dense, upcycle_noise=0.1, shared_expert=True)
    for name in MOE_BLOCKS:
        shared = getattr(moe, name).ff.shared_expert.state_dict()
        ref = getattr(dense, name).ff.state_dict()
        assert all(torch.equal(shared[k], ref[k]) for k in ref)
        before = {k: v.clone() for k, v in getattr(moe, name).ff.state_dict().items()}
        add_upcycle_noise(getattr(moe, name).ff, 0.0)
        after = getattr(moe, name).ff.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_shared_expert_parameter_figures_and_dense_output_at_upcycling(dense):
    plain = SeisMoE(in_samples=N)
    shared = SeisMoE(in_samples=N, shared_expert=True)
    n_plain = sum(p.numel() for p in plain.parameters())
    assert sum(p.numel() for p in shared.parameters()) == n_plain + 2 * FFN  # one FFN per MoE layer
    full = SeisMoE(shared_expert=True)  # the default window: the README's figures
    assert sum(p.numel() for p in full.parameters()) == 402_511 + 2 * FFN == 410_991
    report = freeze_non_moe(full)
    assert (report.trainable, report.tensors) == (34_056 + 2 * FFN, 36 + 8)  # the shared expert trains too
    torch.manual_seed(5)
    moe = SeisMoE.from_eqtransformer(dense, shared_expert=True).eval()
    for name in MOE_BLOCKS:
        ff = getattr(moe, name).ff
        assert ff.shared_weight == 0.5 and len(ff.experts) == 4
    with torch.no_grad():
        assert _max_diff(moe(_x()), dense(_x())) < 1e-6


def test_levers_are_model_args_and_survive_save_load(tmp_path, dense):
    torch.manual_seed(6)
    moe = SeisMoE.from_eqtransformer(dense, upcycle_noise=0.02, shared_expert=True).eval()
    args = moe.get_model_args()
    assert args["upcycle_noise"] == 0.02 and args["shared_expert"] is True
    assert SeisMoE(**args).get_model_args() == args
    moe.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["model_args"]["upcycle_noise"] == 0.02 and meta["model_args"]["shared_expert"] is True
    back = SeisMoE.load(tmp_path / "m").eval()
    assert back.get_model_args() == args
    with torch.no_grad():
        assert _max_diff(moe(_x()), back(_x())) == 0.0  # loading a trained SeisMoE adds no noise
        again = SeisMoE.from_base(tmp_path / "m").eval()
        assert _max_diff(moe(_x()), again(_x())) == 0.0
    defaults = SeisMoE(in_samples=N).get_model_args()
    assert defaults["upcycle_noise"] == 0.0 and defaults["shared_expert"] is False


def test_lightning_module_passes_the_levers_through(tmp_path, dense):
    dense.save(tmp_path / "base")
    torch.manual_seed(7)
    lit = SeisMoELit(base_model=str(tmp_path / "base"), upcycle_noise=0.01, shared_expert=True, freeze_non_moe=True)
    assert lit.model.upcycle_noise == 0.01 and lit.model.shared_expert is True
    assert lit.hparams["model_args"]["shared_expert"] is True
    trainable = {n.split(".ff.")[1].split(".")[0] for n, p in lit.model.named_parameters() if p.requires_grad}
    assert trainable == {"router", "experts", "shared_expert"}


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"upcycle_noise": -0.1}, "upcycle_noise must be a number in \\[0, 1\\)"),
        ({"upcycle_noise": 1.0}, "upcycle_noise must be a number in \\[0, 1\\)"),
        ({"upcycle_noise": True}, "upcycle_noise must be a number in \\[0, 1\\)"),
        ({"shared_expert": 1}, "shared_expert must be true or false"),
    ],
)
def test_bad_lever_values_raise_one_clear_error(args, match):
    with pytest.raises(ConfigError, match=match):
        SeisMoE(in_samples=N, **args)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"upcycle_noise": 1.5}, "model_args.upcycle_noise must be in \\[0, 1\\)"),
        ({"upcycle_noise": "x"}, "model_args.upcycle_noise must be a number"),
        ({"shared_expert": "yes"}, "model_args.shared_expert must be true/false"),
    ],
)
def test_config_refuses_bad_lever_values(args, match):
    with pytest.raises(ConfigError, match=match):
        validate({"model": "SeisMoE", "data": "x", "model_args": args})
    with pytest.raises(ConfigError, match="it is a SeisMoE argument"):
        validate({"model": "EQTransformer", "data": "x", "model_args": {"shared_expert": True}})
