"""The offline CPU demo: train on scikit-learn's digits, sample a grid, evaluate, analyse routing.

Everything it needs ships with the installed packages (the digits come with scikit-learn), so it
runs on a fresh machine without network, in minutes on two CPU cores.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("configs/digits.yaml")

#: Sampling settings of the demo (tuned on configs/digits.yaml; see bench/sampling.py): 20 steps of
#: SDE-DPM-Solver++(2M) at guidance 1.25. The stochastic solver gives the lower Fréchet distance at
#: 20 steps (0.85 vs 1.33 deterministic; its fresh noise corrects model errors). Guidance 1.25 is
#: where the Fréchet distance bottoms out with accuracy ~0.99, for MoEFsDiC and the dense baseline
#: alike; at w = 2 every class is over-sharpened (accuracy 1.000 but Fréchet 4-7).
DEMO_SAMPLER, DEMO_STEPS, DEMO_GUIDANCE = "dpm++sde", 20, 1.25


def run_demo(
    config: str | Path = DEFAULT_CONFIG,
    out_dir: str | Path = "outputs/demo",
    per_class: int = 100,
    grid_per_class: int = 10,
    sampler: str = DEMO_SAMPLER,
    steps: int = DEMO_STEPS,
    guidance: float = DEMO_GUIDANCE,
    seed: int = 0,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    max_steps: int | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Train → grid → evaluation → routing analysis → pipeline folder; returns the metrics written to ``metrics.json``.

    The trained model (EMA weights) is also exported as a `MoEFsDiCPipeline` folder,
    ``<out_dir>/pipeline``, loadable with ``MoEFsDiCPipeline.from_pretrained``.
    """
    from moelab.diffusion.analysis import format_load_table, routing_analysis, write_routing_report
    from moelab.diffusion.baseline import parameter_counts
    from moelab.diffusion.config import load_config
    from moelab.diffusion.data import dataset_tensors
    from moelab.diffusion.evaluate import METRIC_COLUMNS, Evaluator, check_eval_settings, evaluate_model, format_table, write_json
    from moelab.diffusion.checkpoints import load_model, read_checkpoint
    from moelab.diffusion.pipeline import export_pipeline
    from moelab.diffusion.sample import grid_labels, sample, save_grid
    from moelab.diffusion.training import fit
    from moelab.moe import moe_layers
    from moelab.validation import check_output

    wall0 = time.perf_counter()
    out = check_output("--out", out_dir, folder=True)
    if cache_dir is not None:
        check_output("--cache-dir", cache_dir, folder=True)
    cfg = load_config(config, {"train.checkpoint_every": 1} if max_steps is not None else None)
    check_eval_settings(cfg, per_class, sampler, steps)  # before training, not after
    log(f"[demo] training {config} ({cfg.data.dataset}, {cfg.model.image_size}px) -> {out / 'checkpoints'}")
    t0 = time.perf_counter()
    ckpt = fit(cfg, checkpoint_dir=out / "checkpoints", max_steps=max_steps, progress=progress, logger_dir=out / "logs")
    train_s = time.perf_counter() - t0
    steps_done = int(read_checkpoint(ckpt)["global_step"])
    model, cfg = load_model(ckpt, ema=True)  # EMA weights when training kept them
    pipeline = export_pipeline(ckpt, out / "pipeline", ema=True, sampler=sampler)

    log(f"[demo] sampling a grid ({sampler}, {steps} steps, guidance {guidance})")
    classes = list(range(cfg.model.num_classes))
    labels = grid_labels(classes, grid_per_class)
    grid = save_grid(sample(model, cfg, labels, sampler=sampler, steps=steps, guidance=guidance, seed=seed), labels, out / "grid.png")

    log(f"[demo] evaluating {per_class} samples per class against the held-out split")
    evaluator = Evaluator.for_config(cfg, cache_dir)
    res = evaluate_model(model, cfg, evaluator, per_class=per_class, sampler=sampler, steps=steps, guidance=guidance, seed=seed + 1)
    train_x, _ = dataset_tensors(cfg, "train")
    res["frechet_distance_real_train_vs_test"] = evaluator.reference(train_x)

    routing_dir = out / "routing"
    if moe_layers(model):
        report = routing_analysis(model, cfg, evaluator.real_images, evaluator.real_labels, seed=seed)
        write_routing_report(report, routing_dir)
        write_json(report, routing_dir / "routing.json")
        log(format_load_table(report))

    pc = parameter_counts(model)
    bs = cfg.train.batch_size * cfg.train.accumulate_grad_batches
    res.update(
        config=str(config), checkpoint=str(ckpt), pipeline=str(pipeline), train_steps=steps_done, train_seconds=train_s,
        train_samples_per_s=steps_done * bs / train_s, params_total=pc["total"], params_active=pc["active_per_sample"],
        wall_seconds=time.perf_counter() - wall0,
    )
    metrics = write_json(res, out / "metrics.json")
    log("")
    log(format_table([res], METRIC_COLUMNS + [("frechet_distance_real_train_vs_test", "Fréchet real/real", "{:.3f}"),
                                              ("train_seconds", "train s", "{:.0f}"), ("wall_seconds", "total s", "{:.0f}")]))
    log("")
    log(f"grid:     {grid}")
    log(f"metrics:  {metrics}")
    if routing_dir.exists():
        log(f"routing:  {routing_dir}/ (routing_by_class.png, routing_by_timestep.png, load_balance.png, *.csv)")
    log(f"model:    {ckpt}")
    log(f"pipeline: {pipeline}  (MoEFsDiCPipeline.from_pretrained)")
    return res
