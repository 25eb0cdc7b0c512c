"""Bad configs, data, checkpoints and devices give one clear MoelabError naming the fix."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from moelab.diffusion.config import load_config
from moelab.diffusion.data import load_split
from moelab.diffusion.checkpoints import load_model
from moelab.diffusion.lit import MoEFsDiCLit
from moelab.diffusion.training import fit
from moelab.errors import CheckpointError, ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"model": {"in_channels": 1, "model_channels": 8, "channel_mults": [1], "image_size": 16},
         "moe": {"num_experts": 4, "k_active": 2, "router_hidden": 8},
         "data": {"dataset": "digits", "fit": "pad", "subset": 32}}




def small(**over):
    return load_config(SMALL, over)


def cfg_case(raw):
    return lambda tmp: load_config(raw)


def data_case(over, write=None):
    def go(tmp):
        if write:
            write(tmp)
        return load_split(load_config(SMALL, {k: (v.format(tmp=tmp) if isinstance(v, str) else v) for k, v in over.items()}), "train")
    return go


def idx_bytes(shape, payload: bytes | None = None, magic=(0, 8)) -> bytes:
    head = struct.pack(">HBB", magic[0], magic[1], len(shape)) + struct.pack(f">{len(shape)}I", *shape)
    return head + (payload if payload is not None else bytes(int(torch.tensor(shape).prod())))


def write_mnist(tmp, images: bytes, labels: bytes | None = None):
    root = tmp / "mnist"
    root.mkdir(exist_ok=True)
    (root / "train-images-idx3-ubyte").write_bytes(images)
    (root / "train-labels-idx1-ubyte").write_bytes(labels if labels is not None else idx_bytes((2,)))


def fake_checkpoint(tmp, config, name="ck.pth", full=True):
    lit = MoEFsDiCLit(config)
    ck = {"state_dict": {f"model.{k}": v for k, v in lit.model.state_dict().items()}, "hyper_parameters": {"config": lit.config.to_dict()}}
    if full:
        ck.update(optimizer_states=[], epoch=0, global_step=0)
    torch.save(ck, tmp / name)
    return tmp / name


def resume_case(ck_config, run_config, full=True):
    def go(tmp):
        path = fake_checkpoint(tmp, ck_config, full=full)
        return fit(run_config, checkpoint_dir=tmp / "ck", resume=path, progress=False)
    return go


def seismic_checkpoint(tmp):
    torch.save({"state_dict": {"model.encoder.convs.0.weight": torch.zeros(1)}, "epoch": 0,
                "hyper_parameters": {"model_args": {"in_samples": 3001}, "num_experts_per_token": 2}}, tmp / "model.ckpt")
    return load_model(tmp / "model.ckpt")


def binary_config(tmp):
    (tmp / "c.yaml").write_bytes(b"\x9c\x00\xff garbage")
    return load_config(tmp / "c.yaml")


def guided(guidance):
    def go(tmp):
        from moelab.diffusion.sample import sample

        cfg = small()
        return sample(MoEFsDiCLit(cfg).model, cfg, [0], steps=1, guidance=guidance)
    return go


def compare_case(**kw):
    def go(tmp):
        from moelab.diffusion.compare import compare

        return compare(SMALL, tmp / "cmp", max_steps=1, progress=False, **kw)
    return go


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def evil_checkpoint(tmp):
    with open(tmp / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    return load_model(tmp / "evil.pth")


def truncated_checkpoint(tmp):
    data = fake_checkpoint(tmp, small()).read_bytes()
    (tmp / "cut.pth").write_bytes(data[: len(data) // 2])  # what a non-atomic writer leaves after a crash
    return load_model(tmp / "cut.pth")


def broken_image(tmp):
    (tmp / "imgs" / "cat").mkdir(parents=True)
    (tmp / "imgs" / "cat" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


CASES = [
    ("misspelled key", cfg_case({"moe": {"num_expert": 4}}), ConfigError, r"unknown key 'moe.num_expert'; did you mean 'num_experts'\?"),
    ("unknown section", cfg_case({"optimiser": {"lr": 1}}), ConfigError, r"unknown config section 'optimiser'"),
    ("wrong type number", cfg_case({"train": {"lr": "fast"}}), ConfigError, r'train.lr must be a number, got "fast"'),
    ("wrong type int", cfg_case({"model": {"image_size": 32.5}}), ConfigError, r"model.image_size must be an integer, got 32.5"),
    ("bool for int", cfg_case({"model": {"in_channels": True}}), ConfigError, r"model.in_channels must be an integer, got true"),
    ("bad choice", cfg_case({"train": {"lr_schedule": "cosin"}}), ConfigError, r"train.lr_schedule='cosin' is not allowed \(did you mean 'cosine'\?\)"),
    ("k > E", cfg_case({"moe": {"num_experts": 4, "k_active": 5}}), ConfigError, r"moe.k_active=5 is larger than moe.num_experts=4"),
    ("k < 1", cfg_case({"moe": {"k_active": 0}}), ConfigError, r"moe.k_active=0 must be at least 1"),
    ("E < 1", cfg_case({"moe": {"num_experts": 0, "k_active": 1}}), ConfigError, r"moe.num_experts=0 must be at least 1"),
    ("no blocks per level", cfg_case({"model": {"layers_per_block": 0}}), ConfigError, r"model.layers_per_block=0 must be > 0"),
    ("image size", cfg_case({"model": {"image_size": 60}}), ConfigError, r"model.image_size=60 must be divisible by 32 .*use e.g. 32 or 64"),
    ("empty mults", cfg_case({"model": {"channel_mults": []}}), ConfigError, r"model.channel_mults is empty"),
    ("betas order", cfg_case({"diffusion": {"beta_start": 0.1, "beta_end": 0.01}}), ConfigError, r"0 < beta_start < beta_end < 1"),
    ("missing extends", lambda tmp: (tmp / "c.yaml").write_text("extends: nothere.yaml\n") and load_config(tmp / "c.yaml"),
     ConfigError, r"config '.*nothere.yaml' does not exist"),
    ("config is a folder", lambda tmp: load_config(tmp), ConfigError, r"config '.*' is a folder; pass a .yaml/.yml file"),
    ("binary config", binary_config, ConfigError, r"config file '.*c.yaml' is not a text \(UTF-8\) file"),
    ("yaml syntax", lambda tmp: (tmp / "c.yaml").write_text("model: [1, 2\n") and load_config(tmp / "c.yaml"), ConfigError, r"is not valid YAML"),
    ("num_classes <= label", data_case({"model.num_classes": 5}), DataError, r"label ids up to 9 but model.num_classes=5: set model.num_classes to at least 10"),
    ("channels", data_case({"model.in_channels": 3}), DataError, r"digits images have 1 channel\(s\) but model.in_channels=3: set model.in_channels: 1"),
    ("missing folder", data_case({"data.dataset": "mnist", "data.root": "{tmp}/nope"}), DataError, r"data folder '.*nope' does not exist"),
    ("missing idx file", data_case({"data.dataset": "mnist", "data.root": "{tmp}"}), DataError, r"train-images-idx3-ubyte' \(or 'train-images-idx3-ubyte.gz'\) not found"),
    ("empty idx", data_case({"data.dataset": "mnist", "data.root": "{tmp}/mnist"}, lambda t: write_mnist(t, b"")), DataError,
     r"idx file 'train-images-idx3-ubyte' is empty or truncated \(0 bytes\)"),
    ("corrupt idx", data_case({"data.dataset": "mnist", "data.root": "{tmp}/mnist"}, lambda t: write_mnist(t, idx_bytes((2, 4, 4), magic=(7, 8)))),
     DataError, r"not a uint8 idx file \(bad magic number\)"),
    ("truncated idx", data_case({"data.dataset": "mnist", "data.root": "{tmp}/mnist"}, lambda t: write_mnist(t, idx_bytes((2, 4, 4), b"\0" * 20))),
     DataError, r"holds 20 bytes of data but its header says 32"),
    ("corrupt image", data_case({"data.dataset": "image_folder", "data.root": "{tmp}/imgs"}, broken_image), DataError, r"image '.*a.png' cannot be read"),
    ("cifar missing", data_case({"data.dataset": "cifar10", "data.root": "{tmp}", "model.in_channels": 3}), DataError,
     r"CIFAR-10 files \['data_batch_1'.*not found"),
    ("missing checkpoint", lambda tmp: load_model(tmp / "none.pth"), CheckpointError, r"checkpoint '.*none.pth' does not exist"),
    ("truncated checkpoint", truncated_checkpoint, CheckpointError, r"checkpoint '.*cut.pth' is corrupt or not a PyTorch file"),
    ("seismic checkpoint", seismic_checkpoint, CheckpointError,
     r"'.*model.ckpt' is a SeisMoE/EQTransformer \(seismic\) checkpoint, not a MoEFsDiC one: use it with `moelab seismic"),
    ("pickled code", evil_checkpoint, CheckpointError, r"was refused: it contains Python objects"),
    ("resume nothing", lambda tmp: fit(small(), checkpoint_dir=tmp, resume=tmp / "checkpoint_epoch_9.pth", progress=False), CheckpointError,
     r"--resume '.*checkpoint_epoch_9.pth' does not exist"),
    ("resume folder", lambda tmp: fit(small(), checkpoint_dir=tmp, resume=tmp, progress=False), CheckpointError,
     r"--resume '.*' is a folder: pass one of its checkpoint_epoch_N.pth files"),
    ("resume other architecture", resume_case(small(), small(**{"model.model_channels": 16})), CheckpointError,
     r"does not fit this model architecture \(\d+ shape mismatch\(es\): time_embed.mlp.0.weight: checkpoint \(32, 8\) vs model \(64, 16\)"),
    ("resume other experts", resume_case(small(), small(**{"moe.enabled": False})), CheckpointError,
     r"key\(s\) missing from the checkpoint: .*branches.*unexpected key\(s\): .*moe.router"),
    ("resume weights only", resume_case(small(), small(), full=False), CheckpointError, r"is a weights-only checkpoint \(no optimizer_states\)"),
    ("checkpoint dir is a file", lambda tmp: (tmp / "f").write_text("x") and fit(small(), checkpoint_dir=tmp / "f"), ConfigError,
     r"--checkpoint-dir '.*f' is a file: give a folder"),
    ("guidance nan", guided(float("nan")), ConfigError, r"guidance=nan must be a finite number >= 0"),
    ("guidance inf", guided(float("inf")), ConfigError, r"guidance=inf must be a finite number >= 0"),
    ("compare per-class 0 before training", compare_case(per_class=0), ConfigError, r"--per-class 0 must be >= 1"),
    ("compare steps before training", compare_case(steps=5000), ConfigError, r"steps=5000 must be between 1 and"),
    ("compare out is a file", lambda tmp: (tmp / "f").write_text("x") and compare_case()(tmp / "f"), ConfigError,
     r"--out '.*cmp' lies under '.*f', which is a file"),
    ("cuda without gpu", lambda tmp: fit(small(), checkpoint_dir=tmp, accelerator="cuda"), ConfigError,
     r"--device cuda was requested but no CUDA GPU is available"),
    ("fp16 on cpu", lambda tmp: fit(small(**{"train.precision": "16-mixed"}), checkpoint_dir=tmp), ConfigError, r"16-mixed needs a GPU; on CPU use bf16-mixed"),
]


@pytest.mark.parametrize("make,error,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_message(tmp_path, monkeypatch, make, error, message, capfd):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(error, match=message):
        make(tmp_path)
    assert "pwned" not in capfd.readouterr().out


def test_train_py_prints_one_error_line_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"moe": {"num_expert": 4}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "train.py", "--config", str(bad)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: unknown key 'moe.num_expert'; did you mean 'num_experts'?"
    assert "Traceback" not in r.stderr + r.stdout


def test_compare_checks_sampling_settings_before_training(tmp_path):
    from moelab.diffusion.compare import compare

    with pytest.raises(ConfigError, match="unknown sampler 'euler'"):
        compare(SMALL, tmp_path / "cmp", max_steps=1, progress=False, sampler="euler")
    assert not (tmp_path / "cmp").exists()  # nothing trained, nothing written
