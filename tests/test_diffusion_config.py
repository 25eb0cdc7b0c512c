"""MoEFsDiC configs: schema defaults, `extends:`, the quick-start's config paths, presets, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moelab.diffusion.config import SCHEMA, load_config, parse_override
from moelab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def test_default_matches_spec():
    c = load_config(CONFIGS / "default.yaml")
    assert c["model"] == {**c["model"], "in_channels": 3, "model_channels": 128, "channel_mults": [1, 2, 4, 8], "image_size": 64, "num_classes": 10}
    assert (c["moe"]["enabled"], c["moe"]["num_experts"], c["moe"]["k_active"]) == (True, 8, 2)
    assert c["freq"]["enabled"] and c["train"]["use_dsconv_global"]
    assert (c["train"]["lambda_load"], c["train"]["lr"], c["data"]["dataset"]) == (0.01, 1e-4, "cifar10")
    assert c["diffusion"] == {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
    # the file states the schema defaults: a config without the file is the same
    assert load_config({}) == c


@pytest.mark.parametrize(
    "name,diff",
    [
        ("no_moe", {("moe", "enabled"): False}),
        ("no_freq", {("freq", "enabled"): False}),
        ("no_dsconv", {("train", "use_dsconv_global"): False}),
        ("moe_variants", {("moe", "num_experts"): 16, ("moe", "k_active"): 4}),
        ("minimal", {("moe", "enabled"): False, ("freq", "enabled"): False, ("train", "use_dsconv_global"): False}),
    ],
)
def test_ablation_links_differ_from_default_only_where_stated(name, diff):
    link = CONFIGS / f"{name}.yaml"
    assert link.is_symlink() and link.resolve() == (CONFIGS / "diffusion" / f"{name}.yaml").resolve()
    assert not Path(link.readlink()).is_absolute()
    base, c = load_config(CONFIGS / "default.yaml"), load_config(link)
    changed = {(s, k): c[s][k] for s in c for k in c[s] if c[s][k] != base[s][k]}
    assert changed == diff
    assert yaml.safe_load(link.read_text())["extends"] == "default.yaml"


@pytest.mark.parametrize(
    "name,mc,mults,experts",
    [
        ("size_small", 64, [1, 2, 4], (8, 2)),
        ("size_medium", 128, [1, 2, 4, 8], (8, 2)),
        ("size_large", 256, [1, 2, 4, 8, 16], (8, 2)),
        ("moe_4x1", 128, [1, 2, 4, 8], (4, 1)),
        ("moe_8x2", 128, [1, 2, 4, 8], (8, 2)),
        ("moe_16x4", 128, [1, 2, 4, 8], (16, 4)),
    ],
)
def test_presets(name, mc, mults, experts):
    c = load_config(CONFIGS / "diffusion" / f"{name}.yaml")
    assert (c["model"]["model_channels"], c["model"]["channel_mults"]) == (mc, mults)
    assert (c["moe"]["num_experts"], c["moe"]["k_active"]) == experts


def test_digits_demo_config_is_offline():
    c = load_config(CONFIGS / "diffusion" / "digits.yaml")
    assert c["data"]["dataset"] == "digits" and c["model"]["in_channels"] == 1


def test_extends_chain_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  model_channels: 32\ntrain:\n  lr: 3.0e-4\n")
    (tmp_path / "mid.yaml").write_text("extends: base.yaml\nmoe:\n  num_experts: 4\n  k_active: 1\n")
    (tmp_path / "top.yaml").write_text("extends: mid.yaml\ntrain:\n  epochs: 7\n")
    c = load_config(tmp_path / "top.yaml", {"train.lr": 1e-3, "model": {"image_size": 32}})
    assert (c["model"]["model_channels"], c["moe"]["num_experts"], c["train"]["epochs"]) == (32, 4, 7)
    assert (c["train"]["lr"], c["model"]["image_size"]) == (1e-3, 32)
    assert load_config(c) == c  # a validated config validates to itself
    # a dict with `extends` finds the shipped configs
    assert load_config({"extends": "no_moe.yaml"})["moe"]["enabled"] is False


def test_yaml_number_strings_and_precision_aliases():
    c = load_config({"train": {"lr": "1e-4", "precision": "bf16"}})
    assert c["train"]["lr"] == 1e-4 and c["train"]["precision"] == "bf16-mixed"


def test_parse_override():
    assert parse_override("train.lr=1e-3") == ("train.lr", 1e-3)
    assert parse_override("model.channel_mults=[1, 2]") == ("model.channel_mults", [1, 2])
    assert parse_override("moe.enabled=false") == ("moe.enabled", False)
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.lr")


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'moe.num_expert'.*did you mean 'num_experts'"):
        load_config({"moe": {"num_expert": 4}})
    with pytest.raises(ConfigError, match=r"unknown config section 'tarin'.*did you mean 'train'"):
        load_config({"tarin": {}})


def test_every_schema_key_documented_in_default_or_code():
    text = (CONFIGS / "diffusion" / "default.yaml").read_text()
    for section in SCHEMA:
        assert f"{section}:" in text
