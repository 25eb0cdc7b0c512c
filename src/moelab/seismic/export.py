"""Share a trained model as SeisBench weights that describe themselves and pick well by default.

`export_weights` turns a training checkpoint (``weights/<name>/model.ckpt``) into SeisBench's own
``save()`` format, ``NAME.json`` + ``NAME.pt``, with

* ``docstring`` (SeisBench's ``weights_docstring``): the model and its MoE arguments, the data set,
  the training config (``config.json`` beside the checkpoint) and the dev/test metrics of
  ``benchmark/eval.py`` (``eval/results.csv`` beside the checkpoint);
* ``default_args``: the thresholds tuned on dev by the evaluation (``P_threshold``,
  ``S_threshold`` and ``detection_threshold`` = task 1's ``det_threshold``) and an ``overlap`` /
  ``blinding`` fitting the model window, so ``SeisMoE.load(path).classify(stream)`` (or
  ``EQTransformer.load`` for the dense model) uses them with no extra arguments, as SeisBench's
  published weights carry theirs;
* ``model_args``: the architecture, including the MoE arguments (``num_experts``, ...).

The pair is read by ``SeisMoE.load`` / SeisBench's ``EQTransformer.load``, by ``base_model`` and by
``moelab seismic pick``. Both files are written atomically (`moelab.checkpoint.atomic_write_bytes`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from moelab.checkpoint import atomic_write_bytes
from moelab.errors import CheckpointError, DataError
from moelab.seismic.evaluate import THRESHOLD_KEYS
from moelab.seismic.model import SeisMoE, load_trained, window_annotate_args

#: results.csv column -> SeisBench ``classify`` argument stored in ``default_args``.
THRESHOLD_ARGS: dict[str, str] = {"P_threshold": "P_threshold", "S_threshold": "S_threshold", "det_threshold": "detection_threshold"}


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """The row of ``benchmark/eval.py``'s ``results.csv``, checked to hold the tuned thresholds."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"no evaluation results '{path}': run benchmark/eval.py --model_path <checkpoint> --config <config> first "
            "(it writes <model dir>/eval/results.csv with the thresholds tuned on dev), or pass results=<path>"
        )
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"evaluation results '{path}' are unreadable ({e}); run benchmark/eval.py again") from None
    if len(df) != 1:
        raise DataError(f"evaluation results '{path}' must hold one row (one evaluated checkpoint), found {len(df)}")
    row = df.iloc[0].to_dict()
    missing = [k for k in THRESHOLD_ARGS if not _finite(row.get(k))]
    if missing:
        raise DataError(
            f"evaluation results '{path}' lack the tuned threshold(s) {missing} (written by an older benchmark/eval.py, "
            "or no dev split); run benchmark/eval.py again with --sets dev,test"
        )
    return row


def tuned_default_args(model, row: dict[str, Any]) -> dict[str, Any]:
    """The ``default_args`` a deployed ``model`` carries: a window overlap and blinding that fit its
    window, and the thresholds of ``row`` (`read_results`), tuned on dev. Exported weights store
    these, so that ``classify`` picks as the evaluation did without arguments."""
    return {**window_annotate_args(model.in_samples), **{arg: float(row[col]) for col, arg in THRESHOLD_ARGS.items()}}


def weights_docstring(model, checkpoint: Path, results: dict[str, Any], config: dict[str, Any] | None) -> str:
    """The description stored with the weights: what the model is, what it was trained on, how well it does."""
    args = model.get_model_args()
    kind = type(model).__name__
    arch = f"{kind} (SeisBench EQTransformer"
    if isinstance(model, SeisMoE):
        arch += (
            f" whose two transformer feed-forward layers are top-{args['num_experts_per_token']}-of-{args['num_experts']} "
            f"MoE layers, gate {args['gate']}"
        )
    arch += f"), in_samples={args.get('in_samples')}, sampling_rate={getattr(model, 'sampling_rate', None)} Hz"
    lines = [
        arch,
        f"Trained with moelab (pick-benchmark-style harness); exported from {checkpoint}.",
        f"Data: {results.get('data') or (config or {}).get('data', 'unknown')}.",
        "Config: " + (json.dumps(config, sort_keys=True) if config else "not found next to the checkpoint (config.json)"),
    ]
    metrics = {k: v for k, v in results.items() if k.startswith(("dev_", "test_")) and _finite(v)}
    if metrics:
        lines.append("Metrics (pick-benchmark tasks 1-3): " + ", ".join(f"{k}={float(v):.4f}" for k, v in sorted(metrics.items())))
    tuned = {k: float(results[k]) for k in THRESHOLD_KEYS if _finite(results.get(k))}
    lines.append("Thresholds tuned on dev (default_args): " + ", ".join(f"{k}={v:.4f}" for k, v in tuned.items()))
    return "\n".join(lines)


def export_weights(
    model_path: str | os.PathLike, out: str | os.PathLike, results: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """Write ``out.json`` + ``out.pt`` (SeisBench format) for the checkpoint at ``model_path``.

    Args:
        model_path: training checkpoint (``.ckpt``) of a SeisMoE or EQTransformer.
        out: ``DIR/NAME``, as SeisBench's ``save`` takes it (``DIR`` is created).
        results (*optional*): ``results.csv`` of ``benchmark/eval.py``; defaults to ``eval/results.csv``
            beside the checkpoint.

    Returns the (json, pt) paths.
    """
    checkpoint = Path(model_path).expanduser()
    model = load_trained(checkpoint)
    row = read_results(Path(results) if results is not None else checkpoint.parent / "eval" / "results.csv")
    config_path = checkpoint.parent / "config.json"
    config = None
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError):
            config = None
    model.default_args = tuned_default_args(model, row)
    return save_weights(model, out, weights_docstring(model, checkpoint, row, config))


def save_weights(model, path: str | os.PathLike, docstring: str = "") -> tuple[Path, Path]:
    """SeisBench's own ``save`` of ``model`` to ``path`` (json + pt), each file written atomically."""
    path = Path(path).expanduser()
    if path.name in ("", ".", "..") or path.name.endswith((".json", ".pt")):
        raise CheckpointError(f"export target '{path}' must be DIR/NAME (SeisBench adds .json and .pt), e.g. exported/seismoe_synth")
    json_path, pt_path = path.with_name(path.name + ".json"), path.with_name(path.name + ".pt")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / path.name
        model.save(base, weights_docstring=docstring)  # SeisBench's save (SeisMoE's only adds atomic renames)
        pt_bytes = base.with_name(base.name + ".pt").read_bytes()
        json_bytes = base.with_name(base.name + ".json").read_bytes()
    atomic_write_bytes(pt_bytes, pt_path)
    atomic_write_bytes(json_bytes, json_path)  # last: a json present means its weights are complete
    return json_path, pt_path


def _finite(v: Any) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
