"""`moelab diffusion sample | evaluate | analyze | compare | demo`.

Errors in user input surface as `MoelabError`s, which the top-level CLI prints as one line
(``error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50, "dpm++": 20, "dpm++sde": 20}


def _set_threads(n: int | None) -> None:
    if n is not None:
        import torch

        if n < 1:
            from moelab.errors import ConfigError

            raise ConfigError(f"--threads {n} must be at least 1")
        torch.set_num_threads(n)


def _sampling_args(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    from moelab.diffusion.compare import GUIDANCE_SWEEP
    from moelab.diffusion.demo import DEMO_GUIDANCE

    p.add_argument("--sampler", default="dpm++sde",
                   help="ddpm | ddim | dpm++ (DPM-Solver++(2M)) | dpm++sde (SDE-DPM-Solver++(2M), default)")
    p.add_argument("--steps", type=int, default=None, help="solver steps (default: ddpm 1000, ddim 50, dpm++/dpm++sde 20)")
    if sweep:
        p.add_argument("--guidance", type=float, nargs="+", default=list(GUIDANCE_SWEEP), metavar="W",
                       help=f"guidance weights to evaluate each model at (default {' '.join(map(str, GUIDANCE_SWEEP))})")
    else:
        p.add_argument("--guidance", type=float, default=DEMO_GUIDANCE,
                       help=f"classifier-free guidance weight w (1 = none; default {DEMO_GUIDANCE}, the demo's)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed -> same images)")
    p.add_argument("--batch-size", type=int, default=250, help="images denoised at once")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _steps(args: argparse.Namespace) -> int:
    from moelab.diffusion.sample import canonical_sampler

    return args.steps if args.steps is not None else DEFAULT_STEPS[canonical_sampler(args.sampler)]


def _eval_kw(args: argparse.Namespace) -> dict[str, Any]:
    return dict(per_class=args.per_class, sampler=args.sampler, steps=_steps(args), guidance=args.guidance,
                seed=args.seed, batch_size=args.batch_size)


def cmd_sample(args: argparse.Namespace) -> int:
    from moelab.diffusion.sample import canonical_sampler, sample_checkpoint, save_grid, save_npz

    _set_threads(args.threads)
    canonical_sampler(args.sampler)
    if args.per_class < 1:
        from moelab.errors import ConfigError

        raise ConfigError(f"--per-class {args.per_class} must be at least 1")
    images, labels, _ = sample_checkpoint(
        args.checkpoint, args.classes, args.per_class, ema=not args.no_ema, sampler=args.sampler,
        steps=_steps(args), guidance=args.guidance, seed=args.seed, batch_size=args.batch_size,
    )
    print(f"grid: {save_grid(images, labels, args.out)}")
    if args.npz:
        print(f"samples: {save_npz(images, labels, args.npz)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from moelab.diffusion.evaluate import METRIC_COLUMNS, evaluate_checkpoint, format_table, write_json

    _set_threads(args.threads)
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
    from moelab.diffusion.sample import load_for_inference

    _set_threads(args.threads)
    model, cfg = load_for_inference(args.checkpoint, ema=not args.no_ema)
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

    _set_threads(args.threads)
    overrides = dict(parse_override(s) for s in args.set)
    res = compare(
        args.config, args.out, baseline=args.baseline, max_steps=args.max_steps, train_seed=args.train_seed,
        progress=not args.no_progress, cache_dir=args.cache_dir, overrides=overrides, **_eval_kw(args),
    )
    print(res["table"])
    print("")
    print("each model at its best guidance weight (lowest Fréchet distance):")
    print(res["best_table"])
    print(f"results: {Path(args.out) / 'compare.json'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from moelab.diffusion.demo import run_demo

    _set_threads(args.threads)
    run_demo(args.config, args.out, per_class=args.per_class, seed=args.seed, progress=not args.no_progress,
             cache_dir=args.cache_dir, max_steps=args.max_steps)
    return 0


def register(sub: Any) -> None:
    """Add the sampling / evaluation / analysis / comparison / demo subcommands."""
    p = sub.add_parser("sample", help="sample a labelled PNG grid (rows = classes) from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="training checkpoint (checkpoint_epoch_N.pth)")
    p.add_argument("--classes", default="all", help="class ids: '0-9', '1,3,5' or 'all' (default)")
    p.add_argument("--per-class", type=int, default=8, help="images per class (grid columns)")
    p.add_argument("--out", default="grid.png", help="PNG grid to write")
    p.add_argument("--npz", default=None, help="also save the samples (uint8 NHWC + labels) to this .npz")
    _sampling_args(p)
    p.set_defaults(func=cmd_sample)

    def eval_args(p: argparse.ArgumentParser, per_class: int, sweep: bool = False) -> None:
        p.add_argument("--per-class", type=int, default=per_class, help=f"generated images per class (default {per_class})")
        p.add_argument("--cache-dir", default=None, help="where the evaluation classifier is cached (default ~/.cache/moelab)")
        _sampling_args(p, sweep)

    p = sub.add_parser("evaluate", help="conditional accuracy, Fréchet distance and time per sample of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--inception-weights", default=None,
                   help="local pt_inception-2015-12-05 weights file: also report the true FID (never downloaded)")
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
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--no-progress", action="store_true")
    eval_args(p, 100, sweep=True)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="offline CPU demo: train configs/digits.yaml, sample a grid, evaluate, analyse")
    p.add_argument("--config", default="configs/digits.yaml")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--per-class", type=int, default=100, help="generated images per class for the evaluation")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--max-steps", type=int, default=None, help="cap the training steps (quick check)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the demo model is tiny, and one thread is immune to the "
                        "OpenMP oversubscription that slows 2 threads 10-100x when other processes share 2 cores)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)


if __name__ == "__main__":  # pragma: no cover
    from moelab.cli import main

    sys.exit(main(["diffusion", *sys.argv[1:]]))
