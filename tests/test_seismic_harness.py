"""The benchmark harness end to end on a generated data set (CPU, small windows).

Acceptance: SeisMoE and EQTransformer trained a few epochs with the harness beat an untrained model
on all three pick-benchmark tasks, and their detection AUCs differ by at most 0.01. Also: exact
resume of SeisMoE training, atomic checkpoints under weights/<name>/, and the guide's commands.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("seisbench")

import torch  # noqa: E402

from moelab.checkpoint import AtomicCheckpointIO, safe_load  # noqa: E402
from moelab.seismic import harness, synth  # noqa: E402
from moelab.seismic.config import validate  # noqa: E402
from moelab.seismic.data import open_dataset, resolve_data  # noqa: E402
from moelab.seismic.evaluate import evaluate_module  # noqa: E402



REPO = Path(__file__).resolve().parents[1]
IN_SAMPLES = 1001  # 10 s model windows keep CPU training fast; task windows shrink to 5 s (half, as 30 of 60 s)
QUIET = {"enable_progress_bar": False, "num_sanity_val_steps": 0, "limit_val_batches": 2}
# acceptance run: small but learnable (STEAD-like SNRs, real event trains, 30 % noise traces)
N_TRACES, N_SAMPLES, EPOCHS, BATCH, LR, SIGMA = 400, 2000, 18, 16, 1e-3, 40


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
    """Both models trained with the harness, evaluated on dev/test; plus the untrained baseline."""
    weights = tmp_path_factory.mktemp("weights")
    results = {}
    for model in ("SeisMoE", "EQTransformer"):
        cfg = validate(config(model, dataset))
        best = harness.train(cfg, weights_dir=weights, trainer_overrides=QUIET, check_weights=False)
        stats, out = harness.evaluate(cfg, best)
        results[model] = (stats, best, out)
    cfg = validate(config("SeisMoE", dataset))
    ds = open_dataset(resolve_data(str(dataset)))
    targets = harness.ensure_targets(ds, dataset / "targets", in_samples=IN_SAMPLES)
    results["untrained"] = (evaluate_module(harness.build_module(cfg), ds, targets), None, None)
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
def test_trained_beats_untrained_on_all_tasks(trained, model):
    s, base = trained[model][0], trained["untrained"][0]
    assert s["test_det_auc"] > base["test_det_auc"] + 0.05, "task 1 detection AUC"
    assert s["test_phase_mcc"] > base["test_phase_mcc"] + 0.05, "task 2 phase MCC"
    assert s["test_P_mae_s"] < base["test_P_mae_s"], "task 3 P residual MAE"
    assert s["test_S_mae_s"] < base["test_S_mae_s"], "task 3 S residual MAE"


def test_seismoe_matches_eqtransformer_detection_auc(trained):
    a, b = trained["SeisMoE"][0]["test_det_auc"], trained["EQTransformer"][0]["test_det_auc"]
    assert math.isfinite(a) and math.isfinite(b)
    assert abs(a - b) <= 0.01


def test_exact_resume_seismoe(dataset, tmp_path):
    """Two epochs in one go == one epoch, stop, resume for the second (<= 1e-6)."""
    raw = config("SeisMoE", dataset, max_epochs=2, batch_size=8, training_fraction=0.1)
    over = {**QUIET, "limit_val_batches": 1}
    full = harness.train(validate(raw), weights_dir=tmp_path / "a", trainer_overrides=over, check_weights=False)
    harness.train(validate({**raw, "max_epochs": 1}), weights_dir=tmp_path / "b", trainer_overrides=over, check_weights=False)
    resumed = harness.train(validate(raw), weights_dir=tmp_path / "b", resume=True, trainer_overrides=over, check_weights=False)
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

    with pytest.raises(CheckpointError, match="no '.*last.ckpt' to resume from"):
        harness.train(validate(config("SeisMoE", dataset)), weights_dir=tmp_path, resume=True, check_weights=False)


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
