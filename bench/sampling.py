"""Accuracy vs sampling steps: DDPM-1000, DDIM-50, DPM-Solver++-20/-10 (deterministic, ``dpm++``) and
SDE-DPM-Solver++-20/-10 (stochastic, ``dpm++sde``, the demo's sampler) on the demo checkpoint.

Every solver samples the same labels from the same seed with the same guidance, on the EMA weights;
conditional accuracy and Fréchet distance come from the project's evaluator (classifier trained on
the real training split, compared with the held-out split); time is wall-clock per image.
The two last lines compare 20 DPM-Solver++ steps with 1000 DDPM steps, first for the SDE variant
(``sampling: dpm++sde20/ddpm1000 ...``), then, as the very last line, for the deterministic one:
``sampling: dpm++20/ddpm1000 speedup=<x> acc_drop=<y>`` with speedup = DDPM-1000's time per image /
DPM++-20's and acc_drop = DDPM-1000 accuracy - DPM++-20 accuracy.

Usage: python bench/sampling.py [--checkpoint outputs/demo/checkpoints/checkpoint_epoch_N.pth]
       [--per-class 50] [--guidance 1.25] [--threads 2]
(run `moelab diffusion demo` first; without --checkpoint the newest demo checkpoint is used)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

RUNS = [("ddpm", 1000), ("ddim", 50), ("dpm++", 20), ("dpm++", 10), ("dpm++sde", 20), ("dpm++sde", 10)]


def newest_checkpoint(folder: Path) -> Path:
    from moelab.diffusion.training import checkpoints_in
    from moelab.errors import CheckpointError

    found = checkpoints_in(folder)
    if not found:
        raise CheckpointError(f"no checkpoint_epoch_N.pth in '{folder}': run `moelab diffusion demo` first or pass --checkpoint")
    return found[-1]


def run(args: argparse.Namespace) -> int:
    import torch

    from moelab.diffusion.demo import DEMO_GUIDANCE
    from moelab.diffusion.evaluate import Evaluator, evaluate_model, format_table, write_json
    from moelab.diffusion.checkpoints import load_model
    from moelab.diffusion.sample_cli import set_threads
    from moelab.validation import check_output

    set_threads(args.threads)
    if args.json:
        check_output("--json", args.json)
    ckpt = Path(args.checkpoint) if args.checkpoint else newest_checkpoint(Path("outputs/demo/checkpoints"))
    guidance = DEMO_GUIDANCE if args.guidance is None else args.guidance
    model, cfg = load_model(ckpt, ema=True)
    ev = Evaluator.for_config(cfg, args.cache_dir)
    print(f"checkpoint {ckpt}; {args.per_class} images per class, guidance {guidance}, seed {args.seed}, "
          f"{torch.get_num_threads()} threads", flush=True)
    rows, names = [], []
    for sampler, steps in RUNS:
        res = evaluate_model(model, cfg, ev, per_class=args.per_class, sampler=sampler, steps=steps, guidance=guidance, seed=args.seed)
        rows.append(res)
        names.append(f"{sampler}-{steps}")
        print(f"{names[-1]:>10}: accuracy {res['accuracy']:.4f}  Fréchet {res['frechet_distance']:.3f}  "
              f"{res['seconds_per_sample'] * 1000:.1f} ms/image", flush=True)
    cols = [("steps", "steps", "{}"), ("accuracy", "accuracy", "{:.4f}"), ("frechet_distance", "Fréchet (clf)", "{:.3f}"),
            ("seconds_per_sample", "s/image", "{:.4f}")]
    print(format_table(rows, cols, names))
    if args.json:
        write_json({n: r for n, r in zip(names, rows, strict=True)}, args.json)
    by = dict(zip(names, rows, strict=True))
    ddpm = by["ddpm-1000"]
    for name in ("dpm++sde-20", "dpm++-20"):
        r = by[name]
        speedup = ddpm["seconds_per_sample"] / r["seconds_per_sample"]
        drop = ddpm["accuracy"] - r["accuracy"]
        print(f"sampling: {name.replace('-', '')}/ddpm1000 speedup={speedup:.1f} acc_drop={drop:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from moelab.cli import run_guarded

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--guidance", type=float, default=None, help="default: the demo's guidance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", default=None, help="also write all rows to this JSON file")
    args = p.parse_args(argv)
    return run_guarded(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
