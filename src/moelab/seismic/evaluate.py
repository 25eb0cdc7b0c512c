"""pick-benchmark's three evaluation tasks: target windows, model predictions and metrics.

* Task 1, event detection: a window (30 s) either contains an earthquake's first arrival or is
  noise; score = max detection probability in the window. Precision/recall/F1 at the F1-optimal
  threshold chosen on dev (applied unchanged to test), plus ROC AUC.
* Task 2, phase identification: a window (10 s) contains exactly one P or S onset; score = max P
  probability / max S probability. Precision/recall/F1 (P as positive class) and Matthews
  correlation at the dev-chosen threshold.
* Task 3, onset regression: the same windows; residual of the argmax sample of the P (S)
  probability against the labelled onset, in seconds: mean, std, RMS and MAE; and ``P_peak`` /
  ``S_peak``, the median over those windows of the phase's peak probability (how sharply the head
  places the onset: near 1 for a located onset, near 0.5 for a plateau a second wide).
* Pick thresholds for continuous picking (``P_threshold``, ``S_threshold``, SeisBench ``classify``
  arguments): for each phase, the F1-optimal threshold on dev of the window's peak probability of
  that phase, windows holding that phase's onset (task 2/3) being positive and windows holding the
  other phase (task 2/3) or noise (task 1) negative. With ``det_threshold`` (task 1) they are what
  ``moelab seismic export`` stores as the model's ``default_args``.

Targets are generated once per data set (``task1.csv``, ``task23.csv``, one row per window with the
split it belongs to) with a fixed seed so that every model is scored on the same windows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moelab.errors import ConfigError, DataError
from moelab.guard import quiet_lightning
from moelab.seismic.phases import PHASE_DICT  # metadata columns holding P or S onsets (pick-benchmark's)

log = logging.getLogger(__name__)

TASK_FILES = ("task1.csv", "task23.csv")
#: The thresholds chosen on dev that ``results.csv`` carries (detection, P/S ratio, P and S picks).
THRESHOLD_KEYS: tuple[str, ...] = ("det_threshold", "phase_threshold", "P_threshold", "S_threshold")


# ---------------------------------------------------------------------------------------- targets
def window_containing(
    npts: int, windowlen: int, rng: np.random.Generator, containing: int | None = None, bounds: tuple[int, int] = (100, 100)
) -> tuple[int, int]:
    """A random window of ``windowlen`` samples inside ``npts`` holding sample ``containing`` at least
    ``bounds`` samples away from either edge; the whole trace when it is too short for that."""
    if npts <= windowlen:
        return 0, npts
    if containing is None:
        start = int(rng.integers(0, npts - windowlen + 1))
        return start, start + windowlen
    earliest = max(0, containing - windowlen + bounds[1])
    latest = min(npts - windowlen, containing - bounds[0])
    if latest <= earliest:
        return 0, npts
    start = int(rng.integers(earliest, latest + 1))
    return start, start + windowlen


def _arrivals(metadata: dict, npts: int) -> list[tuple[float, str, str]]:
    out = []
    for col, phase in PHASE_DICT.items():
        v = metadata.get(col)
        if v is None:
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if np.isfinite(v) and 0 <= v < npts:
            out.append((v, phase, col.split("_")[1]))
    return sorted(out)


def generate_targets(
    ds,
    output: str | Path,
    seed: int = 42,
    task1_window_s: float = 30.0,
    task23_window_s: float = 10.0,
    noise_before_events: bool = True,
) -> Path:
    """Write ``task1.csv`` and ``task23.csv`` for every trace of ``ds`` (all splits) into ``output``."""
    output = Path(output)
    sr = float(ds.sampling_rate or ds.metadata["trace_sampling_rate_hz"].iloc[0])
    rng1 = np.random.default_rng(seed)
    rng23 = np.random.default_rng(seed + 1)
    w1, w23 = int(task1_window_s * sr), int(task23_window_s * sr)
    spacing = int(0.5 * sr)  # minimum distance to a neighbouring onset in task 2/3 windows
    task1, task23 = [], []
    longest = 0  # samples of the longest trace: a window longer than it fits nowhere
    for idx in range(len(ds)):
        # get_sample: onsets at the data set's sampling rate, also for traces stored at another one (GEOFON)
        x, row = ds.get_sample(idx)
        npts = int(x.shape[-1])
        longest = max(longest, npts)
        base = {"trace_name": row["trace_name"], "trace_idx": idx, "trace_split": row.get("split", ""), "sampling_rate": sr}
        arrivals = _arrivals(row, npts)
        if not arrivals:
            s, e = window_containing(npts, w1, rng1)
            task1.append({**base, "start_sample": s, "end_sample": e, "trace_type": "noise"})
        else:
            first = int(arrivals[0][0])
            s, e = window_containing(npts, w1, rng1, containing=first)
            if e - s <= w1:
                task1.append({**base, "start_sample": s, "end_sample": e, "trace_type": "earthquake"})
            if noise_before_events and first > w1:
                s, e = window_containing(min(npts, first), w1, rng1)
                task1.append({**base, "start_sample": s, "end_sample": e, "trace_type": "noise"})
        for i, (onset, phase, full) in enumerate(arrivals):
            before = 0 if i == 0 else int(arrivals[i - 1][0]) + spacing
            after = npts if i == len(arrivals) - 1 else min(npts, int(arrivals[i + 1][0]) - spacing)
            if after - before < w23 or before > onset or after < onset:
                continue  # the onset cannot be isolated in a full window of its own (the trace end counts too)
            s, e = window_containing(after - before, w23, rng23, containing=int(onset) - before, bounds=(50, 50))
            s, e = s + before, e + before
            if e - s <= w23:
                task23.append({**base, "start_sample": s, "end_sample": e, "phase_label": phase, "full_phase_label": full, "phase_onset": onset})
    for flag, w in (("task1_window_s", w1), ("task23_window_s", w23)):
        if len(ds) and w > longest:  # every window would be cut to its trace (task 1) or skipped (tasks 2/3)
            raise ConfigError(
                f"{flag}={w / sr:g} s is longer than every trace of the data set (the longest: {longest / sr:g} s); "
                "choose a window that fits (pick-benchmark: 30 s for task 1, 10 s for tasks 2/3)"
            )
    output.mkdir(parents=True, exist_ok=True)
    cols1 = ["trace_name", "trace_idx", "trace_split", "sampling_rate", "start_sample", "end_sample", "trace_type"]
    cols23 = cols1[:-1] + ["phase_label", "full_phase_label", "phase_onset"]
    _atomic_csv(pd.DataFrame(task1, columns=cols1), output / "task1.csv")
    _atomic_csv(pd.DataFrame(task23, columns=cols23), output / "task23.csv")
    return output


def _atomic_csv(df: pd.DataFrame, path: Path) -> None:
    from moelab.checkpoint import atomic_write_bytes

    atomic_write_bytes(df.to_csv(index=False).encode(), path)


def load_targets(folder: str | Path) -> dict[str, pd.DataFrame]:
    """Read ``task1.csv``/``task23.csv`` (at least one must exist) with clear errors."""
    folder = Path(folder)
    out = {}
    for f in TASK_FILES:
        p = folder / f
        if p.is_file():
            try:
                out[f[:-4]] = pd.read_csv(p)
            except (pd.errors.EmptyDataError, pd.errors.ParserError) as e:
                raise DataError(f"evaluation targets '{p}' are unreadable ({e}); delete the folder to regenerate them") from None
    if not out:
        raise DataError(f"no evaluation targets (task1.csv / task23.csv) in '{folder}'; generate them with benchmark/generate_eval_targets.py")
    need = {"trace_name", "trace_split", "start_sample", "end_sample", "sampling_rate"}
    for task, df in out.items():
        missing = need - set(df.columns)
        if missing:
            raise DataError(f"evaluation targets {folder}/{task}.csv lack columns {sorted(missing)}; delete the folder to regenerate them")
    return out


# ------------------------------------------------------------------------------------ predictions
def predict(module, split_ds, targets: pd.DataFrame, batch_size: int = 64, accelerator: str = "cpu") -> pd.DataFrame:
    """Run ``module.predict_step`` over the target windows of one split (SeisBench SteeredGenerator)."""
    import lightning.pytorch as pl
    import seisbench.generate as sbg
    import torch
    from torch.utils.data import DataLoader

    targets = targets.reset_index(drop=True).copy()
    if len(targets) == 0:
        for c in ("score_detection", "score_p_or_s", "p_sample_pred", "s_sample_pred"):
            targets[c] = pd.Series(dtype=float)
        return targets
    known = set(split_ds.metadata["trace_name"])
    unknown = sorted(set(targets["trace_name"]) - known)
    if unknown:
        raise DataError(
            f"{len(unknown)} evaluation windows name traces that are not in the data set (e.g. '{unknown[0]}'): "
            "the targets were made for another data set; delete the targets folder to regenerate them"
        )
    generator = sbg.SteeredGenerator(split_ds, targets)
    generator.add_augmentations(module.get_eval_augmentations())
    loader = DataLoader(generator, batch_size=batch_size, shuffle=False, num_workers=0)
    peaks = _PeakProbabilities(module.model)
    try:
        with quiet_lightning():
            trainer = pl.Trainer(
                accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[peaks.callback]
            )
            batches = trainer.predict(module, loader)
    finally:
        peaks.remove()
    merged = [torch.cat([b[i].detach().cpu().reshape(-1) for b in batches]).double().numpy() for i in range(4)]
    targets["score_detection"] = merged[0]
    targets["score_p_or_s"] = merged[1]
    targets["p_sample_pred"] = merged[2] + targets["start_sample"].to_numpy()
    targets["s_sample_pred"] = merged[3] + targets["start_sample"].to_numpy()
    targets["score_p"] = np.concatenate(peaks.p) if peaks.p else np.zeros(0)
    targets["score_s"] = np.concatenate(peaks.s) if peaks.s else np.zeros(0)
    return targets


class _PeakProbabilities:
    """Peak P and S probability inside each target window, read off the model's own forward pass.

    pick-benchmark's ``predict_step`` reports only their ratio (task 2); the pick thresholds need
    the values themselves. A forward hook keeps the model's last outputs and a Lightning callback
    masks them with the batch's ``window_borders`` as ``predict_step`` does, so the model runs once.
    """

    def __init__(self, model) -> None:
        import lightning.pytorch as pl

        self.p: list[np.ndarray] = []
        self.s: list[np.ndarray] = []
        self._last = None
        self._handle = model.register_forward_hook(self._keep)
        owner = self

        class _Callback(pl.Callback):
            def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
                owner._collect(batch)

        self.callback = _Callback()

    def _keep(self, module, inputs, output) -> None:
        self._last = output

    def _collect(self, batch: dict) -> None:
        import torch

        _, p, s = (t.detach().cpu() for t in self._last)
        borders = torch.as_tensor(batch["window_borders"]).cpu().reshape(-1, 2).long()
        idx = torch.arange(p.shape[-1])[None]
        outside = (idx < borders[:, :1]) | (idx >= borders[:, 1:])
        self.p.append(p.masked_fill(outside, 0.0).amax(dim=-1).double().numpy())
        self.s.append(s.masked_fill(outside, 0.0).amax(dim=-1).double().numpy())

    def remove(self) -> None:
        self._handle.remove()


# ---------------------------------------------------------------------------------------- metrics
def _f1_threshold(y: np.ndarray, score: np.ndarray) -> tuple[float, float, float, float]:
    """F1-optimal threshold on dev (pick-benchmark): returns threshold, precision, recall, F1."""
    from sklearn.metrics import precision_recall_curve

    prec, rec, thr = precision_recall_curve(y, score)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * prec * rec / (prec + rec)
    f1 = f1[:-1]  # the last point has no threshold
    if f1.size == 0 or np.all(np.isnan(f1)):
        return float("nan"), float("nan"), float("nan"), float("nan")
    i = int(np.nanargmax(f1))
    return float(thr[i]), float(prec[i]), float(rec[i]), float(f1[i])


def _binary_stats(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import matthews_corrcoef, precision_recall_fscore_support

    p, r, f, _ = precision_recall_fscore_support(y, pred, average="binary", zero_division=0)
    return {"precision": float(p), "recall": float(r), "f1": float(f), "mcc": float(matthews_corrcoef(y, pred))}


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, score))


def task1_metrics(dev: pd.DataFrame, test: pd.DataFrame) -> dict[str, float]:
    """Detection metrics; the threshold is chosen on dev and applied to test."""
    stats: dict[str, float] = {}
    y_dev = (dev["trace_type"] == "earthquake").to_numpy()
    s_dev = np.nan_to_num(dev["score_detection"].to_numpy(float), nan=0.0)
    thr, p, r, f = _f1_threshold(y_dev, s_dev) if len(np.unique(y_dev)) == 2 else (0.5, np.nan, np.nan, np.nan)
    thr = 0.5 if not np.isfinite(thr) else thr
    stats["det_threshold"] = thr
    for name, df in (("dev", dev), ("test", test)):
        if len(df) == 0:
            continue
        y = (df["trace_type"] == "earthquake").to_numpy()
        s = np.nan_to_num(df["score_detection"].to_numpy(float), nan=0.0)
        b = _binary_stats(y, s >= thr)
        stats.update({f"{name}_det_{k}": v for k, v in b.items()})
        stats[f"{name}_det_auc"] = _auc(y, s)
    return stats


def task23_metrics(dev: pd.DataFrame, test: pd.DataFrame) -> dict[str, float]:
    """Phase identification (task 2) and onset residual (task 3) metrics."""
    stats: dict[str, float] = {}

    def score(df: pd.DataFrame) -> np.ndarray:
        # clipping as pick-benchmark does: infinitely likely P (S max = 0) stays orderable
        return np.clip(np.nan_to_num(df["score_p_or_s"].to_numpy(float), nan=1.0, posinf=1e100, neginf=-1e100), -1e100, 1e100)

    if len(dev):
        y_dev = (dev["phase_label"] == "P").to_numpy()
        if len(np.unique(y_dev)) == 2:
            thr, *_ = _f1_threshold(y_dev, score(dev))
        else:
            thr = 1.0
        thr = 1.0 if not np.isfinite(thr) else thr
        stats["phase_threshold"] = thr
        for name, df in (("dev", dev), ("test", test)):
            if len(df) == 0:
                continue
            y = (df["phase_label"] == "P").to_numpy()
            b = _binary_stats(y, score(df) >= thr)
            stats.update({f"{name}_phase_{k}": v for k, v in b.items()})
    for name, df in (("dev", dev), ("test", test)):
        for phase in ("P", "S"):
            sub = df[df["phase_label"] == phase]
            if len(sub) == 0:
                continue
            diff = ((sub[f"{phase.lower()}_sample_pred"] - sub["phase_onset"]) / sub["sampling_rate"]).to_numpy(float)
            stats[f"{name}_{phase}_mean_s"] = float(np.mean(diff))
            stats[f"{name}_{phase}_std_s"] = float(np.std(diff))
            stats[f"{name}_{phase}_rms_s"] = float(np.sqrt(np.mean(diff**2)))
            stats[f"{name}_{phase}_mae_s"] = float(np.mean(np.abs(diff)))
            stats[f"{name}_{phase}_n"] = float(len(diff))
            col = f"score_{phase.lower()}"
            if col in sub:
                # how sure the head is where the onset lies: with Gaussian labels of peak 1 a head that
                # locates the onset peaks near 1; one that only knows it to within +-0.5 s spreads
                # its probability into a plateau near 0.5 (picks then hinge on the threshold)
                stats[f"{name}_{phase}_peak"] = float(np.median(np.nan_to_num(sub[col].to_numpy(float), nan=0.0)))
    return stats


def evaluate_module(
    module,
    ds,
    targets: dict[str, pd.DataFrame],
    sets: tuple[str, ...] = ("dev", "test"),
    batch_size: int = 64,
    accelerator: str = "cpu",
    pred_dir: str | Path | None = None,
) -> dict[str, float]:
    """Predict every target window of ``sets`` and compute the task metrics (pick-benchmark names)."""
    module.eval()
    preds: dict[str, dict[str, pd.DataFrame]] = {}
    for split in sets:
        split_ds = ds.get_split(split)
        for task, df in targets.items():
            sub = df[df["trace_split"] == split]
            if len(sub) and len(split_ds) == 0:
                raise DataError(f"the targets have '{split}' windows but the data set has no '{split}' traces")
            p = predict(module, split_ds, sub, batch_size=batch_size, accelerator=accelerator) if len(sub) else sub.assign(
                score_detection=[], score_p_or_s=[], p_sample_pred=[], s_sample_pred=[], score_p=[], score_s=[]
            )
            preds.setdefault(task, {})[split] = p
            if pred_dir is not None:
                Path(pred_dir).mkdir(parents=True, exist_ok=True)
                _atomic_csv(p, Path(pred_dir) / f"{split}_{task}.csv")
    stats: dict[str, float] = {}
    dev_name, test_name = (sets[0], sets[-1])
    empty = pd.DataFrame()
    if "task1" in preds:
        stats.update(task1_metrics(preds["task1"].get(dev_name, empty), preds["task1"].get(test_name, empty)))
    if "task23" in preds:
        stats.update(task23_metrics(preds["task23"].get(dev_name, empty), preds["task23"].get(test_name, empty)))
        stats.update(pick_thresholds(preds["task23"].get(dev_name, empty), preds.get("task1", {}).get(dev_name, empty)))
    return stats


def metrics_by_group(pred_dir: str | Path, groups: Mapping[str, str], dev: str = "dev", test: str = "test") -> dict[str, dict[str, float]]:
    """Test metrics of each group of traces, at the thresholds tuned on the whole dev split.

    ``pred_dir`` holds the per-window predictions `evaluate_module` wrote (``<split>_task1.csv``,
    ``<split>_task23.csv``); ``groups`` maps ``trace_name`` to a group (e.g. the preset of a generated
    mixture, `moelab.seismic.routing.trace_groups`). A model trained on pooled data is scored on each
    kind of trace with the thresholds it would be deployed with -- those of the pooled dev split --
    so per-group figures add up to the pooled ones instead of each group tuning its own.
    """
    pred_dir = Path(pred_dir)
    frames = {}
    for split in (dev, test):
        for task in ("task1", "task23"):
            path = pred_dir / f"{split}_{task}.csv"
            if not path.is_file():
                raise DataError(f"'{path}' is missing: evaluate the model first (benchmark/eval.py writes its predictions there)")
            frames[split, task] = pd.read_csv(path)
    labels = {task: frames[test, task]["trace_name"].map(groups) for task in ("task1", "task23")}
    missing = sorted({n for task, lab in labels.items() for n in frames[test, task]["trace_name"][lab.isna()]})
    if missing:
        raise DataError(f"{len(missing)} predicted windows name traces without a group (e.g. '{missing[0]}'): the predictions are of another data set")
    out: dict[str, dict[str, float]] = {}
    for g in sorted(set(labels["task1"]) | set(labels["task23"])):
        t1, t23 = (frames[test, task][labels[task] == g] for task in ("task1", "task23"))
        stats = {**task1_metrics(frames[dev, "task1"], t1), **task23_metrics(frames[dev, "task23"], t23)}
        out[g] = {k: v for k, v in stats.items() if k.startswith("test_")}
    return out


def pick_thresholds(dev23: pd.DataFrame, dev1: pd.DataFrame | None = None) -> dict[str, float]:
    """``P_threshold`` / ``S_threshold``: the F1-optimal peak-probability threshold of each phase on dev.

    Positives: task 2/3 windows holding that phase's onset; negatives: those holding the other
    phase and the task 1 noise windows. Kept within [0.01, 0.99] so that SeisBench's trigger
    (on above the threshold, off below half of it) stays meaningful; a phase without both classes
    on dev keeps SeisBench's default 0.1.
    """
    out: dict[str, float] = {}
    noise = dev1[dev1["trace_type"] == "noise"] if dev1 is not None and len(dev1) and "score_p" in dev1 else pd.DataFrame()
    for phase in ("P", "S"):
        col = f"score_{phase.lower()}"
        if len(dev23) == 0 or col not in dev23:
            continue
        y = np.concatenate([(dev23["phase_label"] == phase).to_numpy(), np.zeros(len(noise), dtype=bool)])
        score = np.concatenate([dev23[col].to_numpy(float), noise[col].to_numpy(float) if len(noise) else np.zeros(0)])
        score = np.nan_to_num(score, nan=0.0)
        thr = _f1_threshold(y, score)[0] if len(np.unique(y)) == 2 else float("nan")
        out[f"{phase}_threshold"] = float(np.clip(thr, 0.01, 0.99)) if np.isfinite(thr) else 0.1
    return out


SUMMARY_ROWS: tuple[tuple[str, str], ...] = (
    ("task 1 detection", "det_precision det_recall det_f1 det_auc"),
    ("task 2 phase id", "phase_precision phase_recall phase_f1 phase_mcc"),
    ("task 3 P onset", "P_mean_s P_std_s P_mae_s P_peak"),
    ("task 3 S onset", "S_mean_s S_std_s S_mae_s S_peak"),
)


def format_results(stats: dict[str, Any], sets: tuple[str, ...] = ("dev", "test")) -> str:
    """A readable table: one line per task and split, then the thresholds tuned on dev."""
    lines = []
    for title, keys in SUMMARY_ROWS:
        for split in sets:
            parts = []
            for k in keys.split():
                v = stats.get(f"{split}_{k}")
                if v is not None:
                    parts.append(f"{k.split('_', 1)[1] if k.startswith(('det_', 'phase_')) else k}={v:.4f}")
            if parts:
                lines.append(f"{title:<20} {split:<5} " + "  ".join(parts))
    tuned = [f"{k}={stats[k]:.4f}" for k in THRESHOLD_KEYS if k in stats]
    if tuned:
        lines.append(f"{'thresholds (dev)':<20} {sets[0]:<5} " + "  ".join(tuned))
    return "\n".join(lines)
