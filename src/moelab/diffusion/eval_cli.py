"""`moelab diffusion evaluate | analyze | compare | compare-seeds`: how good a model is, how it routes, and
whether it beats the dense baseline.

Errors in user input surface as `MoelabError`s, which the top-level CLI prints as one line
(``error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from moelab.diffusion.sample_cli import sampling_args, set_threads, steps_for
from moelab.validation import check_output


def _eval_kw(args: argparse.Namespace) -> dict[str, Any]:
    return dict(per_class=args.per_class, sampler=args.sampler, steps=steps_for(args), guidance=args.guidance,
                seed=args.seed, batch_size=args.batch_size)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from moelab.diffusion.evaluate import METRIC_COLUMNS, evaluate_checkpoint, format_table, write_json

    set_threads(args.threads)
    if args.json:
        check_output("--json", args.json)
    res = evaluate_checkpoint(
        args.checkpoint, ema=not args.no_ema, cache_dir=args.cache_dir, inception_weights=args.inception_weights, **_eval_kw(args)
    )
    print(format_table([res], METRIC_COLUMNS))
    print("per-class accuracy: " + "  ".join(f"{c}:{a:.2f}" for c, a in res["per_class_accuracy"].items()))
    if args.json:
        print(f"metrics: {write_json(res, args.json)}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from moelab.diffusion.analysis import format_load_table, routing_analysis, write_routing_report
    from moelab.diffusion.data import dataset_tensors
    from moelab.diffusion.evaluate import write_json
    from moelab.diffusion.checkpoints import load_model

    set_threads(args.threads)
    check_output("--out", args.out, folder=True)
    model, cfg = load_model(args.checkpoint, ema=not args.no_ema)
    images, labels = dataset_tensors(cfg, args.split)
    report = routing_analysis(model, cfg, images, labels, buckets=args.buckets, include_null=not args.no_null, seed=args.seed)
    paths = write_routing_report(report, args.out)
    write_json(report, Path(args.out) / "routing.json")
    print(format_load_table(report))
    print(f"routing analysis: {Path(args.out)}/ ({', '.join(sorted(paths))}, routing.json)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from moelab.diffusion.compare import compare
    from moelab.diffusion.config import parse_override
    from moelab.hostmem import retain_freed_memory

    set_threads(args.threads)
    retain_freed_memory()  # a training process: both models' steps reuse freed memory (moelab.hostmem)
    overrides = dict(parse_override(s) for s in args.set)
    res = compare(
        args.config, args.out, baseline=args.baseline, max_steps=args.max_steps, train_seed=args.train_seed,
        budget_seconds=args.budget_seconds, progress=not args.no_progress, cache_dir=args.cache_dir, overrides=overrides, **_eval_kw(args),
    )
    print(res["table"])
    print("")
    print("each model at its best guidance weight (lowest Fréchet distance):")
    print(res["best_table"])
    print(f"results: {Path(args.out) / 'compare.json'}")
    return 0


def cmd_compare_seeds(args: argparse.Namespace) -> int:
    from moelab.diffusion.compare import summarize_seeds
    from moelab.diffusion.evaluate import write_json

    if args.json:
        check_output("--json", args.json)
    res = summarize_seeds(args.runs)
    print(res["table"])
    if args.json:
        print(f"summary: {write_json(res, args.json)}")
    return 0


def register(sub: Any) -> None:
    """Add the evaluation / analysis / comparison subcommands."""
    def eval_args(p: argparse.ArgumentParser, per_class: int, sweep: bool = False) -> None:
        p.add_argument("--per-class", type=int, default=per_class, help=f"generated images per class (default {per_class})")
        p.add_argument("--cache-dir", default=None, help="where the evaluation classifier is cached (default ~/.cache/moelab)")
        sampling_args(p, sweep)

    p = sub.add_parser("evaluate", help="conditional accuracy, Fréchet distance and time per sample of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--inception-weights", default=None,
                   help="local Inception weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth or "
                        "pytorch-fid's pt_inception-2015-12-05-6726825d.pth): also report the standard FID (never downloaded)")
    eval_args(p, 100)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("analyze", help="expert usage by class and timestep for every MoE block (CSV + PNG)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default="routing", help="output folder")
    p.add_argument("--split", default="test", help="real images to noise and route (train | test)")
    p.add_argument("--buckets", type=int, default=10, help="timestep buckets")
    p.add_argument("--no-null", action="store_true", help="skip the unconditional (null-class) pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("compare", help="train MoEFsDiC and a dense UNet2D at equal active params; one table")
    p.add_argument("--config", required=True, help="MoEFsDiC config (YAML)")
    p.add_argument("--baseline", default="unet2d", help="dense baseline (unet2d: diffusers' UNet2DModel)")
    p.add_argument("--out", default="outputs/compare", help="output folder")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps for both (default: the config's epochs)")
    p.add_argument("--train-seed", type=int, default=None, help="training seed for both (default: train.seed)")
    p.add_argument(
        "--budget-seconds", type=float, default=None, metavar="S",
        help="equal wall-clock budget: train each model for S seconds (default: equal steps)",
    )
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--no-progress", action="store_true")
    eval_args(p, 100, sweep=True)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "compare-seeds", help="MoEFsDiC vs the dense baseline over several compare runs (one per --train-seed): paired Fréchet differences"
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="compare output folders (or their compare.json), one per training seed")
    p.add_argument("--json", default=None, help="also write the summary to this JSON file")
    p.set_defaults(func=cmd_compare_seeds)
