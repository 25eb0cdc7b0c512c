"""Evaluation during training (`moelab.diffusion.eval_callback`): fires at epochs N, 2N, ...; grid,
JSON, CSV and TensorBoard written; the metrics come from the EMA weights (re-scoring the best
checkpoint's EMA weights gives the logged number); the kept checkpoint is the best logged one; and
training ends with exactly the weights it has without the evaluation."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from moelab.checkpoint import safe_load
from moelab.diffusion.config import load_config
from moelab.diffusion.training import checkpoints_in, fit

TINY = {
    "model": {"in_channels": 1, "model_channels": 8, "channel_mults": [1], "image_size": 16},
    "moe": {"num_experts": 4, "k_active": 2, "router_hidden": 8},
    "train": {"batch_size": 16, "lr": 2e-3, "epochs": 4, "log_every": 1, "monitor_interval": 2, "ema_decay": 0.9,
              "checkpoint_every": 4},
    "data": {"dataset": "digits", "fit": "pad", "subset": 64},
}
EVAL = {"train.eval_every_epochs": 2, "train.eval_per_class": 3}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny 4-epoch run evaluating every 2 epochs (3 samples per class) and one without evaluation."""
    tmp = tmp_path_factory.mktemp("evalrun")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOELAB_CACHE", str(tmp / "cache"))  # the judge classifier, trained once for this data
    try:
        last = fit(load_config(TINY, EVAL), checkpoint_dir=tmp / "ck", progress=False)
        plain = fit(load_config(TINY), checkpoint_dir=tmp / "plain", progress=False)
    finally:
        mp.undo()
    return tmp, last, plain


def test_fires_at_the_right_epochs_and_writes_every_log(run):
    tmp, _, _ = run
    ev = tmp / "ck" / "logs" / "eval"
    assert sorted(p.name for p in ev.iterdir()) == ["grid_epoch_2.png", "grid_epoch_4.png", "metrics_epoch_2.json", "metrics_epoch_4.json"]
    recs = [json.loads((ev / f"metrics_epoch_{e}.json").read_text()) for e in (2, 4)]
    for e, r in zip((2, 4), recs, strict=True):
        assert r["epoch"] == e and r["num_samples"] == 30 and r["per_class"] == 3 and r["ema"] is True
        assert r["global_step"] == e * 4 and 0 <= r["accuracy"] <= 1 and r["frechet_distance"] > 0
    rows = list(csv.DictReader((tmp / "ck" / "logs" / "csv" / "version_0" / "metrics.csv").open()))
    logged = [(int(r["epoch"]), float(r["eval/frechet_distance"]), float(r["eval/accuracy"])) for r in rows if r.get("eval/frechet_distance")]
    assert logged == [(e - 1, pytest.approx(r["frechet_distance"], rel=1e-6), pytest.approx(r["accuracy"])) for e, r in zip((2, 4), recs, strict=True)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp / "ck" / "logs" / "tensorboard").glob("version_0/events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [ev.step for ev in acc.Images("eval/grid")] == [8, 16]
    assert [round(s.value, 4) for s in acc.Scalars("eval/frechet_distance")] == [round(r["frechet_distance"], 4) for r in recs]


def test_best_checkpoint_is_the_best_logged_and_holds_the_evaluated_ema_weights(run):
    from moelab.diffusion.checkpoints import load_model
    from moelab.diffusion.eval_callback import SAMPLER, SEED, STEPS
    from moelab.diffusion.evaluate import Evaluator
    from moelab.diffusion.sample import grid_labels, sample

    tmp, _, _ = run
    recs = {e: json.loads((tmp / "ck" / "logs" / "eval" / f"metrics_epoch_{e}.json").read_text()) for e in (2, 4)}
    best_epoch = min(recs, key=lambda e: recs[e]["frechet_distance"])
    (best,) = (tmp / "ck").glob("best_epoch_*.pth")
    assert best.name == f"best_epoch_{best_epoch}.pth"
    ck = safe_load(best)
    assert "current_model_state" in ck  # written with EMA: state_dict holds the averaged weights
    (state,) = [v for k, v in ck["callbacks"].items() if "eval/frechet_distance" in k]
    assert float(state["best_model_score"]) == pytest.approx(recs[best_epoch]["frechet_distance"], rel=1e-6)
    model, cfg = load_model(best)  # EMA weights, as users load them
    labels = grid_labels(range(10), 3)
    images = sample(model, cfg, labels, sampler=SAMPLER, steps=STEPS, guidance=cfg.train.eval_guidance, seed=SEED, batch_size=250)
    res = Evaluator.for_config(cfg, tmp / "cache" / "classifiers").score(images, labels)
    assert res["frechet_distance"] == pytest.approx(recs[best_epoch]["frechet_distance"], rel=1e-5)
    assert res["accuracy"] == recs[best_epoch]["accuracy"]


def test_evaluation_leaves_training_exactly_as_without_it(run):
    _, last, plain = run
    a, b = safe_load(last), safe_load(plain)
    for key in ("state_dict", "current_model_state"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert [p.name for p in checkpoints_in(last.parent)] == ["checkpoint_epoch_4.pth"]


def test_fid_selection_needs_inception_weights():
    from moelab.errors import ConfigError

    with pytest.raises(ConfigError, match="train.select_metric=fid needs train.inception_weights"):
        load_config(TINY, {**EVAL, "train.select_metric": "fid"})


def _ddp_worker(rank: int, port: int, folder: str) -> None:
    """2 gloo ranks: rank 0 evaluates, the others wait for its broadcast; every rank logs the same numbers."""
    from pathlib import Path

    from test_ddp import WORLD, _assert_same_weights, _setup

    _setup(rank, port)
    out = Path(folder)
    cfg = load_config(TINY, {"train.eval_every_epochs": 1, "train.eval_per_class": 2, "train.epochs": 1, "train.batch_size": 8,
                             "train.checkpoint_every": 1})
    from moelab.diffusion.training import fit as fit_

    last = fit_(cfg, checkpoint_dir=out / "ck", accelerator="cpu", devices=WORLD, progress=False)
    from moelab.diffusion.checkpoints import load_model

    _assert_same_weights(load_model(last)[0], "after DDP training with evaluation")
    if rank == 0:
        rec = json.loads((out / "ck" / "logs" / "eval" / "metrics_epoch_1.json").read_text())
        rows = list(csv.DictReader((out / "ck" / "logs" / "csv" / "version_0" / "metrics.csv").open()))
        logged = [float(r["eval/frechet_distance"]) for r in rows if r.get("eval/frechet_distance")]
        assert logged == [pytest.approx(rec["frechet_distance"], rel=1e-6)] and rec["num_samples"] == 20
        assert [p.name for p in (out / "ck").glob("best_epoch_*.pth")] == ["best_epoch_1.pth"]
    # Tear gloo down explicitly, both ranks together: left to interpreter exit, its threads can be
    # destroyed while joinable, which aborts the worker (SIGABRT, "terminate called without an
    # active exception") after every assertion has passed.
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def test_ddp_evaluates_on_rank_zero_and_broadcasts(run, tmp_path, monkeypatch):
    import torch.multiprocessing as mp
    from test_ddp import WORLD, _free_port

    monkeypatch.setenv("MOELAB_CACHE", str(run[0] / "cache"))  # the judge the single-process run trained
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
