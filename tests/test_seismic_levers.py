"""SeisMoE's upcycling levers: expert noise at upcycling, Drop-Upcycling (``upcycle_drop``), the
shared always-on expert, wider experts (``expert_hidden``), the trace-context router
(``router_context``) and the source-aware router (``router_sources``, Task-MoE's task id).

Exact properties only: outputs at upcycling, parameter figures, what the noise touches, the model
arguments and their save/load round trip, config checks. Whether a lever helps is measured by
bench/seismoe_quality.py, not here."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("seisbench")
from seisbench.models import EQTransformer  # noqa: E402

from moelab.errors import CheckpointError, ConfigError  # noqa: E402
from moelab.moe import freeze_non_moe  # noqa: E402
from moelab.seismic.config import validate  # noqa: E402
from moelab.seismic.lit import SeisMoELit  # noqa: E402
from moelab.seismic.model import MOE_BLOCKS, SeisMoE, add_upcycle_noise, drop_upcycle, widen_into  # noqa: E402

N = 600
FFN = 16 * 128 + 128 + 128 * 16 + 16  # one EQTransformer transformer FFN: 4,240 parameters


def _max_diff(a, b) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(a, b, strict=True))


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


def _ffn(hidden: int) -> int:
    return 16 * hidden + hidden + hidden * 16 + 16


@pytest.mark.parametrize("shared_expert", [False, True])
def test_wider_experts_are_upcycled_to_the_dense_output(dense, shared_expert):
    torch.manual_seed(8)
    moe = SeisMoE.from_eqtransformer(dense, expert_hidden=320, shared_expert=shared_expert).eval()
    plain = SeisMoE(in_samples=N, shared_expert=shared_expert)
    copies = 4 + int(shared_expert)
    extra = 2 * copies * (_ffn(320) - FFN)  # two MoE layers
    assert sum(p.numel() for p in moe.parameters()) == sum(p.numel() for p in plain.parameters()) + extra
    for name in MOE_BLOCKS:
        ff = getattr(moe, name).ff
        ref = getattr(dense, name).ff.state_dict()
        experts = list(ff.experts) + ([ff.shared_expert] if shared_expert else [])
        for e in experts:
            sd = e.state_dict()
            assert sd["lin1.weight"].shape == (320, 16) and sd["lin2.weight"].shape == (16, 320)
            assert torch.equal(sd["lin1.weight"][:128], ref["lin1.weight"]) and torch.equal(sd["lin1.bias"][:128], ref["lin1.bias"])
            assert torch.equal(sd["lin2.weight"][:, :128], ref["lin2.weight"]) and torch.equal(sd["lin2.bias"], ref["lin2.bias"])
            assert torch.count_nonzero(sd["lin2.weight"][:, 128:]) == 0  # the extra units add nothing yet
            assert torch.count_nonzero(sd["lin1.weight"][128:]) == 192 * 16  # ... but are not dead
    with torch.no_grad():
        assert _max_diff(moe(_x()), dense(_x())) < 1e-6
    # the extra units train: their weights into lin2 get a gradient at the first step
    moe.train()
    det, p, s = moe(_x())
    (det.sum() + p.sum() + s.sum()).backward()
    grads = [e.lin2.weight.grad[:, 128:] for name in MOE_BLOCKS for e in getattr(moe, name).ff.experts if e.lin2.weight.grad is not None]
    assert grads and any(torch.count_nonzero(g) > 0 for g in grads)


def test_wider_experts_survive_save_load_and_refuse_narrower_than_dense(tmp_path, dense):
    torch.manual_seed(9)
    moe = SeisMoE.from_eqtransformer(dense, expert_hidden=256, upcycle_noise=0.05).eval()
    assert moe.get_model_args()["expert_hidden"] == 256
    moe.save(tmp_path / "w")
    back = SeisMoE.load(tmp_path / "w").eval()
    with torch.no_grad():
        assert _max_diff(moe(_x()), back(_x())) == 0.0
        assert _max_diff(moe(_x()), SeisMoE.from_base(tmp_path / "w").eval()(_x())) == 0.0
    assert SeisMoE(in_samples=N).get_model_args()["expert_hidden"] is None
    with pytest.raises(ConfigError, match="expert_hidden=64 is smaller than EQTransformer's feed-forward hidden size 128"):
        SeisMoE(in_samples=N, expert_hidden=64)
    with pytest.raises(CheckpointError, match="do not fit num_experts=4, expert_hidden=512"):
        SeisMoE.from_base(tmp_path / "w", expert_hidden=512)  # trained 256-wide experts load only as they are


@pytest.mark.parametrize("expert_hidden", [None, 256])
def test_drop_upcycling_reinitialises_that_fraction_of_each_experts_units(dense, expert_hidden):
    """Exactly round(fraction * hidden) units per routed expert get a new lin1 row, lin1 bias
    entry and lin2 column, each expert its own draw; everything else (lin2 bias, router, shared
    expert, trunk) is what plain upcycling gives."""
    torch.manual_seed(11)
    plain = SeisMoE.from_eqtransformer(dense, expert_hidden=expert_hidden, shared_expert=True)
    torch.manual_seed(11)
    dropped = SeisMoE.from_eqtransformer(dense, expert_hidden=expert_hidden, shared_expert=True, upcycle_drop=0.25)
    hidden = expert_hidden or 128
    for name in MOE_BLOCKS:
        a, b = getattr(plain, name).ff, getattr(dropped, name).ff
        draws = []
        for ea, eb in zip(a.experts, b.experts, strict=True):
            rows = (ea.lin1.weight != eb.lin1.weight).any(1)
            assert torch.equal(rows, ea.lin1.bias != eb.lin1.bias)
            assert torch.equal(rows, (ea.lin2.weight != eb.lin2.weight).any(0))
            assert int(rows.sum()) == round(0.25 * hidden)
            assert torch.equal(ea.lin2.bias, eb.lin2.bias)
            draws.append(tuple(rows.nonzero().flatten().tolist()))
        assert len(set(draws)) == len(draws)  # a different draw per expert
    for (ka, va), (_, vb) in zip(plain.state_dict().items(), dropped.state_dict().items(), strict=True):
        if ".ff.experts." not in ka:  # routers, shared experts, the trunk
            assert torch.equal(va, vb), ka
    assert dropped.get_model_args()["upcycle_drop"] == 0.25
    with torch.no_grad():
        assert _max_diff(plain.eval()(_x()), dropped.eval()(_x())) > 0  # no longer the dense model exactly


def test_drop_upcycle_draws_from_the_dense_tensors_spread_and_zero_is_a_no_op(dense):
    torch.manual_seed(12)
    moe = SeisMoE.from_eqtransformer(dense, num_experts=2, expert_hidden=1024)
    ff = moe.transformer_d.ff
    before = {k: v.clone() for k, v in ff.state_dict().items()}
    drop_upcycle(ff, 0.0, 128)
    assert all(torch.equal(v, ff.state_dict()[k]) for k, v in before.items())
    drop_upcycle(ff, 0.5, 128, generator=torch.Generator().manual_seed(0))
    w2 = ff.experts[0].lin2.weight.detach()
    changed = (w2 != before["experts.0.lin2.weight"]).any(0)
    fresh = w2[:, changed]
    dense_w2 = dense.transformer_d.ff.lin2.weight.detach()
    # 512 x 16 fresh values drawn from the dense lin2's N(mean, std), not from the 896 zero columns
    assert abs(float(fresh.std()) / float(dense_w2.std()) - 1) < 0.1
    with pytest.raises(ConfigError, match="upcycle_drop must be a number in \\[0, 1\\)"):
        SeisMoE(in_samples=N, upcycle_drop=1.0)


def test_widen_into_copies_the_leading_block_and_zeroes_the_extra_inputs():
    target = torch.full((3, 5), 7.0)
    out = widen_into(torch.ones(2, 3), target, "w")
    assert torch.equal(out[:2, :3], torch.ones(2, 3)) and torch.equal(out[:, 3:], torch.zeros(3, 2))
    assert torch.equal(out[2, :3], torch.full((3,), 7.0)) and torch.equal(target, torch.full((3, 5), 7.0))
    assert torch.equal(widen_into(torch.ones(2), torch.zeros(4), "b"), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="'w': the dense tensor \\(4, 3\\) does not fit into \\(3, 5\\)"):
        widen_into(torch.ones(4, 3), target, "w")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"expert_hidden": 0}, "expert_hidden must be a positive integer or null"),
        ({"expert_hidden": 256.0}, "expert_hidden must be a positive integer or null"),
        ({"upcycle_noise": -0.1}, "upcycle_noise must be a number in \\[0, 1\\)"),
        ({"upcycle_noise": 1.0}, "upcycle_noise must be a number in \\[0, 1\\)"),
        ({"upcycle_noise": True}, "upcycle_noise must be a number in \\[0, 1\\)"),
        ({"shared_expert": 1}, "shared_expert must be true or false"),
        ({"router_context": "yes"}, "router_context must be true or false"),
        ({"router_sources": "stead_like"}, "router_sources must be a non-empty list of distinct source names"),
        ({"router_sources": []}, "router_sources must be a non-empty list"),
        ({"router_sources": ["a", "a"]}, "router_sources must be a non-empty list of distinct"),
        ({"router_sources": ["a", 3]}, "router_sources must be a non-empty list of distinct source names"),
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
        ({"upcycle_drop": 1.0}, "model_args.upcycle_drop must be in \\[0, 1\\)"),
        ({"upcycle_drop": "half"}, "model_args.upcycle_drop must be a number"),
        ({"expert_hidden": 0}, "model_args.expert_hidden must be >= 1"),
        ({"expert_hidden": "wide"}, "model_args.expert_hidden must be"),
        ({"router_context": 1}, "model_args.router_context must be true/false"),
        ({"router_sources": "a"}, "model_args.router_sources must be"),
        ({"router_sources": ["a", "a"]}, "model_args.router_sources must be a non-empty list of distinct"),
    ],
)
def test_config_refuses_bad_lever_values(args, match):
    with pytest.raises(ConfigError, match=match):
        validate({"model": "SeisMoE", "data": "x", "model_args": args})
    with pytest.raises(ConfigError, match="it is a SeisMoE argument"):
        validate({"model": "EQTransformer", "data": "x", "model_args": {"shared_expert": True}})


def _router_input(ff, x: torch.Tensor) -> torch.Tensor:
    """What the router network of the MoE layer ``ff`` receives for its channels-first input ``x``."""
    seen: list[torch.Tensor] = []
    hook = ff.router.net.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    with torch.no_grad():
        ff(x)
    hook.remove()
    return seen[0]


def _router_inputs(model: SeisMoE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each MoE layer's input in one forward of ``model`` (``"<block>.input"``) and what its router
    network receives for that input (``"<block>.router"``, through `_router_input`)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(model, name).ff.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(f"{n}.input", a[0].detach()))
        for name in MOE_BLOCKS
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for name in MOE_BLOCKS:
        seen[f"{name}.router"] = _router_input(getattr(model, name).ff, seen[f"{name}.input"])
    return seen


def test_router_context_routes_on_the_token_and_its_traces_mean(dense):
    torch.manual_seed(9)
    moe = SeisMoE.from_eqtransformer(dense, router_context=True).eval()
    for name in MOE_BLOCKS:
        ff = getattr(moe, name).ff
        assert ff.router_context is True and ff.router.net.in_features == 32 and ff.router.net.weight.shape == (4, 32)
    x = _x()
    seen = _router_inputs(moe, x)
    for name in MOE_BLOCKS:
        block_in = seen[f"{name}.input"]  # [B, 16, T]: the layer's input, channels first
        tokens = block_in.transpose(1, 2).reshape(-1, 16)
        context = block_in.mean(dim=2, keepdim=True).expand_as(block_in).transpose(1, 2).reshape(-1, 16)
        assert torch.equal(seen[f"{name}.router"], torch.cat([tokens, context], dim=-1))
    with torch.no_grad():  # the experts are still copies: whatever the router says, the dense output
        assert _max_diff(moe(x), dense(x)) < 1e-6
    plain = _router_inputs(SeisMoE.from_eqtransformer(dense).eval(), x)
    assert all(plain[f"{n}.router"].shape[-1] == 16 for n in MOE_BLOCKS)


def test_router_context_changes_a_tokens_routing_with_the_rest_of_its_trace(dense):
    """Two traces equal in their first half and different in the second: with the context, the
    router's input for a position in the common half differs; without it, it does not."""
    torch.manual_seed(10)
    context_ff = SeisMoE.from_eqtransformer(dense, router_context=True).eval().transformer_d0.ff
    plain_ff = SeisMoE.from_eqtransformer(dense).eval().transformer_d0.ff
    x = torch.randn(1, 16, 40)
    y = x.clone()
    y[..., 20:] += 1.0
    fx, fy = _router_input(context_ff, x), _router_input(context_ff, y)
    gx, gy = _router_input(plain_ff, x), _router_input(plain_ff, y)
    assert torch.equal(fx[:20, :16], fy[:20, :16]) and not torch.equal(fx[:20, 16:], fy[:20, 16:])
    assert torch.equal(gx[:20], gy[:20])


def test_router_context_is_a_model_arg_and_survives_save_load_and_training_setup(tmp_path, dense):
    torch.manual_seed(11)
    moe = SeisMoE.from_eqtransformer(dense, router_context=True, upcycle_noise=0.05).eval()
    assert moe.get_model_args()["router_context"] is True
    assert SeisMoE(in_samples=N).get_model_args()["router_context"] is False
    moe.save(tmp_path / "m")
    back = SeisMoE.load(tmp_path / "m").eval()
    assert back.router_context is True and back.get_model_args() == moe.get_model_args()
    with torch.no_grad():
        assert _max_diff(moe(_x()), back(_x())) == 0.0
    with pytest.raises(CheckpointError, match="router_context=False"):  # the 32-input routers do not fit
        SeisMoE.from_base(tmp_path / "m", router_context=False)
    dense.save(tmp_path / "base")
    lit = SeisMoELit(base_model=str(tmp_path / "base"), router_context=True, freeze_non_moe=True)
    assert lit.model.transformer_d.ff.router.net.in_features == 32
    assert lit.hparams["model_args"]["router_context"] is True
    validate({"model": "SeisMoE", "data": "x", "model_args": {"router_context": True}})


SOURCES = ["stead_like", "ethz_like", "ethz_like_weak_p"]


def test_router_sources_give_each_router_a_one_hot_of_the_traces_source(dense):
    torch.manual_seed(12)
    moe = SeisMoE.from_eqtransformer(dense, router_sources=SOURCES).eval()
    x = _x()
    for name in MOE_BLOCKS:
        ff = getattr(moe, name).ff
        assert ff.num_sources == 3 and ff.router.net.in_features == 16 + 3
        assert ff.router.net.weight[:, 16:].abs().sum() > 0  # sources start with preferences of their own
    with moe.routed_by_source(torch.tensor([1, -1])):
        seen = _router_inputs(moe, x)
        with torch.no_grad():  # upcycled copies: whatever the router says, the dense output
            assert _max_diff(moe(x), dense(x)) < 1e-6
    for name in MOE_BLOCKS:
        tokens = seen[f"{name}.input"].transpose(1, 2)  # [B, T, 16]
        router = seen[f"{name}.router"].reshape(2, tokens.shape[1], 19)
        assert torch.equal(router[..., :16], tokens)
        assert torch.equal(router[0, :, 16:], torch.tensor([0.0, 1.0, 0.0]).expand(tokens.shape[1], 3))
        assert torch.equal(router[1, :, 16:], torch.zeros(tokens.shape[1], 3))  # unknown source
    unknown = _router_inputs(moe, x)  # no source given: every trace unknown
    assert all(torch.equal(unknown[f"{n}.router"][:, 16:], torch.zeros(unknown[f"{n}.router"].shape[0], 3)) for n in MOE_BLOCKS)
    assert all(getattr(moe, n).ff.source_onehot is None for n in MOE_BLOCKS)  # nothing left set after the block
    with pytest.raises(ValueError, match="source indices must be in \\[-1, 2\\]"):
        with moe.routed_by_source(torch.tensor([3, 0])):
            pass


def test_router_sources_route_the_same_trace_differently_by_source(dense):
    torch.manual_seed(13)
    ff = SeisMoE.from_eqtransformer(dense, router_sources=SOURCES).eval().transformer_d0.ff
    x = torch.randn(1, 16, 40)
    chosen = []
    for source in range(3):
        ff.source_onehot = torch.nn.functional.one_hot(torch.tensor([source]), 3).float()
        with torch.no_grad():
            chosen.append(ff.router(_router_input(ff, x)).indices)
    ff.source_onehot = None
    assert not (torch.equal(chosen[0], chosen[1]) and torch.equal(chosen[1], chosen[2]))


def test_router_sources_are_a_model_arg_that_survives_save_load_and_reach_the_batches(tmp_path, dense):
    import numpy as np

    from moelab.seismic.augment import SourceIndex

    torch.manual_seed(14)
    moe = SeisMoE.from_eqtransformer(dense, router_sources=SOURCES, upcycle_noise=0.05).eval()
    assert moe.get_model_args()["router_sources"] == SOURCES and SeisMoE(in_samples=N).router_sources is None
    moe.save(tmp_path / "m")
    back = SeisMoE.load(tmp_path / "m").eval()
    assert back.router_sources == SOURCES and back.get_model_args() == moe.get_model_args()
    source = moe.source_index(["ethz_like", None, "geofon_like"])
    assert source.tolist() == [1, -1, -1]
    x = torch.randn(3, 3, N, generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), moe.routed_by_source(source), back.routed_by_source(source):
        assert _max_diff(moe(x), back(x)) == 0.0
    with pytest.raises(CheckpointError, match="router_sources=None"):  # the 19-input routers do not fit
        SeisMoE.from_base(tmp_path / "m", router_sources=None)
    # the batches: an augmentation reads the trace's trace_domain; unknown or missing -> -1
    aug = SourceIndex(SOURCES)
    for domain, want in (("ethz_like_weak_p", 2), ("geofon_like", -1), (None, -1)):
        state = {"X": (np.zeros((3, 10)), {} if domain is None else {"trace_domain": domain})}
        aug(state)
        assert state["source"][0] == want
    dense.save(tmp_path / "base")
    lit = SeisMoELit(base_model=str(tmp_path / "base"), router_sources=SOURCES, in_samples=N)
    assert lit.hparams["model_args"]["router_sources"] == SOURCES
    for augs in (lit.get_train_augmentations(), lit.get_val_augmentations(), lit.get_eval_augmentations()):
        assert isinstance(augs[-1], SourceIndex)
    plain = SeisMoELit(base_model=str(tmp_path / "base"), in_samples=N)
    assert not any(isinstance(a, SourceIndex) for a in plain.get_eval_augmentations())
    # a training step with the batch's sources, and one without (every trace unknown)
    batch = {
        "X": torch.randn(2, 3, N), "y": torch.rand(2, 3, N), "detections": torch.rand(2, 1, N),
        "source": torch.tensor([0, 2]),
    }
    seen = []
    hook = lit.model.transformer_d0.ff.router.net.register_forward_hook(lambda m, a, o: seen.append(a[0][:, 16:].detach()))
    lit.shared_step(batch, "val")
    lit.shared_step({k: v for k, v in batch.items() if k != "source"}, "val")
    hook.remove()
    t = seen[0].shape[0] // 2
    assert torch.equal(seen[0][:t], torch.tensor([1.0, 0.0, 0.0]).expand(t, 3))
    assert torch.equal(seen[0][t:], torch.tensor([0.0, 0.0, 1.0]).expand(t, 3))
    assert torch.equal(seen[1], torch.zeros_like(seen[1]))
    validate({"model": "SeisMoE", "data": "x", "model_args": {"router_sources": SOURCES}})
