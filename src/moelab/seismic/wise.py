"""WiSE-FT: a fine-tuned model averaged in weight space with the model it was fine-tuned from.

Wortsman et al. (2022, "Robust fine-tuning of zero-shot models") found that fine-tuning costs a
pretrained model robustness on data unlike the fine-tuning set, and that the weights
``(1 - alpha) * start + alpha * finetuned`` win much of it back at little in-domain cost, with no
extra training. In the SeisMoE quality runs the real test event (unlike every generated trace) is
picked by most bases and lost by some of their fine-tuned models, so this is the obvious lever to
measure (``bench/wise_ft.py``).

The start point is rebuilt from the run's own ``config.json`` the way `moelab.seismic.harness`
built it before training (seeded, ``base_model`` loaded, for SeisMoE upcycled with the same expert
noise), so no copy of it has to be kept; `start_state` of an EQTransformer fine-tuning is the base
checkpoint exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from moelab.errors import CheckpointError, ConfigError


def start_state(config: dict[str, Any]) -> dict[str, Tensor]:
    """The weights a ``benchmark/train.py`` run with ``config`` started from (its module as built
    before the first step); ``config`` needs a ``base_model`` in its ``model_args``."""
    from moelab.seismic import harness
    from moelab.seismic.config import validate

    if not (config.get("model_args") or {}).get("base_model"):
        raise ConfigError(f"run '{config.get('name')}' was trained from scratch (no model_args.base_model): it has no start point to interpolate with")
    return harness.build_module(validate(config)).state_dict()


def interpolate(start: dict[str, Tensor], finetuned: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """``(1 - alpha) * start + alpha * finetuned`` for every floating-point entry (BatchNorm
    statistics included); integer entries (BatchNorm's step counters) are the fine-tuned model's.
    ``alpha`` 0 is the start point, 1 the fine-tuned model."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1] (0: the start point, 1: the fine-tuned model), got {alpha}")
    if start.keys() != finetuned.keys():
        only_s, only_f = sorted(start.keys() - finetuned.keys()), sorted(finetuned.keys() - start.keys())
        raise CheckpointError(f"the start point and the fine-tuned model hold different weights (only in the start: {only_s[:3]}, only fine-tuned: {only_f[:3]}); interpolate a run with the config it was trained with")
    out: dict[str, Tensor] = {}
    for k, f in finetuned.items():
        s = start[k]
        if s.shape != f.shape:
            raise CheckpointError(f"'{k}' is {tuple(s.shape)} in the start point but {tuple(f.shape)} fine-tuned; interpolate a run with the config it was trained with")
        out[k] = (s.to(f.dtype) * (1.0 - alpha) + f * alpha) if f.is_floating_point() else f.clone()
    return out


def write_interpolated(run: str | os.PathLike, alpha: float, out: str | os.PathLike) -> Path:
    """``out/model.ckpt``: ``run/model.ckpt`` interpolated with its start point, in the same
    Lightning format (so evaluation, picking and export read it unchanged), and ``out/config.json``,
    the run's config. Returns the checkpoint's path."""
    from moelab.checkpoint import atomic_save
    from moelab.seismic.weights import read_lightning_file
    from moelab.validation import read_json_record

    run, out = Path(run), Path(out)
    config = read_json_record(run / "config.json", ("model", "model_args"), "pass a folder written by benchmark/train.py or the quality run")
    ckpt = read_lightning_file(run / "model.ckpt", "pass a folder written by benchmark/train.py or the quality run")
    mixed = interpolate(start_state(config), ckpt["state_dict"], alpha)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save({**ckpt, "state_dict": mixed, "wise_ft": {"alpha": alpha, "finetuned": str(run / "model.ckpt")}}, out / "model.ckpt")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out / "model.ckpt"
