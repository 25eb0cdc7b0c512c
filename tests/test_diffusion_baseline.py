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


def test_compare_refuses_negative_guidance_before_training(tmp_path):
    from moelab.diffusion.compare import compare
    from moelab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--guidance 1.0 -1.0: give one or more weights >= 0"):
        compare(TINY, tmp_path / "cmp", guidance=[1.0, -1.0])
    assert not (tmp_path / "cmp").exists()
