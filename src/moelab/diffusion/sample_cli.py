"""`moelab diffusion sample | export`: images from a checkpoint or a pipeline folder, and pipeline export.

Also the sampling flags every sampling command shares (`sampling_args`, `steps_for`, `set_threads`).
Flags map onto the library's keyword arguments; errors in user input are `MoelabError`s, printed
by `moelab.guard.run_guarded` as one line with exit status 2.
"""

from __future__ import annotations

import argparse
from typing import Any

from moelab.errors import ConfigError
from moelab.validation import at_least_one, check_output

DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50, "dpm++": 20, "dpm++sde": 20}


def set_threads(n: int | None) -> None:
    if n is not None:
        import torch

        at_least_one(("--threads", n))
        torch.set_num_threads(n)


def sampling_args(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """The flags of every command that samples: solver, steps, guidance, seed, batch, EMA, threads."""
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


def steps_for(args: argparse.Namespace) -> int:
    from moelab.diffusion.sample import canonical_sampler

    return args.steps if args.steps is not None else DEFAULT_STEPS[canonical_sampler(args.sampler)]


def check_grid_path(out: str) -> None:
    """``--out`` must be a writable file whose extension names an image format Pillow writes."""
    from pathlib import Path

    from PIL import Image

    check_output("--out", out)
    suffix = Path(out).suffix.lower()
    if suffix not in Image.registered_extensions():
        raise ConfigError(f"--out '{out}' has no image file extension Pillow can write ('{suffix}'); end it in .png, e.g. grid.png")


def cmd_sample(args: argparse.Namespace) -> int:
    from moelab.diffusion.pipeline import load_denoiser
    from moelab.diffusion.sample import canonical_sampler, grid_labels, parse_classes, sample, save_grid, save_npz

    set_threads(args.threads)
    canonical_sampler(args.sampler)
    at_least_one(("--per-class", args.per_class))
    check_grid_path(args.out)
    if args.npz:
        check_output("--npz", args.npz)
    model, schedule = load_denoiser(args.checkpoint, ema=not args.no_ema)
    labels = grid_labels(parse_classes(args.classes, model.num_classes), args.per_class)
    images = sample(model, schedule, labels, sampler=args.sampler, steps=steps_for(args), guidance=args.guidance,
                    seed=args.seed, batch_size=args.batch_size)
    print(f"grid: {save_grid(images, labels, args.out)}")
    if args.npz:
        print(f"samples: {save_npz(images, labels, args.npz)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from moelab.diffusion.pipeline import export_pipeline

    out = export_pipeline(args.checkpoint, args.out, ema=not args.no_ema, sampler=args.sampler)
    print(f"pipeline: {out}  (MoEFsDiCPipeline.from_pretrained('{out}'))")
    return 0


def register(sub: Any) -> None:
    """Add the ``sample`` and ``export`` subcommands."""
    p = sub.add_parser("sample", help="sample a labelled PNG grid (rows = classes) from a checkpoint or pipeline folder")
    p.add_argument("--checkpoint", "--pipeline", dest="checkpoint", required=True,
                   help="training checkpoint (checkpoint_epoch_N.pth) or pipeline folder (moelab diffusion export, demo)")
    p.add_argument("--classes", default="all", help="class ids: '0-9', '1,3,5' or 'all' (default)")
    p.add_argument("--per-class", type=int, default=8, help="images per class (grid columns)")
    p.add_argument("--out", default="grid.png", help="PNG grid to write")
    p.add_argument("--npz", default=None, help="also save the samples (uint8 NHWC + labels) to this .npz")
    sampling_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="write a diffusers pipeline folder (MoEFsDiCPipeline) from a training checkpoint")
    p.add_argument("--checkpoint", required=True, help="training checkpoint (checkpoint_epoch_N.pth)")
    p.add_argument("--out", required=True, help="pipeline folder to write (model_index.json, unet/, scheduler/)")
    p.add_argument("--sampler", default="dpm++sde", help="the pipeline's scheduler (default dpm++sde, the demo's)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.set_defaults(func=cmd_export)
