"""MoEFsDiC against diffusers' dense UNet2DModel at equal active parameters and equal budget.

Both models are trained by the same `training.fit` on the same data, steps, seed and noise schedule
(only ``model.arch`` differs; the baseline's width is matched to MoEFsDiC's active parameters) and
evaluated by the same `Evaluator` with the same sampler and seeds, at every guidance weight of a
sweep. The sweep matters: the Fréchet distance depends far more on the guidance weight than on the
model (on digits 1.1-1.5 at w = 1-1.25, 4-7 at w = 2, where guidance over-sharpens every class),
and the models do not peak at the same w, so one fixed w ranks the over-guided images, not the
models. Each model is summarised at its best w (lowest Fréchet distance), as papers report FID.

Two budgets: equal optimizer steps (default) or equal wall-clock training time
(``budget_seconds``: each model trains until Lightning's ``max_time`` runs out, so the faster
model takes more steps; the LR schedule keeps the config's length, so set the budget below the
faster model's time for the full schedule if both are to be cut by it). On a shared machine the
wall-clock budget is only as equal as the load during the two runs: the rows record the steps each
model reached.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI reads this module's defaults at start-up, before torch is imported
    from moelab.diffusion.evaluate import Evaluator

COMPARE_COLUMNS = [
    ("params_total", "params total", "{:,}"),
    ("params_active", "params active", "{:,}"),
    ("train_steps", "train steps", "{:,}"),
    ("train_samples_per_s", "train samples/s", "{:.1f}"),
    ("train_seconds", "train s", "{:.1f}"),
    ("seconds_per_sample", "sample s/img", "{:.4f}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("frechet_distance", "Fréchet (clf)", "{:.3f}"),
    ("fid", "FID", "{:.2f}"),
]

SWEEP_COLUMNS = [("guidance", "guidance", "{:g}"), *COMPARE_COLUMNS]

BASELINES = ("unet2d",)

#: Guidance weights `compare` evaluates by default.
GUIDANCE_SWEEP = (1.0, 1.25, 1.5, 2.0)


def train_and_evaluate(
    config: Mapping[str, Any],
    out_dir: str | Path,
    evaluator: Evaluator | None = None,
    max_steps: int | None = None,
    train_seed: int | None = None,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    guidance: float | Sequence[float] = GUIDANCE_SWEEP,
    budget_seconds: float | None = None,
    **eval_kw: Any,
) -> list[dict[str, Any]]:
    """Train one config through `training.fit`, reload its EMA weights, evaluate at every guidance weight.

    One result row per guidance weight, each with the training figures.
    """
    from moelab.diffusion.baseline import parameter_counts
    from moelab.diffusion.evaluate import Evaluator, evaluate_model
    from moelab.diffusion.checkpoints import load_model, read_checkpoint
    from moelab.diffusion.training import fit

    out = Path(out_dir)
    t0 = time.perf_counter()
    ckpt = fit(
        config, checkpoint_dir=out / "checkpoints", max_steps=max_steps, seed=train_seed, progress=progress,
        logger_dir=out / "logs", max_time=budget_seconds,
    )
    train_s = time.perf_counter() - t0
    steps = int(read_checkpoint(ckpt)["global_step"])
    model, cfg = load_model(ckpt, ema=True)  # EMA weights when training kept them
    if evaluator is None:
        evaluator = Evaluator.for_config(cfg, cache_dir)
    pc = parameter_counts(model)
    bs = cfg["train"]["batch_size"] * cfg["train"]["accumulate_grad_batches"]
    trained = dict(
        arch=cfg["model"]["arch"], checkpoint=str(ckpt), train_steps=steps, train_seconds=train_s,
        train_samples_per_s=steps * bs / train_s, params_total=pc["total"], params_active=pc["active_per_sample"],
        budget_seconds=budget_seconds, train_seed=cfg["train"]["seed"] if train_seed is None else int(train_seed),
    )
    return [{**evaluate_model(model, cfg, evaluator, guidance=w, **eval_kw), **trained} for w in guidance_weights(guidance)]


def guidance_weights(guidance: float | Sequence[float]) -> list[float]:
    """One weight or a sweep, as a list."""
    return [float(guidance)] if isinstance(guidance, (int, float)) else [float(w) for w in guidance]


def best_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The row with the lowest Fréchet distance (ties: the higher accuracy)."""
    return min(rows, key=lambda r: (r["frechet_distance"], -r["accuracy"]))


def compare(
    config: str | Path | Mapping[str, Any],
    out_dir: str | Path = "outputs/compare",
    baseline: str = "unet2d",
    max_steps: int | None = None,
    train_seed: int | None = None,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    guidance: float | Sequence[float] = GUIDANCE_SWEEP,
    budget_seconds: float | None = None,
    **eval_kw: Any,
) -> dict[str, Any]:
    """Train MoEFsDiC and the dense baseline, evaluate both at every guidance weight; write ``compare.json``.

    ``budget_seconds``: train each model for this wall-clock time instead of for equal steps
    (``max_steps``, if also given, still caps the steps).
    Returns ``results`` (one row per model and guidance weight), ``rows`` (each model at its best
    weight), ``table`` (all results) and ``best_table``.
    """
    from moelab.diffusion.config import load_config
    from moelab.diffusion.evaluate import Evaluator, check_eval_settings, format_table, write_json
    from moelab.diffusion.sample import is_guidance_weight
    from moelab.errors import ConfigError
    from moelab.validation import check_output

    if baseline not in BASELINES:
        raise ConfigError(f"--baseline '{baseline}' is not known; use one of: {', '.join(BASELINES)}")
    weights = guidance_weights(guidance)
    if not weights or not all(map(is_guidance_weight, weights)):  # checked before hours of training, not after
        raise ConfigError(f"--guidance {' '.join(map(str, weights))}: give one or more weights >= 0 (1 = no guidance)")
    out = check_output("--out", out_dir, folder=True)
    overrides = dict(overrides or {})
    if budget_seconds is not None and not budget_seconds > 0:
        raise ConfigError(f"--budget-seconds {budget_seconds} must be a positive number of seconds")
    if max_steps is not None or budget_seconds is not None:  # a run cut short must still end with a checkpoint
        overrides["train.checkpoint_every"] = 1
    base = load_config(config, overrides)
    moe_cfg = load_config({**base, "model": {**base["model"], "arch": "moefsdic"}})
    dense_cfg = load_config({**base, "model": {**base["model"], "arch": baseline}})
    check_eval_settings(moe_cfg, **eval_kw)
    evaluator = Evaluator.for_config(moe_cfg, cache_dir)
    results: dict[str, list[dict[str, Any]]] = {}
    for name, cfg in (("moefsdic", moe_cfg), (baseline, dense_cfg)):
        results[name] = train_and_evaluate(
            cfg, out / name, evaluator, max_steps=max_steps, train_seed=train_seed, progress=progress, guidance=weights,
            budget_seconds=budget_seconds, **eval_kw,
        )
    flat = [r for rows in results.values() for r in rows]
    names = [name for name, rows in results.items() for _ in rows]
    best = {name: best_row(rows) for name, rows in results.items()}
    result = {
        "results": flat,
        "rows": best,
        "table": format_table(flat, SWEEP_COLUMNS, names),
        "best_table": format_table(list(best.values()), SWEEP_COLUMNS, list(best)),
    }
    write_json(result, out / "compare.json")
    return result


#: Fields `summarize_seeds` reads from every result row of a ``compare.json``.
_ROW_KEYS = ("arch", "guidance", "frechet_distance", "accuracy", "train_steps")
#: Fields that must agree between the runs `summarize_seeds` pairs (per model).
_SAME_KEYS = ("params_total", "params_active", "budget_seconds")


def _read_compare(path: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """A ``compare.json`` (or the folder holding one) as its result rows, checked."""
    import json

    from moelab.errors import DataError

    p = Path(path)
    if p.is_dir():
        p = p / "compare.json"
    if not p.is_file():
        raise DataError(f"'{path}' is neither a compare.json nor a folder holding one (written by `moelab diffusion compare --out DIR`)")
    try:
        rows = json.loads(p.read_text())["results"]
        for r in rows:
            missing = [k for k in _ROW_KEYS if k not in r]
            if missing:
                raise KeyError(", ".join(missing))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"'{p}' is not a `moelab diffusion compare` result ({type(e).__name__}: {e}); re-run compare to rewrite it") from None
    return p, rows


def summarize_seeds(paths: Sequence[str | Path]) -> dict[str, Any]:
    """MoEFsDiC against the dense baseline over several ``compare`` runs (one per training seed).

    Each run contributes each model at its best guidance weight (`best_row`); the Fréchet distances
    are paired by run, and their differences (MoEFsDiC minus dense) get the mean ± std, the 95%
    Student-t interval and the verdict of `moelab.paired` (lower is better), with the count of runs
    where MoEFsDiC's is lower or equal. The runs must be comparable: the same two models (parameter
    counts), the same guidance sweep and the same budget; they may differ in seed only.
    """
    from moelab.errors import ConfigError
    from moelab.paired import interval_cell, mean_std, paired_interval, paired_verdict

    if len(paths) < 1:
        raise ConfigError("give one or more compare outputs (folders or compare.json files)")
    runs = []
    for path in paths:
        p, rows = _read_compare(path)
        by_arch: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_arch.setdefault(r["arch"], []).append(r)
        if "moefsdic" not in by_arch or len(by_arch) != 2:
            raise ConfigError(f"'{p}' holds models {sorted(by_arch)}; a compare run holds MoEFsDiC and one dense baseline")
        runs.append((p, by_arch))
    files: set[Path] = set()
    seeds: dict[Any, Path] = {}
    for p, by_arch in runs:  # each seed once: a run given twice would count as two agreeing seeds
        if p.resolve() in files:
            raise ConfigError(f"'{p}' is given twice: pass one compare run per training seed")
        files.add(p.resolve())
        seed = by_arch["moefsdic"][0].get("train_seed")
        if seed is not None and seed in seeds:
            raise ConfigError(f"'{p}' and '{seeds[seed]}' were both trained with --train-seed {seed}: pass one compare run per training seed")
        if seed is not None:
            seeds[seed] = p
    first_path, first = runs[0]
    for p, by_arch in runs[1:]:
        if sorted(by_arch) != sorted(first):
            raise ConfigError(f"'{p}' compares {sorted(by_arch)}, '{first_path}' {sorted(first)}: pair runs of the same models")
        for arch, rows in by_arch.items():
            weights, ref_weights = sorted(r["guidance"] for r in rows), sorted(r["guidance"] for r in first[arch])
            if weights != ref_weights:
                raise ConfigError(f"'{p}' evaluated {arch} at guidance {weights}, '{first_path}' at {ref_weights}: use the same --guidance")
            for key in _SAME_KEYS:
                if rows[0].get(key) != first[arch][0].get(key):
                    raise ConfigError(
                        f"'{p}' and '{first_path}' differ in {key} of {arch} ({rows[0].get(key)} vs {first[arch][0].get(key)}): "
                        "pair runs of one config and budget"
                    )
    baseline = next(a for a in first if a != "moefsdic")
    seeds = []
    for p, by_arch in runs:
        moe, dense = best_row(by_arch["moefsdic"]), best_row(by_arch[baseline])
        seed = moe.get("train_seed")
        seeds.append({"run": str(p), "seed": p.parent.name if seed is None else seed, "moefsdic": moe, baseline: dense,
                      "delta_frechet": moe["frechet_distance"] - dense["frechet_distance"],
                      "delta_accuracy": moe["accuracy"] - dense["accuracy"]})
    fd = [r["delta_frechet"] for r in seeds]
    acc = [r["delta_accuracy"] for r in seeds]
    m, sd = mean_std(fd)
    _, lo, hi = paired_interval(fd)
    wins = sum(d <= 0 for d in fd)
    ci = None if math.isnan(lo) else [lo, hi]  # one seed: no interval
    lines = [
        f"| seed | MoEFsDiC steps | MoEFsDiC acc / Fréchet (w) | {baseline} steps | {baseline} acc / Fréchet (w) | Δ Fréchet |",
        "|---|---|---|---|---|---|",
    ]
    for r in seeds:
        a, b = r["moefsdic"], r[baseline]
        lines.append(
            f"| {r['seed']} | {a['train_steps']:,} | {a['accuracy']:.3f} / {a['frechet_distance']:.2f} ({a['guidance']:g}) | "
            f"{b['train_steps']:,} | {b['accuracy']:.3f} / {b['frechet_distance']:.2f} ({b['guidance']:g}) | {r['delta_frechet']:+.2f} |"
        )
    ma, sda = mean_std(acc)
    lines += [
        "",
        f"Fréchet distance at each model's best w, MoEFsDiC − {baseline} over {len(seeds)} seeds: "
        f"{m:+.3f} ± {sd:.3f}, 95% CI {interval_cell(fd, lower_is_better=True)}; MoEFsDiC lower or equal on {wins} of {len(seeds)}",
        f"accuracy at those w, MoEFsDiC − {baseline}: {ma:+.3f} ± {sda:.3f}, 95% CI {interval_cell(acc, lower_is_better=False)}",
        f"compare_seeds: frechet moe-dense={m:+.3f} ± {sd:.3f} {'[no interval]' if ci is None else f'[{lo:+.3f}, {hi:+.3f}]'} "
        f"wins={wins}/{len(seeds)} "
        f"({paired_verdict(fd, lower_is_better=True)})",
    ]
    return {"seeds": seeds, "baseline": baseline, "delta_frechet": {"mean": m, "std": sd, "ci95": ci}, "wins": wins,
            "table": "\n".join(lines)}
