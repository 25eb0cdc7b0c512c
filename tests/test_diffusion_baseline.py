"""Dense baseline: diffusers' UNet2DModel with MoEFsDiC's call, width matched to MoEFsDiC's active
parameters; and the compare command end to end on a tiny budget."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DModel

from moelab.diffusion.baseline import DenseUNet2D, _count, matched_width, moefsdic_active_params, unet2d_kwargs
from moelab.diffusion.config import load_config
from moelab.diffusion.lit import MoEFsDiCLit
from moelab.diffusion.models import build_model
from moelab.diffusion.unet import MoEFsDiC_UNet
from moelab.moe import moe_layers



TINY = {
    "extends": "digits.yaml",
    "model": {"image_size": 8, "channel_mults": [1, 2], "model_channels": 8},
    "moe": {"num_experts": 4, "k_active": 2, "router_hidden": 8},
    "train": {"batch_size": 16, "epochs": 1},
    "data": {"subset": 48},
}


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY)


def test_active_params_drop_the_unused_experts(cfg):
    model = MoEFsDiC_UNet(cfg)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for layer in moe_layers(model) for p in layer.experts.parameters())
    assert moefsdic_active_params(cfg) == total - experts * (4 - 2) // 4
    assert moefsdic_active_params(cfg) < total


def test_width_is_matched_to_active_params(cfg):
    target = moefsdic_active_params(cfg)
    w = matched_width(cfg)
    params = lambda width: _count(lambda: UNet2DModel(**unet2d_kwargs(cfg, width)))  # noqa: E731
    assert w % 2 == 0
    assert abs(params(w) - target) <= abs(params(w + 2) - target)
    assert w == 2 or abs(params(w) - target) <= abs(params(w - 2) - target)
    dense = DenseUNet2D(cfg)
    assert dense.width == w and dense.parameter_counts()["total"] == params(w)
    assert dense.parameter_counts()["active_per_sample"] == dense.parameter_counts()["total"]


def test_dense_forward_matches_moefsdic_call(cfg):
    dense = build_model({**cfg, "model": {**cfg["model"], "arch": "unet2d"}})
    assert isinstance(dense, DenseUNet2D)
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([0, 500, 999])
    eps, logits = dense(x, t, torch.tensor([1, 2, 10]))
    assert eps.shape == x.shape and logits == []
    assert torch.equal(dense(x, t, None)[0], dense(x, t, torch.full((3,), 10))[0])  # None = null class
    assert not torch.allclose(dense(x, t, torch.tensor([0, 0, 0]))[0], dense(x, t, torch.tensor([5, 5, 5]))[0])


def test_dense_baseline_trains_through_the_same_lit(cfg):
    lit = MoEFsDiCLit({**cfg, "model": {**cfg["model"], "arch": "unet2d"}})
    loss, dm, load = lit.diffusion_loss(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), torch.Generator().manual_seed(0), 0.1)
    loss.backward()
    grads = [p.grad for p in lit.model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and float(load) == 0.0
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_compare_trains_and_evaluates_both(cfg, tmp_path, capsys):
    from moelab.cli import main

    cfg_file = tmp_path / "tiny.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump({**TINY, "extends": str(load_config.__globals__["CONFIG_DIR"] / "digits.yaml")}))
    assert main(["diffusion", "compare", "--config", str(cfg_file), "--out", str(tmp_path / "cmp"), "--max-steps", "2",
                 "--per-class", "1", "--steps", "2", "--guidance", "1", "2.5", "--no-progress",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "moefsdic" in out and "unet2d" in out and "params active" in out and "best guidance weight" in out
    res = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    # every model at every guidance weight, the same trained model behind both weights
    assert [(r["arch"], r["guidance"]) for r in res["results"]] == [
        ("moefsdic", 1.0), ("moefsdic", 2.5), ("unet2d", 1.0), ("unet2d", 2.5)]
    assert res["results"][0]["checkpoint"] == res["results"][1]["checkpoint"]
    assert res["results"][0]["accuracy"] != res["results"][1]["accuracy"] or \
        res["results"][0]["frechet_distance"] != res["results"][1]["frechet_distance"]
    rows = res["rows"]  # each model at its lowest Fréchet distance
    assert set(rows) == {"moefsdic", "unet2d"}
    for name, row in rows.items():
        assert row["frechet_distance"] == min(r["frechet_distance"] for r in res["results"] if r["arch"] == name)
    assert rows["moefsdic"]["train_steps"] == rows["unet2d"]["train_steps"] == 2
    assert rows["moefsdic"]["params_active"] < rows["moefsdic"]["params_total"]
    assert rows["unet2d"]["params_active"] == rows["unet2d"]["params_total"]
    assert abs(rows["unet2d"]["params_total"] - rows["moefsdic"]["params_active"]) < 0.5 * rows["moefsdic"]["params_active"]
    for r in rows.values():
        assert r["num_samples"] == 10 and r["train_samples_per_s"] > 0 and r["seconds_per_sample"] > 0
        assert r["train_seed"] == load_config(cfg_file)["train"]["seed"]  # the config's seed when --train-seed is not given
    # the multi-seed summary reads the run it wrote: one seed, no spread, no verdict
    capsys.readouterr()
    assert main(["diffusion", "compare-seeds", str(tmp_path / "cmp"), "--json", str(tmp_path / "seeds.json")]) == 0
    out = capsys.readouterr().out
    delta = rows["moefsdic"]["frechet_distance"] - rows["unet2d"]["frechet_distance"]
    assert f"frechet moe-dense={delta:+.3f} ± 0.000 [no interval] wins={int(delta <= 0)}/1 (one seed)" in out
    summary = json.loads((tmp_path / "seeds.json").read_text())
    assert summary["seeds"][0]["delta_frechet"] == pytest.approx(delta) and summary["delta_frechet"]["ci95"] is None


def test_compare_refuses_negative_guidance_before_training(tmp_path):
    from moelab.diffusion.compare import compare
    from moelab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--guidance 1.0 -1.0: give one or more weights >= 0"):
        compare(TINY, tmp_path / "cmp", guidance=[1.0, -1.0])
    for bad in ("nan", "inf"):  # the same predicate as generate's: NaN/inf would give NaN images after training
        with pytest.raises(ConfigError, match=rf"--guidance 1.0 {bad}: give one or more weights >= 0"):
            compare(TINY, tmp_path / "cmp", guidance=[1.0, float(bad)])
    assert not (tmp_path / "cmp").exists()


def _compare_json(path, moe_fd, dense_fd, seed, guidance=(1.0, 1.25), params=1000, steps=(90, 120)):
    """A compare.json as `compare` writes it: two models, one row per guidance weight."""
    rows = []
    for arch, fds, n in (("moefsdic", moe_fd, steps[0]), ("unet2d", dense_fd, steps[1])):
        for w, fd in zip(guidance, fds, strict=True):
            rows.append({"arch": arch, "guidance": w, "frechet_distance": fd, "accuracy": 0.9 + fd / 100, "train_steps": n,
                         "params_total": params if arch == "unet2d" else 2 * params, "params_active": params,
                         "budget_seconds": 100.0, "train_seed": seed})
    path.mkdir(parents=True, exist_ok=True)
    (path / "compare.json").write_text(json.dumps({"results": rows}))
    return path


def test_compare_seeds_pairs_each_models_best_weight_by_seed(tmp_path):
    from moelab.diffusion.compare import summarize_seeds
    from moelab.paired import paired_interval

    runs = [
        _compare_json(tmp_path / "s0", [1.5, 1.2], [1.4, 1.6], 0),  # best: moe 1.2 (w 1.25), dense 1.4 (w 1)
        _compare_json(tmp_path / "s1", [1.1, 1.3], [1.5, 1.3], 1),  # 1.1 vs 1.3
        _compare_json(tmp_path / "s2", [1.4, 1.6], [1.2, 1.9], 2),  # 1.4 vs 1.2: the dense model wins
    ]
    res = summarize_seeds([runs[0], runs[1] / "compare.json", runs[2]])
    deltas = [-0.2, -0.2, 0.2]
    assert [r["delta_frechet"] for r in res["seeds"]] == pytest.approx(deltas)
    assert [r["seed"] for r in res["seeds"]] == [0, 1, 2] and res["wins"] == 2
    m, lo, hi = paired_interval(deltas)
    assert res["delta_frechet"]["mean"] == pytest.approx(m) and res["delta_frechet"]["ci95"] == pytest.approx([lo, hi])
    assert "| 0 | 90 | 0.912 / 1.20 (1.25) | 120 | 0.914 / 1.40 (1) | -0.20 |" in res["table"]
    assert f"compare_seeds: frechet moe-dense={m:+.3f} ± 0.231 [{lo:+.3f}, {hi:+.3f}] wins=2/3 (level)" in res["table"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"guidance": (1.0, 2.0)}, r"evaluated moefsdic at guidance \[1.0, 2.0\].*use the same --guidance"),
        ({"params": 999}, r"differ in params_total of moefsdic \(1998 vs 2000\)"),
    ],
)
def test_compare_seeds_refuses_runs_that_differ_in_more_than_the_seed(tmp_path, kwargs, message):
    from moelab.diffusion.compare import summarize_seeds
    from moelab.errors import ConfigError

    a = _compare_json(tmp_path / "a", [1.0, 1.1], [1.2, 1.3], 0)
    b = _compare_json(tmp_path / "b", [1.0, 1.1], [1.2, 1.3], 1, **kwargs)
    with pytest.raises(ConfigError, match=message):
        summarize_seeds([a, b])


def test_compare_seeds_names_a_missing_or_foreign_file(tmp_path):
    from moelab.diffusion.compare import summarize_seeds
    from moelab.errors import DataError

    with pytest.raises(DataError, match="neither a compare.json nor a folder holding one"):
        summarize_seeds([tmp_path / "nowhere"])
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "compare.json").write_text(json.dumps({"results": [{"arch": "moefsdic"}]}))
    with pytest.raises(DataError, match=r"is not a `moelab diffusion compare` result \(KeyError: .*guidance"):
        summarize_seeds([tmp_path / "x"])
    (tmp_path / "x" / "compare.json").write_text("{not json")
    with pytest.raises(DataError, match="is not a `moelab diffusion compare` result"):
        summarize_seeds([tmp_path / "x"])


def test_compare_seeds_refuses_a_run_counted_twice(tmp_path):
    from moelab.diffusion.compare import summarize_seeds
    from moelab.errors import ConfigError

    a = _compare_json(tmp_path / "a", [1.0, 1.1], [1.2, 1.3], 0)
    with pytest.raises(ConfigError, match="is given twice: pass one compare run per training seed"):
        summarize_seeds([a, a / "compare.json"])
    b = _compare_json(tmp_path / "b", [1.0, 1.1], [1.2, 1.3], 0)  # another folder, the same --train-seed
    with pytest.raises(ConfigError, match="were both trained with --train-seed 0"):
        summarize_seeds([a, b])
