"""MoEFsDiC training through Lightning: exact resume, checkpoints, EMA, DDP, SIGKILL safety,
non-finite loss, progress output, training options and the quick-start commands."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from moelab.checkpoint import safe_load
from moelab.diffusion.config import load_config
from moelab.diffusion.checkpoints import load_model
from moelab.diffusion.training import checkpoints_in, fit
from moelab.diffusion.lit import MoEFsDiCLit
from moelab.errors import CheckpointError, NonFiniteLossError, TrainingInterrupted

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model": {"in_channels": 1, "model_channels": 8, "channel_mults": [1], "image_size": 16},
    "moe": {"num_experts": 4, "k_active": 2, "router_hidden": 8},
    "train": {"batch_size": 16, "lr": 2e-3, "epochs": 2, "log_every": 1, "monitor_interval": 2, "ema_decay": 0.9},
    "data": {"dataset": "digits", "fit": "pad", "subset": 64},
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}




def tiny(**over):
    return load_config(TINY, over)


def write_tiny(path: Path, **over) -> Path:
    cfg = tiny(**over)
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def run(args, cwd, timeout=240, **kw):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout, **kw)


def test_resume_is_exact_and_progress_output(tmp_path, capsys):
    # options that carry state across the resume: warmup+cosine LR, accumulation, clipping, EMA, router jitter
    cfg = tiny(**{"train.lr_schedule": "cosine", "train.warmup_steps": 2, "train.accumulate_grad_batches": 2, "moe.jitter": 0.1})
    full = fit(cfg, checkpoint_dir=tmp_path / "a", max_epochs=2)
    out = capsys.readouterr().out
    assert full.name == "checkpoint_epoch_2.pth"
    assert [p.name for p in checkpoints_in(tmp_path / "a")] == ["checkpoint_epoch_1.pth", "checkpoint_epoch_2.pth"]
    bar = re.compile(r"Epoch 1/2: 100%\|[█ ]+\| 4/4 \[\d\d:\d\d<00:00, +[\d.]+(it/s|s/it), loss=\d+\.\d{4}, dm_loss=\d+\.\d{4}, load_loss=\d+\.\d{4}\]")
    assert bar.search(out), out[-2000:]
    summaries = re.findall(r"\[Epoch (\d)/2\] Avg Loss: (\d+\.\d{4}), Avg DM Loss: (\d+\.\d{4}), Avg Load Loss: (\d+\.\d{4})", out)
    assert [s[0] for s in summaries] == ["1", "2"]
    lam = cfg["train"]["lambda_load"]
    for _, loss, dm, load in summaries:
        assert abs(float(loss) - (float(dm) + lam * float(load))) < 2e-4

    resumed = fit(cfg, checkpoint_dir=tmp_path / "b", max_epochs=2, resume=tmp_path / "a" / "checkpoint_epoch_1.pth", progress=False)
    a, b, e1 = safe_load(full), safe_load(resumed), safe_load(tmp_path / "a" / "checkpoint_epoch_1.pth")
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (1, 4)  # 4 batches / accumulate 2, 2 epochs
    assert max_diff(a["current_model_state"], b["current_model_state"]) <= 1e-6
    assert max_diff(a["state_dict"], b["state_dict"]) <= 1e-6  # EMA weights
    assert max_diff(a["current_model_state"], e1["current_model_state"]) > 1e-4  # the resumed run did train
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert max(float((sa[k]["exp_avg"] - sb[k]["exp_avg"]).abs().max()) for k in sa) <= 1e-6
    assert a["lr_schedulers"] == b["lr_schedulers"]


def test_checkpoint_contents_ema_and_load_model(tmp_path):
    last = fit(tiny(**{"train.keep_last": 2}), checkpoint_dir=tmp_path, max_epochs=3, progress=False)
    assert [p.name for p in checkpoints_in(tmp_path)] == ["checkpoint_epoch_2.pth", "checkpoint_epoch_3.pth"]
    ck = torch.load(last, weights_only=True)  # nothing but plain data inside
    assert ck["hyper_parameters"]["config"] == tiny(**{"train.keep_last": 2, "train.epochs": 3}).to_dict()  # the YAML layout
    assert int(ck["averaging_state"]["n_averaged"]) == ck["global_step"] == 12
    assert max_diff(ck["state_dict"], ck["current_model_state"]) > 0  # EMA differs from the raw weights
    ema_model, cfg = load_model(last)
    raw_model, _ = load_model(last, ema=False)
    assert not ema_model.training and cfg["model"]["model_channels"] == 8
    w = "model.enc_blocks.0.moe.experts.pw1_weight"
    assert torch.equal(ema_model.state_dict()[w[6:]], ck["state_dict"][w])
    assert torch.equal(raw_model.state_dict()[w[6:]], ck["current_model_state"][w])
    assert (tmp_path / "logs" / "csv").is_dir() and any((tmp_path / "logs" / "tensorboard").rglob("events.out.tfevents.*"))
    metrics = (next((tmp_path / "logs" / "csv").rglob("metrics.csv"))).read_text()
    assert "train/loss" in metrics and "epoch/load_loss" in metrics and "moe/model.enc_blocks.0.moe/entropy" in metrics


@pytest.mark.parametrize(
    "over,check",
    [
        ({"train.precision": "bf16-mixed"}, lambda ck: True),
        ({"train.gradient_checkpointing": True}, lambda ck: True),
        ({"train.gradient_checkpointing": [0]}, lambda ck: True),
        ({"train.lr_schedule": "plateau", "train.plateau_patience": 0}, lambda ck: "patience" in ck["lr_schedulers"][0]),
        ({"train.lr_schedule": "constant_with_warmup", "train.warmup_steps": 10}, lambda ck: abs(ck["lr_schedulers"][0]["_last_lr"][0] - 2e-3 * 0.4) < 1e-9),
        ({"moe.enabled": False, "train.ema": False}, lambda ck: "current_model_state" not in ck),
        ({"moe.load_loss": "variance", "freq.enabled": False}, lambda ck: True),
    ],
)
def test_training_options(tmp_path, over, check):
    last = fit(tiny(**over), checkpoint_dir=tmp_path, max_epochs=1, progress=False)
    ck = safe_load(last)
    assert ck["global_step"] == 4 and check(ck)
    model, _ = load_model(last)
    x = torch.zeros(1, 1, 16, 16)
    assert torch.isfinite(model(x, torch.tensor([10]), torch.tensor([3]))[0]).all()


def test_non_finite_loss_stops_with_clear_error(tmp_path, monkeypatch):
    from moelab.diffusion.losses import MoELoss

    real = MoELoss.forward
    calls = {"n": 0}

    def flaky(self, pred, noise, logits):
        calls["n"] += 1
        loss, dm, load = real(self, pred, noise, logits)
        return (loss * float("nan"), dm, load) if calls["n"] == 6 else (loss, dm, load)

    monkeypatch.setattr(MoELoss, "forward", flaky)
    with pytest.raises(NonFiniteLossError, match=r"non-finite at step 5 \(epoch 2, batch 1\).*last good checkpoint is '.*checkpoint_epoch_1\.pth' \(untouched\)"):
        fit(tiny(), checkpoint_dir=tmp_path, max_epochs=3, progress=False)
    assert [p.name for p in checkpoints_in(tmp_path)] == ["checkpoint_epoch_1.pth"]
    ck = safe_load(tmp_path / "checkpoint_epoch_1.pth")
    assert ck["global_step"] == 4 and all(torch.isfinite(v).all() for v in ck["current_model_state"].values())


def test_ddp_two_cpu_processes(tmp_path):
    cfgfile = write_tiny(tmp_path / "tiny.yaml")
    r = run(["train.py", "--config", str(cfgfile), "--device", "cpu", "--devices", "2", "--epochs", "1",
             "--checkpoint-dir", str(tmp_path / "ck"), "--no-progress"], cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("[Epoch 1/1] Avg Loss:") == 1  # printed by rank 0 only
    ck = safe_load(tmp_path / "ck" / "checkpoint_epoch_1.pth")
    assert ck["global_step"] == 2  # 64 images / 2 ranks / batch 16: half the single-process steps


def _sigterm_after(epoch: int, batch_idx: int):
    """An ``on_train_batch_end`` hook that sends this process SIGTERM after batch ``batch_idx`` of
    ``epoch`` (both from 0)."""

    def hook(self, outputs, batch, idx):
        if (self.current_epoch, idx) == (epoch, batch_idx):
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


@pytest.mark.parametrize("accumulate", [1, 2])
def test_sigterm_mid_epoch_saves_the_state_and_resume_continues_exactly(tmp_path, monkeypatch, capsys, accumulate):
    # 4 batches per epoch; SIGTERM after 6 optimizer steps (accumulate 1: batch 2 of epoch 2; accumulate 2:
    # the last batch of epoch 3, whose checkpoint checkpoint_every: 2 skips). Options that carry state across it:
    # warmup + cosine LR, EMA, router jitter (global RNG), the epoch's running loss average.
    cfg = tiny(**{"train.lr_schedule": "cosine", "train.warmup_steps": 2, "moe.jitter": 0.1, "train.epochs": 4,
                  "train.checkpoint_every": 2, "train.accumulate_grad_batches": accumulate})
    full = fit(cfg, checkpoint_dir=tmp_path / "a", progress=False)
    averages = re.findall(r"\[Epoch \d/4\] Avg Loss: .*", capsys.readouterr().out)
    monkeypatch.setattr(MoEFsDiCLit, "on_train_batch_end", _sigterm_after(*((1, 1) if accumulate == 1 else (2, 3))), raising=False)
    with pytest.raises(TrainingInterrupted) as stop:
        fit(cfg, checkpoint_dir=tmp_path / "b", progress=False)
    monkeypatch.undo()
    saved = tmp_path / "b" / ("checkpoint_epoch_2_step_6.pth" if accumulate == 1 else "checkpoint_epoch_3.pth")
    assert stop.value.exit_code == 143 and saved.is_file()
    at = "in epoch 2" if accumulate == 1 else "at the end of epoch 3"
    assert f"training stopped by SIGTERM {at}, after step 6: " in str(stop.value)
    assert str(stop.value).endswith(f"the newest checkpoint is '{saved}'; continue with moelab diffusion train --resume {saved} "
                                    f"(or python train.py --resume {saved})")
    assert safe_load(saved)["global_step"] == 6  # the last finished batch is in it
    capsys.readouterr()
    resumed = fit(cfg, checkpoint_dir=tmp_path / "c", resume=saved, progress=False)
    a, b = safe_load(full), safe_load(resumed)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    for key in ("current_model_state", "state_dict"):  # raw and EMA weights
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    # the epoch the stop cut in two prints the same average as in the uninterrupted run
    first = 2 if accumulate == 1 else 4
    assert re.findall(r"\[Epoch \d/4\] Avg Loss: .*", capsys.readouterr().out) == averages[first - 1 :]


def test_a_second_sigterm_supersedes_the_first_stop_under_keep_last(tmp_path, monkeypatch):
    cfg = tiny(**{"train.epochs": 3, "train.keep_last": 2})
    monkeypatch.setattr(MoEFsDiCLit, "on_train_batch_end", _sigterm_after(1, 0), raising=False)
    with pytest.raises(TrainingInterrupted):
        fit(cfg, checkpoint_dir=tmp_path, progress=False)
    first = tmp_path / "checkpoint_epoch_2_step_5.pth"
    assert first.is_file()
    monkeypatch.setattr(MoEFsDiCLit, "on_train_batch_end", _sigterm_after(1, 2), raising=False)
    with pytest.raises(TrainingInterrupted):
        fit(cfg, checkpoint_dir=tmp_path, resume=first, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["checkpoint_epoch_1.pth", "checkpoint_epoch_2_step_7.pth"]


def test_sigterm_in_a_gradient_accumulation_cycle_saves_nothing_and_names_the_last_checkpoint(tmp_path, monkeypatch):
    # accumulate 3 over 4 batches: 2 optimizer steps per epoch, the second from the last batch alone; after
    # the first batch of epoch 2 its gradient waits for two more batches and cannot be saved: the periodic
    # checkpoint of epoch 1 is the newest
    cfg = tiny(**{"train.epochs": 4, "train.accumulate_grad_batches": 3})
    monkeypatch.setattr(MoEFsDiCLit, "on_train_batch_end", _sigterm_after(1, 0), raising=False)
    with pytest.raises(TrainingInterrupted) as stop:
        fit(cfg, checkpoint_dir=tmp_path, progress=False)
    assert [p.name for p in tmp_path.glob("*.pth")] == ["checkpoint_epoch_1.pth"]
    assert str(stop.value).startswith("training stopped by SIGTERM in epoch 2, after step 2: ")
    assert f"continue with moelab diffusion train --resume {tmp_path / 'checkpoint_epoch_1.pth'} " in str(stop.value)


def test_a_checkpoint_the_disk_refuses_stops_training_with_one_clear_error(tmp_path, monkeypatch):
    import errno

    import moelab.checkpoint

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(moelab.checkpoint.os, "fsync", full)
    with pytest.raises(CheckpointError, match=r"could not write '.*checkpoint_epoch_1\.pth' \([\d.]+ MB\): No space left on device; "
                       r"nothing was written"):
        fit(tiny(), checkpoint_dir=tmp_path, progress=False)
    assert list(tmp_path.glob("*.pth*")) == [] and not list(tmp_path.glob(".*.tmp"))


def test_sigterm_and_ctrl_c_exit_with_the_signal_status_and_say_how_to_continue(tmp_path):
    cfgfile = write_tiny(tmp_path / "tiny.yaml", **{"data.subset": 256, "train.epochs": 200, "train.ema": False})
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        ckdir = tmp_path / sig.name
        p = subprocess.Popen([sys.executable, "train.py", "--config", str(cfgfile), "--device", "cpu", "--checkpoint-dir", str(ckdir),
                              "--no-progress"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not ignored, even under a background shell
        try:
            deadline = time.time() + 180
            while not checkpoints_in(ckdir) and time.time() < deadline and p.poll() is None:
                time.sleep(0.05)
            p.send_signal(sig)
            _, err = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == code, err[-2000:]
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"interrupted: training stopped by {'SIGTERM' if code == 143 else 'Ctrl-C (SIGINT)'} "), err[-2000:]
        newest = re.search(r"the newest checkpoint is '([^']+)'; continue with moelab diffusion train --resume (\S+) \(or python train.py --resume (\S+)\)$", line)
        assert newest and newest.group(1) == newest.group(2) == newest.group(3) and Path(newest.group(1)).is_file(), line
        safe_load(newest.group(1))  # complete and loadable


def test_sigkill_mid_training_leaves_loadable_checkpoints_and_resume_continues(tmp_path):
    cfgfile = write_tiny(tmp_path / "tiny.yaml", **{"data.subset": 256, "train.epochs": 200, "train.ema": False})
    ckdir = tmp_path / "ck"
    p = subprocess.Popen([sys.executable, "train.py", "--config", str(cfgfile), "--device", "cpu", "--checkpoint-dir", str(ckdir),
                          "--no-progress"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while len(checkpoints_in(ckdir)) < 2 and time.time() < deadline and p.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)  # somewhere inside the next epoch (or its checkpoint write)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    saved = checkpoints_in(ckdir)
    assert len(saved) >= 2, "training did not reach 2 checkpoints before the deadline"
    for path in saved:
        assert safe_load(path)["global_step"] > 0
    newest = saved[-1]
    n = int(re.search(r"(\d+)", newest.name).group(1))
    r = run(["train.py", "--resume", str(newest), "--epochs", str(n + 1), "--device", "cpu", "--checkpoint-dir", str(ckdir), "--no-progress"], cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"[Epoch {n + 1}/{n + 1}]" in r.stdout
    after = safe_load(ckdir / f"checkpoint_epoch_{n + 1}.pth")
    assert after["global_step"] == safe_load(newest)["global_step"] + 16


def test_quickstart_commands(tmp_path, monkeypatch):
    """The quick-start's commands verbatim (run in a scratch folder), plus tiny size overrides."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_diffusion_data import write_cifar

    write_cifar(tmp_path / "data" / "cifar-10-batches-py", n=2)
    small = ["--max-steps", "1", "--batch-size", "2", "--set", "model.model_channels=8", "--set", "model.image_size=32",
             "--set", "moe.router_hidden=8", "--no-progress"]
    r = run([str(ROOT / "train.py"), "--config", str(ROOT / "configs/default.yaml"), "--device", "cpu", *small], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "checkpoint_epoch_1.pth").exists()
    from moelab.cli import main as moelab_main
    from moelab.diffusion.train_cli import main as train_main

    monkeypatch.chdir(tmp_path)  # the same command in-process: resume from the quick-start's path
    assert train_main(["--config", str(ROOT / "configs/default.yaml"), "--resume", "checkpoints/checkpoint_epoch_1.pth",
                       *small[:1], "2", *small[2:]]) == 0
    assert safe_load(checkpoints_in(tmp_path / "checkpoints")[-1])["global_step"] == 2
    for name in ("no_moe", "no_freq", "no_dsconv", "moe_variants", "minimal"):
        out = tmp_path / name
        assert train_main(["--config", str(ROOT / f"configs/{name}.yaml"), "--device", "cpu", "--checkpoint-dir", str(out), *small]) == 0
        assert safe_load(out / "checkpoint_epoch_1.pth")["hyper_parameters"]["config"]["moe"]["enabled"] == (name not in ("no_moe", "minimal"))
    assert moelab_main(["diffusion", "train", "--config", str(ROOT / "configs/no_moe.yaml"), "--checkpoint-dir", str(tmp_path / "cli"), *small]) == 0
    assert (tmp_path / "cli" / "checkpoint_epoch_1.pth").exists()


def test_quickstart_custom_training_loop():
    """The quick-start's "custom training loop" example on digits (add_noise from moelab)."""
    from moelab import MoEFsDiC_UNet, MoELoss
    from moelab.diffusion.data import load_split
    from moelab.diffusion.noise import add_noise

    config = tiny()
    dataloader = torch.utils.data.DataLoader(load_split(config, "train"), batch_size=16)
    torch.manual_seed(0)
    model = MoEFsDiC_UNet(config)
    criterion = MoELoss(lambda_load=0.01)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(3):
        for images, labels in dataloader:
            t = torch.randint(0, 1000, (images.size(0),))
            noise = torch.randn_like(images)
            noisy_images = add_noise(images, t, noise)
            noise_pred, moe_logits = model(noisy_images, t, labels)
            loss, dm_loss, load_loss = criterion(noise_pred, noise, moe_logits)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(dm_loss.item())
    assert sum(losses[-4:]) < sum(losses[:4])


def test_non_finite_loss_hint_names_compile_only_when_compiled():
    """With ``train.compile`` the NaN error also points at the compiled kernels (a stale inductor
    cache from another CPU capability gave NaN from the first step); without it, it does not."""
    from moelab.diffusion.lit import MoEFsDiCLit

    plain = MoEFsDiCLit(load_config("digits"))._non_finite_fix()
    compiled = MoEFsDiCLit(load_config("digits", {"train.compile": True}))._non_finite_fix()
    assert plain.startswith("lower train.lr") and "compile" not in plain
    assert compiled.startswith(plain) and "train.compile: false" in compiled and "TORCHINDUCTOR_CACHE_DIR" in compiled
