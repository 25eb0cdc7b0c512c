"""`moelab diffusion train` and the quick-start's `python train.py` (same arguments)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moelab.errors import ConfigError


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config, e.g. configs/default.yaml (optional with --resume: the checkpoint's config)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    p.add_argument("--devices", type=int, default=1, help="number of devices; >1 trains with Lightning DDP")
    p.add_argument("--resume", help="checkpoint to continue from, e.g. checkpoints/checkpoint_epoch_10.pth")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (quick runs)")
    p.add_argument("--batch-size", type=int, help="override train.batch_size")
    p.add_argument("--precision", help="override train.precision: 32-true, bf16-mixed, 16-mixed (GPU)")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("--checkpoint-dir", default=None, help="where checkpoint_epoch_N.pth go (default: train.checkpoint_dir, i.e. checkpoints)")
    p.add_argument("--log-dir", help="CSV/TensorBoard logs (default: <checkpoint-dir>/logs)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override any config key, e.g. --set train.lr=3e-4")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (epoch summaries are still printed)")


def run_train(args: argparse.Namespace) -> int:
    from moelab.diffusion.config import load_config, parse_override

    overrides: dict[str, Any] = dict(parse_override(s) for s in args.set)
    for flag, key in (("batch_size", "train.batch_size"), ("precision", "train.precision"), ("epochs", "train.epochs"),
                      ("seed", "train.seed")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if args.config is not None:
        cfg = load_config(Path(args.config), overrides)
    elif args.resume is not None:
        from moelab.diffusion.checkpoints import read_checkpoint

        cfg = load_config(read_checkpoint(args.resume)["config"], overrides)
    else:
        raise ConfigError("give --config configs/<name>.yaml (or --resume <checkpoint> to continue a run)")
    from moelab.diffusion.training import fit  # Lightning is imported only once the config is valid
    from moelab.hostmem import retain_freed_memory

    retain_freed_memory()  # a training process: reuse freed memory across steps instead of page-faulting it in again

    last = fit(
        cfg,
        checkpoint_dir=args.checkpoint_dir if args.checkpoint_dir is not None else cfg.train.checkpoint_dir,
        accelerator=args.device,
        devices=args.devices,
        max_steps=args.max_steps,
        resume=args.resume,
        progress=not args.no_progress,
        logger_dir=args.log_dir,
    )
    print(f"last checkpoint: {last}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train MoEFsDiC (Lightning; checkpoints every epoch, exact --resume)")
    add_train_arguments(p)
    p.set_defaults(func=run_train)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of the repository's ``train.py``."""
    from moelab.guard import run_guarded, show_info_logs

    p = argparse.ArgumentParser(prog="train.py", description="Train MoEFsDiC (class-conditional diffusion U-Net with MoE).")
    add_train_arguments(p)
    args = p.parse_args(argv)
    show_info_logs()
    return run_guarded(lambda: run_train(args))
