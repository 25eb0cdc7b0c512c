"""MoEFsDiC configs: schema defaults, `extends:`, the quick-start's config paths, presets, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moelab.diffusion.config import SCHEMA, dump_config, load_config, parse_override
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


# --- typed configs ----------------------------------------------------------------------------------
def test_typed_sections_and_the_yaml_layout_are_one_config():
    from moelab.diffusion.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig, TrainConfig

    c = load_config(CONFIGS / "no_dsconv.yaml")
    assert isinstance(c, RunConfig)
    assert isinstance(c.model, ModelConfig) and isinstance(c.train, TrainConfig)
    assert isinstance(c.data, DataConfig) and isinstance(c.diffusion, DiffusionConfig)
    # architecture choices of every YAML section land in the model config, under one name each
    assert (c.model.moe_enabled, c.model.num_experts, c.model.top_k, c.model.freq_enabled, c.model.use_dsconv) == (True, 8, 2, True, False)
    assert (c.train.load_loss, c.train.lambda_load, c.train.lr) == ("switch", 0.01, 1e-4)
    assert not hasattr(c.train, "use_dsconv_global") and not hasattr(c.model, "k_active")
    # the YAML layout reads back unchanged, and round-trips through YAML text
    assert c["moe"]["k_active"] == 2 and c["train"]["use_dsconv_global"] is False
    assert load_config(yaml.safe_load(dump_config(c))) == c
    assert set(c.to_dict()) == set(SCHEMA) and all(set(c.to_dict()[s]) == set(SCHEMA[s]) for s in SCHEMA)
    # a change is validated like a file
    assert c.replace(moe={"k_active": 1}).model.top_k == 1
    with pytest.raises(ConfigError, match="moe.k_active=9 is larger than moe.num_experts=8"):
        c.replace(moe={"k_active": 9})


def test_model_config_from_flat_fields_is_checked_like_yaml():
    from moelab.diffusion.config import ModelConfig, model_config

    mc = model_config(None, num_experts=4, top_k=1, channel_mults=[1, 2])
    assert mc == ModelConfig(num_experts=4, top_k=1, channel_mults=(1, 2))
    assert model_config(load_config({"moe": {"num_experts": 4, "k_active": 1}, "model": {"channel_mults": [1, 2]}})) == mc
    with pytest.raises(ConfigError, match="moe.k_active=5 is larger than moe.num_experts=4"):
        model_config(None, num_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="unknown model config field 'num_expert'; did you mean 'num_experts'"):
        model_config(None, num_expert=4)


ORIGINAL = {
    ("model", "t_dim", 64): ("model", "emb_dim", 64),
    ("model", "c_dim", 64): ("model", "emb_dim", 64),
    ("train", "learning_rate", 3e-4): ("train", "lr", 3e-4),
    ("train", "weight_decay", 0.01): ("train", "weight_decay", 0.01),
    ("train", "num_epochs", 7): ("train", "epochs", 7),
    ("train", "image_size", 32): ("model", "image_size", 32),
    ("train", "num_classes", 5): ("model", "num_classes", 5),
    ("train", "log_interval", 25): ("train", "log_every", 25),
    ("train", "save_interval", 2): ("train", "checkpoint_every", 2),
    ("train", "checkpoint_dir", "ck/run1"): ("train", "checkpoint_dir", "ck/run1"),
    ("diffusion", "num_timesteps", 500): ("diffusion", "num_train_timesteps", 500),
    ("diffusion", "schedule", "linear"): ("diffusion", "beta_schedule", "linear"),
    ("diffusion", "schedule", "cosine"): ("diffusion", "beta_schedule", "squaredcos_cap_v2"),
}


@pytest.mark.parametrize("given,meant", list(ORIGINAL.items()), ids=[f"{s}.{k}={v}" for s, k, v in ORIGINAL])
def test_original_project_keys_map_onto_ours(given, meant, caplog):
    (section, key, value), (to_section, to_key, to_value) = given, meant
    with caplog.at_level("INFO", logger="moelab"):
        c = load_config({section: {key: value}})
    assert c[to_section][to_key] == to_value
    assert c == load_config({to_section: {to_key: to_value}})
    renamed = (section, key) != (to_section, to_key)
    said = [r.getMessage() for r in caplog.records if "original MoEFsDiC keys" in r.getMessage()]
    assert len(said) == (1 if renamed else 0)
    if renamed:
        assert f"{section}.{key} -> {to_section}.{to_key}" in said[0]


def test_original_layout_file_is_said_once_and_conflicts_are_errors(tmp_path, caplog):
    (tmp_path / "orig.yaml").write_text(
        "model:\n  t_dim: 32\n  c_dim: 32\ntrain:\n  learning_rate: 0.001\n  num_epochs: 3\n"
        "diffusion:\n  num_timesteps: 100\n  schedule: cosine\n"
    )
    with caplog.at_level("INFO", logger="moelab"):
        c = load_config(tmp_path / "orig.yaml")
    said = [r.getMessage() for r in caplog.records if "original MoEFsDiC keys" in r.getMessage()]
    assert len(said) == 1 and "model.t_dim -> model.emb_dim" in said[0] and "diffusion.schedule -> diffusion.beta_schedule" in said[0]
    assert (c.model.emb_dim, c.train.lr, c.train.epochs, c.diffusion.num_train_timesteps) == (32, 1e-3, 3, 100)
    with pytest.raises(ConfigError, match=r"model.c_dim=16 and model.emb_dim=32 disagree"):
        load_config({"model": {"t_dim": 32, "c_dim": 16}})
    with pytest.raises(ConfigError, match=r"train.learning_rate=0.1 and train.lr=0.001 disagree"):
        load_config({"train": {"lr": 1e-3, "learning_rate": 0.1}})
    with pytest.raises(ConfigError, match=r"diffusion.schedule='cosin' is not allowed \(did you mean 'cosine'\?\)"):
        load_config({"diffusion": {"schedule": "cosin"}})
    # genuinely unknown keys are still rejected, with the closest name of either layout
    with pytest.raises(ConfigError, match=r"unknown key 'model.t_dims'; did you mean 't_dim'\?"):
        load_config({"model": {"t_dims": 32}})
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rat'; did you mean 'learning_rate'\?"):
        load_config({"train": {"learning_rat": 0.1}})
    with pytest.raises(ConfigError, match=r"unknown key 'moe.num_expert'; did you mean 'num_experts'\?"):
        load_config({"moe": {"num_expert": 4}})


def test_original_layout_yaml_trains_with_train_py(tmp_path, monkeypatch, capfd):
    """Acceptance (issue 16.5): a config in the original project's layout, plus a `data:` section
    choosing the digits, trains with `python train.py --config that.yaml --device cpu` (run here
    in-process: `train.py` is `train_cli.main`)."""
    from moelab.checkpoint import safe_load
    from moelab.diffusion.train_cli import main as train_py

    (tmp_path / "original.yaml").write_text(
        "model:\n  in_channels: 1\n  model_channels: 8\n  channel_mults: [1]\n  t_dim: 32\n  c_dim: 32\n"
        "moe:\n  enabled: true\n  num_experts: 4\n  k_active: 2\nfreq:\n  enabled: true\n"
        "train:\n  use_dsconv_global: true\n  batch_size: 8\n  learning_rate: 0.001\n  weight_decay: 0.0\n  num_epochs: 1\n"
        "  image_size: 16\n  num_classes: 10\n  log_interval: 1\n  save_interval: 1\n  checkpoint_dir: ck\n"
        "diffusion:\n  num_timesteps: 100\n  schedule: cosine\n"
        "data:\n  dataset: digits\n  fit: pad\n  subset: 16\n"
    )
    import moelab.diffusion.config as config_module

    validations = []
    real_validate = config_module.validate
    monkeypatch.setattr(config_module, "validate", lambda raw: validations.append(1) or real_validate(raw))
    monkeypatch.chdir(tmp_path)
    assert train_py(["--config", "original.yaml", "--device", "cpu", "--max-steps", "2", "--no-progress", "--seed", "3"]) == 0
    assert len(validations) == 1  # validated once, at the edge; the trainer, LightningModule and model trust it
    assert capfd.readouterr().err.count("original MoEFsDiC keys mapped") == 1  # said once
    ck = safe_load(tmp_path / "ck" / "checkpoint_epoch_1.pth")  # train.checkpoint_dir was honoured
    saved = ck["hyper_parameters"]["config"]
    assert ck["global_step"] == 2 and saved["train"]["seed"] == 3
    assert (saved["model"]["emb_dim"], saved["train"]["lr"], saved["diffusion"]["beta_schedule"]) == (32, 1e-3, "squaredcos_cap_v2")
    assert (saved["model"]["image_size"], saved["diffusion"]["num_train_timesteps"]) == (16, 100)


def test_gradient_checkpointing_takes_a_bool_or_resolution_levels():
    """``train.gradient_checkpointing``: true/false, or distinct levels of ``model.channel_mults``
    (stored sorted, as a tuple; an empty list is off); anything else is one clear error."""
    base = CONFIGS / "default.yaml"
    assert load_config(base, {"train.gradient_checkpointing": [1, 0]}).train.gradient_checkpointing == (0, 1)
    assert load_config(base, {"train.gradient_checkpointing": []}).train.gradient_checkpointing is False
    assert load_config(base, {"train.gradient_checkpointing": True}).train.gradient_checkpointing is True
    c = load_config(base, {"train.gradient_checkpointing": [0]})
    assert load_config(yaml.safe_load(dump_config(c))) == c and c["train"]["gradient_checkpointing"] == [0]
    for bad in ([4], [0, 0], [-1], [True], ["0"]):
        with pytest.raises(ConfigError, match=r"train.gradient_checkpointing=.* must be true, false or a list of distinct resolution levels 0..3"):
            load_config(base, {"train.gradient_checkpointing": bad})
    with pytest.raises(ConfigError, match="train.gradient_checkpointing"):
        load_config(base, {"train.gradient_checkpointing": 1})
