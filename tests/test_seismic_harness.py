"""The benchmark harness end to end on a generated data set (CPU, small windows).

Workflow checks only: training writes atomic checkpoints under weights/<name>/, evaluation writes
its predictions and results, and the thresholds it applies to test are the ones tuned on dev. Also:
exact resume of SeisMoE training and the guide's commands offline.

Whether the trained models beat an untrained one, and how SeisMoE compares with EQTransformer, is
a claim about trained models: it lives in `bench/seismoe_learning.py` (several seeds, spread
printed), not here. On one short CPU run the margins were within run-to-run spread: e.g. detection
AUC 0.955 (SeisMoE) / 0.961 (EQTransformer) vs 0.899 untrained here, 0.962 vs 0.986 on another
machine, and P MAE 1.22 / 1.19 s vs 1.27 s untrained.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("seisbench")

import torch  # noqa: E402

from moelab.checkpoint import AtomicCheckpointIO, safe_load  # noqa: E402
from moelab.seismic import harness, synth  # noqa: E402
from moelab.seismic.config import validate  # noqa: E402
from moelab.seismic.evaluate import task1_metrics, task23_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IN_SAMPLES = 1001  # 10 s model windows keep CPU training fast; task windows shrink to 5 s (half, as 30 of 60 s)
QUIET = {"enable_progress_bar": False, "num_sanity_val_steps": 0, "limit_val_batches": 2}
# a workflow run: small data, two epochs (quality is measured in bench/seismoe_learning.py)
N_TRACES, N_SAMPLES, EPOCHS, BATCH, LR, SIGMA = 160, 2000, 2, 16, 1e-3, 40


def config(model: str, data: Path, **extra) -> dict:
    args = {"base_model": None, "lr": LR, "sigma": SIGMA, "in_samples": IN_SAMPLES}
    if model == "SeisMoE":
        args.update(num_experts=4, num_experts_per_token=2, moe_loss_coef=0.01)
    raw = {"model": model, "data": str(data), "model_args": args, "batch_size": BATCH, "max_epochs": EPOCHS, "seed": 11}
    raw.update(extra)
    return raw


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synth.make_dataset(tmp_path_factory.mktemp("harness") / "synth", n_traces=N_TRACES, seed=21, n_samples=N_SAMPLES)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """Both models trained with the harness for two epochs, then evaluated on dev/test."""
    weights = tmp_path_factory.mktemp("weights")
    results = {}
    for model in ("SeisMoE", "EQTransformer"):
        cfg = validate(config(model, dataset))
        best = harness.train(cfg, weights_dir=weights, trainer_overrides=QUIET, check_weights=False)
        stats, out = harness.evaluate(cfg, best)
        results[model] = (stats, best, out)
    print("\n" + json.dumps({k: {m: round(v, 4) for m, v in r[0].items() if m.startswith("test_")} for k, r in results.items()}, indent=1))
    return results


def test_checkpoints_written_under_weights_name(trained):
    stats, best, out = trained["SeisMoE"]
    assert best.name == "model.ckpt" and best.parent.name == "SeisMoE_synth"
    assert (best.parent / "last.ckpt").exists() and (best.parent / "config.json").exists()
    ckpt = torch.load(best, weights_only=True)  # plain types only
    assert ckpt["hyper_parameters"]["num_experts"] == 4
    assert not list(best.parent.glob(".*.tmp"))  # no temp files left behind by atomic writes
    assert (out / "results.csv").exists() and (out / "test_task23.csv").exists()
    assert any(best.parent.glob("version_*/metrics.csv"))


@pytest.mark.parametrize("model", ["SeisMoE", "EQTransformer"])
def test_evaluation_applies_dev_tuned_thresholds_to_test(trained, model):
    stats, _, out = trained[model]
    preds = {f"{split}_{task}": pd.read_csv(out / f"{split}_{task}.csv") for split in ("dev", "test") for task in ("task1", "task23")}
    # every window of the targets was predicted, with scores in [0, 1]
    assert len(preds["test_task1"]) > 0 and len(preds["dev_task23"]) > 0
    for df in preds.values():
        for col in ("score_detection", "score_p_or_s"):
            if col in df and len(df):
                assert df[col].between(0, 1).all()
    # the thresholds are a function of the dev predictions alone: recomputed from dev with any test set, they agree
    # (to 1e-12: the saved predictions went through CSV, which pandas < 2 writes with 16 significant digits)
    assert task1_metrics(preds["dev_task1"], preds["dev_task1"])["det_threshold"] == pytest.approx(stats["det_threshold"], rel=1e-12)
    assert task23_metrics(preds["dev_task23"], preds["dev_task23"])["phase_threshold"] == pytest.approx(stats["phase_threshold"], rel=1e-12)
    # and the reported test metrics are those of the saved test predictions at those thresholds
    again = {**task1_metrics(preds["dev_task1"], preds["test_task1"]), **task23_metrics(preds["dev_task23"], preds["test_task23"])}
    for key in ("test_det_f1", "test_det_auc", "test_phase_mcc", "test_P_mae_s", "test_S_mae_s"):
        assert math.isfinite(stats[key]) and again[key] == pytest.approx(stats[key], rel=1e-12, abs=1e-12), key
    results = pd.read_csv(out / "results.csv")
    assert results["det_threshold"].iloc[0] == pytest.approx(stats["det_threshold"], rel=1e-12)


@pytest.mark.parametrize("model", ["SeisMoE", "EQTransformer"])
def test_evaluation_looks_at_the_heads_on_dev_windows_around_p(trained, dataset, model):
    """results.csv carries each head's health, exactly what `head_health` says of the evaluated model
    on the dev windows around P; the eval command prints it, and a warning for a capped pick head."""
    import seisbench.data as sbd

    from moelab.seismic.cli import heads_report
    from moelab.seismic.heads import event_windows, head_health, health_stats

    stats, best, out = trained[model]
    module = harness.load_for_eval(validate(config(model, dataset)), best)
    expected = health_stats(head_health(module.model, event_windows(sbd.WaveformDataset(dataset, sampling_rate=100), IN_SAMPLES)))
    assert {k: stats[k] for k in expected} == expected
    row = pd.read_csv(out / "results.csv").iloc[0]
    assert {k: float(row[k]) for k in expected} == pytest.approx(expected, rel=1e-12)
    lines = heads_report(stats, "dev")
    assert lines[0].startswith("heads (dev)") and "P head:" in lines[0] and "S head:" in lines[0]
    assert len(lines) == 1 + sum(stats[f"{h}_lifting"] == 0 for h in ("detection", "P", "S"))
    capped = {**stats, "S_lifting": 0.0}
    assert any("the S head cannot output more than" in line for line in heads_report(capped, "dev"))
    # a P-only split (no S windows): the S head's range is no one's concern
    assert not any("S head cannot" in line for line in heads_report({**capped, "dev_S_n": 0.0}, "dev"))


def test_routing_command_tallies_the_trained_model_by_metadata_group(trained, tmp_path, capsys):
    """`moelab seismic routing` on the trained SeisMoE: a table per MoE layer over the groups of the
    column, the same report as JSON; an EQTransformer checkpoint is one clear error."""
    from moelab.cli import main

    _, best, _ = trained["SeisMoE"]
    cfg = best.parent / "config.json"
    argv = ["seismic", "routing", "--model_path", str(best), "--config", str(cfg), "--by", "trace_category", "--task", "task1"]
    assert main([*argv, "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report) == {"transformer_d0.ff", "transformer_d.ff"} and "normalised mutual information" in out
    for r in report.values():
        assert r["groups"] == ["earthquake_local", "noise"] and min(r["assignments"]) > 0
        assert all(abs(sum(row) - 1) < 1e-3 for row in r["shares"])
    _, eqt, _ = trained["EQTransformer"]
    assert main(["seismic", "routing", "--model_path", str(eqt), "--config", str(eqt.parent / "config.json")]) == 2
    assert "no MoE layers" in capsys.readouterr().err


def test_exact_resume_seismoe(dataset, tmp_path):
    """Two epochs in one go == one epoch, stop, resume for the second (<= 1e-6)."""
    raw = config("SeisMoE", dataset, max_epochs=2, batch_size=8, training_fraction=0.1)
    over = {**QUIET, "limit_val_batches": 1}
    full = harness.train(validate(raw), weights_dir=tmp_path / "a", trainer_overrides=over, check_weights=False)
    harness.train(validate({**raw, "max_epochs": 1}), weights_dir=tmp_path / "b", trainer_overrides=over, check_weights=False)
    last_b = tmp_path / "b" / "SeisMoE_synth" / "last.ckpt"
    resumed = harness.train(validate(raw), weights_dir=tmp_path / "b", resume=last_b, trainer_overrides=over, check_weights=False)
    a = safe_load(full.parent / "last.ckpt")
    b = safe_load(resumed.parent / "last.ckpt")
    assert a["epoch"] == b["epoch"] == 1 and a["global_step"] == b["global_step"] > 0
    for k, v in a["state_dict"].items():
        assert torch.allclose(v.float(), b["state_dict"][k].float(), atol=1e-6, rtol=0), k
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in opt_a:
        assert torch.allclose(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"], atol=1e-6, rtol=0)


def test_resume_without_checkpoint_is_a_clear_error(dataset, tmp_path):
    from moelab.errors import CheckpointError

    with pytest.raises(CheckpointError, match="--resume '.*last.ckpt' does not exist: pass a training checkpoint such as"):
        harness.train(validate(config("SeisMoE", dataset)), weights_dir=tmp_path, resume=tmp_path / "x" / "last.ckpt", check_weights=False)


def test_sigterm_exits_143_naming_last_ckpt_to_resume_from(dataset, tmp_path, monkeypatch):
    """SIGTERM inside epoch 2 (Lightning alone would exit 0): `TrainingInterrupted` with exit status
    143 naming last.ckpt, the end of epoch 1, as the checkpoint to continue from with --resume."""
    import os
    import signal

    from moelab.errors import TrainingInterrupted
    from moelab.seismic.lit import SeisBenchModuleLit

    def stop(self, outputs, batch, batch_idx):
        if (self.current_epoch, batch_idx) == (1, 0):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(SeisBenchModuleLit, "on_train_batch_end", stop, raising=False)
    raw = config("SeisMoE", dataset, batch_size=8, training_fraction=0.3, max_epochs=3)  # several batches per epoch
    with pytest.raises(TrainingInterrupted) as info:
        harness.train(validate(raw), weights_dir=tmp_path, trainer_overrides={**QUIET, "limit_val_batches": 1}, check_weights=False)
    last = tmp_path / "SeisMoE_synth" / "last.ckpt"
    assert info.value.exit_code == 143 and safe_load(last)["epoch"] == 0
    assert str(info.value).startswith("training stopped by SIGTERM in epoch 2, after step ")
    assert str(info.value).endswith(f"the newest checkpoint is '{last}'; continue with --resume {last}")


def test_atomic_checkpoint_io_is_the_trainer_plugin(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 0}, tmp_path / "x.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "x.ckpt")["state_dict"]["w"], torch.ones(3))


def test_guide_commands_offline(tmp_path):
    """`python benchmark/train.py configs/stead_seismoe.json` offline: one clear error, exit 2."""
    import subprocess
    import sys

    import socket
    from urllib.parse import urlparse

    import seisbench

    try:
        socket.getaddrinfo(urlparse(seisbench.remote_root).hostname, 443)
        pytest.skip("SeisBench's server is reachable: the run would download STEAD instead of failing")
    except OSError:
        pass
    r = subprocess.run([sys.executable, str(REPO / "benchmark" / "train.py"), str(REPO / "configs" / "stead_seismoe.json")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: " in r.stderr and "Traceback" not in r.stderr
    assert "SeisBench data set 'STEAD' is not in SeisBench's cache" in r.stderr
    assert "local SeisBench folder" in r.stderr
    assert "base_model: pretrained EQTransformer weights 'stead'" in r.stderr


def _tiny_seismoe(dataset, **extra) -> dict:
    return config("SeisMoE", dataset, batch_size=8, training_fraction=0.1, **extra)


def test_last_ckpt_is_the_end_of_every_epoch_even_when_val_loss_worsens(dataset, tmp_path, monkeypatch):
    """last.ckpt must hold epoch N after N epochs. Lightning's save_last only copied on a new best,
    so a val_loss that stops improving left last.ckpt behind; here val_loss grows every epoch."""
    from moelab.seismic.lit import EQTransformerLit

    real = EQTransformerLit.shared_step

    def worsening(self, batch, stage):
        if stage != "val":
            return real(self, batch, stage)
        weights = self.loss_weights
        self.loss_weights = tuple(w * 10.0**self.current_epoch for w in weights)
        try:
            return real(self, batch, stage)
        finally:
            self.loss_weights = weights

    monkeypatch.setattr(EQTransformerLit, "shared_step", worsening)
    epochs = 3
    best = harness.train(validate(_tiny_seismoe(dataset, max_epochs=epochs)), weights_dir=tmp_path,
                         trainer_overrides={**QUIET, "limit_val_batches": 1}, check_weights=False)
    last, top = safe_load(best.parent / "last.ckpt"), safe_load(best)
    assert top["epoch"] == 0  # the first epoch stayed the best
    assert last["epoch"] == epochs - 1 and last["global_step"] == epochs * (top["global_step"])
    assert not list(best.parent.glob(".*.tmp"))


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(dataset, tmp_path):
    """benchmark/train.py killed with SIGKILL inside an epoch: last.ckpt on disk is the end of the
    latest finished epoch (at most the epoch in progress is recomputed) and --resume from it ends
    with the weights of an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    epochs = 5  # room after the kill point: epoch times vary a lot on a busy machine
    raw = config("SeisMoE", dataset, batch_size=8, training_fraction=0.3, max_epochs=epochs,
                 trainer_args={"enable_progress_bar": False, "num_sanity_val_steps": 0, "limit_val_batches": 1})
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps(raw))
    full = harness.train(validate(raw), weights_dir=tmp_path / "full", check_weights=False)
    a = safe_load(full.parent / "last.ckpt")
    steps_per_epoch = a["global_step"] // epochs
    assert a["epoch"] == epochs - 1 and a["global_step"] == epochs * steps_per_epoch

    weights = tmp_path / "killed"
    last = weights / full.parent.name / "last.ckpt"
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    p = subprocess.Popen([sys.executable, str(REPO / "benchmark" / "train.py"), str(cfg_path), "--weights_dir", str(weights)],
                         cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen, seen_at, epoch_s = -1, None, None
    try:
        deadline = time.time() + 240
        while p.poll() is None and time.time() < deadline:
            if last.exists():
                e = safe_load(last)["epoch"]
                if e > seen:
                    now = time.time()
                    epoch_s = None if seen_at is None else now - seen_at
                    seen, seen_at = e, now
                if seen >= 1 and epoch_s is not None:
                    time.sleep(epoch_s / 3)  # inside the next epoch
                    p.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.02)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-epoch"
    b = safe_load(last)
    assert seen <= b["epoch"] < epochs - 1  # killed before the end, nothing finished was lost
    assert b["global_step"] == (b["epoch"] + 1) * steps_per_epoch  # an end-of-epoch state

    resumed = harness.train(validate(raw), weights_dir=weights, resume=last, check_weights=False)
    c = safe_load(resumed.parent / "last.ckpt")
    assert (c["epoch"], c["global_step"]) == (a["epoch"], a["global_step"])
    for k, v in a["state_dict"].items():
        assert torch.allclose(v.float(), c["state_dict"][k].float(), atol=1e-6, rtol=0), k


def test_resume_takes_a_path_in_both_applications_scripts():
    """The README's `python benchmark/train.py CONFIG --resume weights/<name>/last.ckpt` parses, as train.py's does."""
    import argparse

    from moelab.seismic import cli

    args = cli.add_train_args(argparse.ArgumentParser()).parse_args(["configs/demo_seismoe.json", "--resume", "weights/SeisMoE_synth/last.ckpt"])
    assert args.resume == "weights/SeisMoE_synth/last.ckpt" and args.config == "configs/demo_seismoe.json"
    assert cli.add_train_args(argparse.ArgumentParser()).parse_args(["configs/demo_seismoe.json"]).resume is None


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_lr_schedule_falls_to_zero_and_resumes_exactly(dataset, tmp_path, monkeypatch, schedule):
    """``model_args.lr_schedule``: the rate follows diffusers' schedule over the run's optimizer
    steps (0 after the last), and a run stopped after its first epoch resumes on the same schedule
    to the weights, optimizer and scheduler state of an uninterrupted run."""
    from diffusers.optimization import get_scheduler

    from moelab.seismic.lit import SeisMoELit

    raw = _tiny_seismoe(dataset, max_epochs=2)
    raw["model_args"] = {**raw["model_args"], "lr_schedule": schedule, "router_lr": 2 * LR}
    over = {**QUIET, "limit_val_batches": 1}
    full = harness.train(validate(raw), weights_dir=tmp_path / "a", trainer_overrides=over, check_weights=False)
    a = safe_load(full.parent / "last.ckpt")
    steps = a["global_step"]
    (sched,) = a["lr_schedulers"]
    assert sched["last_epoch"] == steps and sched["base_lrs"] == [LR, 2 * LR]  # the rest, then the routers
    assert [g["lr"] for g in a["optimizer_states"][0]["param_groups"]] == [0.0, 0.0]
    reference = get_scheduler(schedule, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), num_warmup_steps=0, num_training_steps=steps)
    halfway = []
    for _ in range(steps // 2):
        reference.optimizer.step()
        reference.step()
        halfway.append(reference.get_last_lr()[0])

    real = SeisMoELit.on_train_epoch_start

    def stop_at_second_epoch(self):
        real(self)
        if self.current_epoch == 1:
            lrs = [g["lr"] for g in self.trainer.optimizers[0].param_groups]
            assert lrs == pytest.approx([LR * halfway[-1], 2 * LR * halfway[-1]], rel=1e-12)
            raise RuntimeError("stopped for the test")

    monkeypatch.setattr(SeisMoELit, "on_train_epoch_start", stop_at_second_epoch)
    with pytest.raises(RuntimeError, match="stopped for the test"):
        harness.train(validate(raw), weights_dir=tmp_path / "b", trainer_overrides=over, check_weights=False)
    monkeypatch.undo()
    last_b = tmp_path / "b" / full.parent.name / "last.ckpt"
    assert safe_load(last_b)["epoch"] == 0
    resumed = harness.train(validate(raw), weights_dir=tmp_path / "b", resume=last_b, trainer_overrides=over, check_weights=False)
    b = safe_load(resumed.parent / "last.ckpt")
    assert b["global_step"] == steps and b["lr_schedulers"] == a["lr_schedulers"]
    for k, v in a["state_dict"].items():
        assert torch.allclose(v.float(), b["state_dict"][k].float(), atol=1e-6, rtol=0), k
