"""MoEFsDiC against diffusers' dense UNet2DModel at equal active parameters and equal budget.

Both models are trained by the same `training.fit` on the same data, steps, seed and noise schedule
(only ``model.arch`` differs; the baseline's width is matched to MoEFsDiC's active parameters) and
evaluated by the same `Evaluator` with the same sampler, guidance and seeds.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moelab.diffusion.evaluate import Evaluator, evaluate_model, format_table, write_json

COMPARE_COLUMNS = [
    ("params_total", "params total", "{:,}"),
    ("params_active", "params active", "{:,}"),
    ("train_samples_per_s", "train samples/s", "{:.1f}"),
    ("train_seconds", "train s", "{:.1f}"),
    ("seconds_per_sample", "sample s/img", "{:.4f}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("frechet_distance", "Fréchet (clf)", "{:.3f}"),
    ("fid", "FID", "{:.2f}"),
]

BASELINES = ("unet2d",)


def train_and_evaluate(
    config: Mapping[str, Any],
    out_dir: str | Path,
    evaluator: Evaluator | None = None,
    max_steps: int | None = None,
    train_seed: int | None = None,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    **eval_kw: Any,
) -> dict[str, Any]:
    """Train one config through `training.fit`, reload its EMA weights, evaluate; one result row."""
    from moelab.diffusion.baseline import parameter_counts
    from moelab.diffusion.lit import load_model, read_checkpoint
    from moelab.diffusion.training import fit

    out = Path(out_dir)
    t0 = time.perf_counter()
    ckpt = fit(config, checkpoint_dir=out / "checkpoints", max_steps=max_steps, seed=train_seed, progress=progress, logger_dir=out / "logs")
    train_s = time.perf_counter() - t0
    steps = int(read_checkpoint(ckpt)["global_step"])
    model, cfg = load_model(ckpt, ema=True)  # EMA weights when training kept them
    if evaluator is None:
        evaluator = Evaluator.for_config(cfg, cache_dir)
    res = evaluate_model(model, cfg, evaluator, **eval_kw)
    pc = parameter_counts(model)
    bs = cfg["train"]["batch_size"] * cfg["train"]["accumulate_grad_batches"]
    res.update(
        arch=cfg["model"]["arch"], checkpoint=str(ckpt), train_steps=steps, train_seconds=train_s,
        train_samples_per_s=steps * bs / train_s, params_total=pc["total"], params_active=pc["active_per_sample"],
    )
    return res


def compare(
    config: str | Path | Mapping[str, Any],
    out_dir: str | Path = "outputs/compare",
    baseline: str = "unet2d",
    max_steps: int | None = None,
    train_seed: int | None = None,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    **eval_kw: Any,
) -> dict[str, Any]:
    """Train and evaluate MoEFsDiC and the dense baseline; write ``compare.json``; return both rows."""
    from moelab.diffusion.config import load_config
    from moelab.errors import ConfigError

    if baseline not in BASELINES:
        raise ConfigError(f"--baseline '{baseline}' is not known; use one of: {', '.join(BASELINES)}")
    out = Path(out_dir)
    overrides = dict(overrides or {})
    if max_steps is not None:  # a run cut short by steps must still end with a checkpoint
        overrides["train.checkpoint_every"] = 1
    base = load_config(config, overrides)
    moe_cfg = load_config({**base, "model": {**base["model"], "arch": "moefsdic"}})
    dense_cfg = load_config({**base, "model": {**base["model"], "arch": baseline}})
    evaluator = Evaluator.for_config(moe_cfg, cache_dir)
    rows = {}
    for name, cfg in (("moefsdic", moe_cfg), (baseline, dense_cfg)):
        rows[name] = train_and_evaluate(
            cfg, out / name, evaluator, max_steps=max_steps, train_seed=train_seed, progress=progress, **eval_kw
        )
    result = {"rows": rows, "table": format_table(list(rows.values()), COMPARE_COLUMNS, list(rows))}
    write_json(result, out / "compare.json")
    return result
