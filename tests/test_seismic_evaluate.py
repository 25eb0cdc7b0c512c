"""pick-benchmark evaluation: target windows, predictions through a real module, metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("seisbench")


import seisbench.data as sbd  # noqa: E402
from sklearn.metrics import f1_score, matthews_corrcoef, roc_auc_score  # noqa: E402

from moelab.errors import DataError  # noqa: E402
from moelab.seismic import synth  # noqa: E402
from moelab.seismic.evaluate import (  # noqa: E402
    evaluate_module,
    format_results,
    generate_targets,
    load_targets,
    pick_thresholds,
    task1_metrics,
    task23_metrics,
    window_containing,
)




@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    ds_path = synth.make_dataset(root / "ds", n_traces=40, seed=3, n_samples=2500, noise_fraction=0.4)
    ds = sbd.WaveformDataset(ds_path, sampling_rate=100, component_order="ZNE", dimension_order="NCW")
    targets = generate_targets(ds, root / "targets", seed=5, task1_window_s=20.0)
    return ds, targets


def test_window_containing_respects_bounds():
    rng = np.random.default_rng(0)
    for _ in range(200):
        s, e = window_containing(6000, 1000, rng, containing=2500, bounds=(50, 50))
        assert e - s == 1000 and s + 50 <= 2500 < e - 50 + 1
    assert window_containing(800, 1000, rng, containing=100) == (0, 800)


def test_task1_targets(data):
    ds, folder = data
    t1 = pd.read_csv(folder / "task1.csv")
    m = ds.metadata
    w1 = 2000  # task1_window_s=20 at 100 Hz
    first = m[["trace_p_arrival_sample", "trace_s_arrival_sample"]].min(axis=1)  # NaN for noise traces
    # one window per trace, plus a noise window before every first arrival later than one window length
    assert len(t1) == len(ds) + int((first > w1).sum())
    assert (t1["trace_type"] == "earthquake").sum() == int(first.notna().sum())
    for _, row in t1.iterrows():
        meta = m[m["trace_name"] == row["trace_name"]].iloc[0]
        assert row["trace_split"] == meta["split"]
        assert row["end_sample"] - row["start_sample"] == w1
        if row["trace_type"] == "earthquake":
            assert row["start_sample"] <= meta["trace_p_arrival_sample"] < row["end_sample"]
        elif meta["trace_category"] != "noise":  # the noise window cut before an event's first arrival
            assert row["end_sample"] <= min(meta["trace_p_arrival_sample"], meta["trace_s_arrival_sample"])


def test_task23_windows_hold_exactly_one_onset(data):
    ds, folder = data
    t23 = pd.read_csv(folder / "task23.csv")
    m = ds.metadata.set_index("trace_name")
    assert set(t23["phase_label"]) <= {"P", "S"} and (t23["phase_label"] == "S").sum() > 0
    for _, row in t23.iterrows():
        meta = m.loc[row["trace_name"]]
        onsets = [meta["trace_p_arrival_sample"], meta["trace_s_arrival_sample"]]
        inside = [o for o in onsets if row["start_sample"] <= o < row["end_sample"]]
        assert inside == [row["phase_onset"]]
        assert row["end_sample"] - row["start_sample"] == 1000


def test_targets_are_deterministic(data, tmp_path):
    ds, folder = data
    generate_targets(ds, tmp_path / "again", seed=5, task1_window_s=20.0)
    for f in ("task1.csv", "task23.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(folder / f), pd.read_csv(tmp_path / "again" / f))


def test_task1_metrics_against_sklearn():
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.6
    score = np.clip(y * 0.3 + rng.random(200) * 0.8, 0, 1)
    df = pd.DataFrame({"trace_type": np.where(y, "earthquake", "noise"), "score_detection": score})
    stats = task1_metrics(df, df)
    assert stats["test_det_auc"] == pytest.approx(roc_auc_score(y, score))
    pred = score >= stats["det_threshold"]
    assert stats["test_det_f1"] == pytest.approx(f1_score(y, pred))
    assert stats["dev_det_f1"] == pytest.approx(stats["test_det_f1"])  # same windows: same F1 at the dev threshold
    # the dev threshold maximises F1 over all thresholds
    best = max(f1_score(y, score >= t) for t in np.unique(score))
    assert stats["dev_det_f1"] == pytest.approx(best)


def test_task23_metrics_residuals_and_mcc():
    df = pd.DataFrame(
        {
            "phase_label": ["P", "P", "S", "S", "P"],
            "phase_onset": [100.0, 200.0, 300.0, 400.0, 500.0],
            "sampling_rate": [100.0] * 5,
            "p_sample_pred": [110.0, 190.0, 0.0, 0.0, 530.0],
            "s_sample_pred": [0.0, 0.0, 320.0, 380.0, 0.0],
            "score_p_or_s": [3.0, 2.0, 0.5, 0.2, 0.9],
        }
    )
    st = task23_metrics(df, df)
    d = np.array([10.0, -10.0, 30.0]) / 100
    assert st["test_P_mean_s"] == pytest.approx(d.mean())
    assert st["test_P_std_s"] == pytest.approx(d.std())
    assert st["test_P_mae_s"] == pytest.approx(np.abs(d).mean())
    assert st["test_S_mae_s"] == pytest.approx(0.2)
    y = df["phase_label"] == "P"
    pred = df["score_p_or_s"] >= st["phase_threshold"]
    assert st["test_phase_mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    assert st["test_phase_f1"] == pytest.approx(1.0)  # threshold 0.9 separates P and S here


def test_task23_peak_is_the_median_peak_probability_of_the_phase_windows():
    df = pd.DataFrame(
        {
            "phase_label": ["P", "P", "P", "S", "S"],
            "phase_onset": [100.0] * 5,
            "sampling_rate": [100.0] * 5,
            "p_sample_pred": [100.0] * 5,
            "s_sample_pred": [100.0] * 5,
            "score_p_or_s": [1.0] * 5,
            "score_p": [0.9, 0.45, float("nan"), 0.99, 0.98],
            "score_s": [0.99, 0.99, 0.99, 0.3, 0.5],
        }
    )
    st = task23_metrics(df, df)
    assert st["test_P_peak"] == pytest.approx(0.45)  # median of 0.9, 0.45, 0 (NaN: no probability): only P windows count
    assert st["test_S_peak"] == pytest.approx(0.4)
    assert "P_peak=0.4500" in format_results(st)
    assert "test_P_peak" not in task23_metrics(df.drop(columns=["score_p", "score_s"]), df.drop(columns=["score_p", "score_s"]))


def test_pick_thresholds_maximise_f1_of_peak_probability_on_dev():
    dev23 = pd.DataFrame({
        "phase_label": ["P", "P", "P", "S", "S", "S"],
        "score_p": [0.9, 0.6, 0.3, 0.5, 0.2, 0.1],
        "score_s": [0.1, 0.2, 0.7, 0.8, 0.75, 0.4],
    })
    dev1 = pd.DataFrame({"trace_type": ["noise", "noise", "earthquake"], "score_p": [0.55, 0.05, 0.99], "score_s": [0.3, 0.9, 0.99]})
    th = pick_thresholds(dev23, dev1)
    for phase in ("P", "S"):
        col = f"score_{phase.lower()}"
        noise = dev1[dev1["trace_type"] == "noise"]  # earthquake windows of task 1 take no part
        y = np.r_[(dev23["phase_label"] == phase).to_numpy(), np.zeros(len(noise), bool)]
        score = np.r_[dev23[col].to_numpy(), noise[col].to_numpy()]
        best = max(f1_score(y, score >= t) for t in np.unique(score))
        assert f1_score(y, score >= th[f"{phase}_threshold"]) == pytest.approx(best)
    assert th == {"P_threshold": 0.6, "S_threshold": 0.4}  # S: 3 TP, 2 FP (F1 0.75) beats 0.75 (2 TP, 1 FP, F1 0.67)
    assert pick_thresholds(dev23[dev23["phase_label"] == "P"]) == {"P_threshold": 0.1, "S_threshold": 0.1}  # one class: SeisBench's default


def test_evaluate_module_runs_predict_step_on_target_windows(data, tmp_path):
    from moelab.seismic.lit import EQTransformerLit

    ds, folder = data
    module = EQTransformerLit(in_samples=2001)
    stats = evaluate_module(module, ds, load_targets(folder), pred_dir=tmp_path)
    pred = pd.read_csv(tmp_path / "test_task23.csv")
    assert len(pred) == (pd.read_csv(folder / "task23.csv")["trace_split"] == "test").sum()
    assert ((pred["p_sample_pred"] >= pred["start_sample"]) & (pred["p_sample_pred"] < pred["end_sample"])).all()
    det = pd.read_csv(tmp_path / "dev_task1.csv")["score_detection"]
    assert ((det >= 0) & (det <= 1)).all()
    for key in ("test_det_auc", "test_det_f1", "test_phase_mcc", "test_S_mae_s", "dev_P_mae_s", "dev_P_std_s", "P_threshold", "S_threshold"):
        assert key in stats and np.isfinite(stats[key])
    assert "task 1 detection" in format_results(stats) and "P_threshold=" in format_results(stats)
    # the peak probabilities behind the pick thresholds: within [0, 1] and at least the probability at the argmax
    dev23 = pd.read_csv(tmp_path / "dev_task23.csv")
    assert ((dev23["score_p"] >= 0) & (dev23["score_p"] <= 1) & (dev23["score_s"] >= 0) & (dev23["score_s"] <= 1)).all()
    np.testing.assert_allclose(dev23["score_p"] / dev23["score_s"], dev23["score_p_or_s"], rtol=1e-5)
    assert 0.01 <= stats["P_threshold"] <= 0.99 and 0.01 <= stats["S_threshold"] <= 0.99


def test_metrics_by_group_split_the_pooled_test_metrics_at_the_pooled_thresholds(data, tmp_path):
    """One group holding every trace gives the pooled test metrics exactly; two groups give MAEs
    whose count-weighted mean is the pooled MAE, and detection counts that add up."""
    from moelab.seismic.evaluate import metrics_by_group
    from moelab.seismic.lit import EQTransformerLit

    ds, folder = data
    stats = evaluate_module(EQTransformerLit(in_samples=2001), ds, load_targets(folder), pred_dir=tmp_path)
    names = ds.metadata["trace_name"]
    pooled = metrics_by_group(tmp_path, dict.fromkeys(names, "all"))["all"]
    # (to 1e-12, not bit for bit: the predictions went through CSV, which pandas < 2 writes with 16 digits)
    assert pooled == pytest.approx({k: v for k, v in stats.items() if k.startswith("test_")}, rel=1e-12, abs=1e-12, nan_ok=True)
    halves = metrics_by_group(tmp_path, {n: ("even" if i % 2 == 0 else "odd") for i, n in enumerate(names)})
    assert set(halves) == {"even", "odd"}
    for phase in ("P", "S"):
        n = [halves[g][f"test_{phase}_n"] for g in ("even", "odd")]
        mae = [halves[g][f"test_{phase}_mae_s"] for g in ("even", "odd")]
        assert sum(n) == stats[f"test_{phase}_n"]
        assert (n[0] * mae[0] + n[1] * mae[1]) / sum(n) == pytest.approx(stats[f"test_{phase}_mae_s"], rel=1e-12)
    with pytest.raises(DataError, match="without a group"):
        metrics_by_group(tmp_path, {})
    with pytest.raises(DataError, match="evaluate the model first"):
        metrics_by_group(tmp_path / "nowhere", {})


def test_targets_command_writes_and_refuses_to_overwrite(data, tmp_path, capsys):
    from moelab.cli import main

    ds, folder = data
    src = str(ds.path)
    assert main(["seismic", "targets", src, str(tmp_path / "t"), "--task1_window_s", "20"]) == 0
    assert f"task1.csv: {len(pd.read_csv(folder / 'task1.csv'))} windows" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "t" / "task23.csv")) == len(pd.read_csv(folder / "task23.csv"))  # eligibility does not depend on the seed
    assert main(["seismic", "targets", src, str(tmp_path / "t")]) == 2
    assert "already holds evaluation targets" in capsys.readouterr().err


def test_targets_window_longer_than_every_trace_is_refused(data, tmp_path, capsys):
    from moelab.cli import main

    ds, _ = data
    longest = max(int(ds.get_sample(i)[0].shape[-1]) for i in range(len(ds))) / float(ds.sampling_rate or 100.0)
    assert main(["seismic", "targets", str(ds.path), str(tmp_path / "t"), "--task1_window_s", str(longest + 1)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: task1_window_s=") and "longer than every trace" in err and "Traceback" not in err
    assert not (tmp_path / "t").exists()  # nothing written
    assert main(["seismic", "targets", str(ds.path), str(tmp_path / "u"), "--task1_window_s", "20", "--task23_window_s", str(longest + 1)]) == 2
    assert "task23_window_s=" in capsys.readouterr().err
