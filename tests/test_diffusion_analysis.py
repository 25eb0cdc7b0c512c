"""Routing analysis: exact tallies per class / timestep bucket, agreement with the core's usage
counters, files written; and the sample / evaluate / analyze CLI on a real (tiny) checkpoint."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from moelab.cli import main
from moelab.diffusion.analysis import format_load_table, routing_analysis, write_routing_report
from moelab.diffusion.config import load_config
from moelab.diffusion.models import build_model
from moelab.errors import ConfigError



TINY = {
    "extends": "digits.yaml",
    "model": {"image_size": 8, "channel_mults": [1], "model_channels": 8},
    "moe": {"num_experts": 4, "k_active": 2, "router_hidden": 8},
    "train": {"batch_size": 16, "epochs": 1, "checkpoint_every": 1},
    "data": {"subset": 48},
}


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY)


class Recorder(nn.Module):
    """Wraps a model and records the timesteps and labels of every forward."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, c):
        self.calls.append((t.clone(), c.clone()))
        return self.inner(x, t, c)


def test_routing_tallies_are_exact(cfg):
    torch.manual_seed(0)
    model = Recorder(build_model(cfg)).train()
    n, buckets, k = 20, 4, 2
    images = torch.randn(n, 1, 8, 8)
    labels = torch.arange(n) % 10
    rep = routing_analysis(model, cfg, images, labels, buckets=buckets, batch_size=8)
    assert rep["buckets"] == [[0, 250], [250, 500], [500, 750], [750, 1000]]
    assert rep["classes"][-1] == "null" and len(rep["classes"]) == 11
    assert len(rep["blocks"]) == 2  # encoder + decoder MoE block (freq module at the bottleneck)
    for blk in rep["blocks"].values():
        by_class = torch.tensor(blk["by_class"])
        by_time = torch.tensor(blk["by_timestep"])
        assert by_class.shape == (11, 4) and by_time.shape == (buckets, 4)
        assert by_class[:10].sum(1).tolist() == [2 * buckets * k] * 10  # 2 images per class
        assert int(by_class[10].sum()) == n * buckets * k  # the null-class pass
        assert by_time.sum(1).tolist() == [2 * n * k] * buckets  # labelled + null pass
        # the core's per-layer counters saw exactly the same assignments
        assert by_time.sum(0).tolist() == blk["load"]["counts"] == by_class.sum(0).tolist()
        assert 0.0 <= blk["class_mi"] <= 1.0 and 0.0 <= blk["timestep_mi"] <= 1.0
    # timesteps really come from their bucket
    for b, (lo, hi) in enumerate(rep["buckets"]):
        ts = torch.cat([t for t, _ in model.calls[b * 6 : (b + 1) * 6]])  # 3 batches x (labelled + null)
        assert int(ts.min()) >= lo and int(ts.max()) < hi
    assert model.training  # analysis runs in eval mode and restores the caller's mode


def test_without_null_pass(cfg):
    model = build_model(cfg)
    rep = routing_analysis(model, cfg, torch.randn(10, 1, 8, 8), torch.arange(10), buckets=2, include_null=False)
    blk = next(iter(rep["blocks"].values()))
    assert len(blk["by_class"]) == 10 and sum(map(sum, blk["by_timestep"])) == 10 * 2 * 2


def test_dense_models_are_refused(cfg):
    dense = load_config({**TINY, "moe": {"enabled": False}})
    with pytest.raises(ConfigError, match="no MoE blocks"):
        routing_analysis(build_model(dense), dense, torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))


def test_report_files(cfg, tmp_path):
    model = build_model(cfg)
    rep = routing_analysis(model, cfg, torch.randn(10, 1, 8, 8), torch.arange(10), buckets=3)
    paths = write_routing_report(rep, tmp_path)
    assert set(paths) == {"routing_by_class.csv", "routing_by_class.png", "routing_by_timestep.csv",
                          "routing_by_timestep.png", "load_balance.csv", "load_balance.png"}
    rows = list(csv.DictReader((tmp_path / "routing_by_class.csv").open()))
    assert len(rows) == 2 * 11 * 4
    first = [r for r in rows if r["block"] == rows[0]["block"] and r["class"] == "0"]
    assert sum(float(r["share"]) for r in first) == pytest.approx(1.0, abs=1e-5)
    lb = list(csv.DictReader((tmp_path / "load_balance.csv").open()))
    assert [r["block"] for r in lb] == list(rep["blocks"])
    for name in ("routing_by_class.png", "routing_by_timestep.png", "load_balance.png"):
        assert Image.open(tmp_path / name).size[0] > 100
    assert "entropy" in format_load_table(rep)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from moelab.diffusion.training import fit

    out = tmp_path_factory.mktemp("tiny_run")
    return fit(load_config(TINY), checkpoint_dir=out / "ck", max_steps=2, progress=False, logger_dir=out / "logs")


def test_cli_sample_evaluate_analyze_on_a_checkpoint(tiny_checkpoint, tmp_path, capsys):
    ck = str(tiny_checkpoint)
    grid, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    assert main(["diffusion", "sample", "--checkpoint", ck, "--classes", "0-2", "--per-class", "3", "--steps", "3",
                 "--out", str(grid), "--npz", str(npz)]) == 0
    assert Image.open(grid).size[1] == 3 * (64 + 2) + 2  # three class rows, 8px upscaled to 64
    assert np.load(npz)["labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert main(["diffusion", "sample", "--checkpoint", ck, "--classes", "0-12"]) == 2
    assert "between 0 and 9" in capsys.readouterr().err

    js = tmp_path / "m.json"
    assert main(["diffusion", "evaluate", "--checkpoint", ck, "--per-class", "2", "--steps", "2", "--json", str(js),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    res = json.loads(js.read_text())
    assert res["num_samples"] == 20 and 0.0 <= res["accuracy"] <= 1.0 and res["ema"] is True
    assert "accuracy" in capsys.readouterr().out

    assert main(["diffusion", "analyze", "--checkpoint", ck, "--out", str(tmp_path / "r"), "--buckets", "2"]) == 0
    rep = json.loads((tmp_path / "r" / "routing.json").read_text())
    assert len(rep["buckets"]) == 2 and (tmp_path / "r" / "load_balance.png").exists()


def test_demo_pipeline_writes_grid_metrics_and_routing(tmp_path):
    """The demo's wiring on a 2-step budget (the full demo is measured by hand, not in the suite)."""
    from pathlib import Path

    from moelab.diffusion.demo import run_demo

    config = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
    lines: list[str] = []
    res = run_demo(config, tmp_path / "demo", per_class=1, grid_per_class=2, max_steps=2, progress=False,
                   cache_dir=tmp_path / "cache", log=lambda *a: lines.append(" ".join(map(str, a))))
    out = tmp_path / "demo"
    assert Image.open(out / "grid.png").size[1] == 10 * (64 + 2) + 2
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["train_steps"] == 2 and saved["num_samples"] == 10 and saved["params_active"] < saved["params_total"]
    assert saved["accuracy"] == res["accuracy"]
    assert (out / "routing" / "routing_by_class.png").exists() and (out / "routing" / "load_balance.csv").exists()
    assert any(str(out / "grid.png") in line for line in lines)
    # the demo also exports a diffusers pipeline folder (EMA weights) and says where it is
    assert saved["pipeline"] == str(out / "pipeline") and (out / "pipeline" / "model_index.json").is_file()
    assert any(line.startswith("pipeline: ") and str(out / "pipeline") in line for line in lines)
