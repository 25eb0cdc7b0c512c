"""`moelab diffusion demo`: the offline CPU demo (train on digits, sample, evaluate, analyse, export)."""

from __future__ import annotations

import argparse
from typing import Any

from moelab.diffusion.sample_cli import set_threads


def cmd_demo(args: argparse.Namespace) -> int:
    from moelab.diffusion.demo import run_demo
    from moelab.hostmem import retain_freed_memory

    set_threads(args.threads)
    retain_freed_memory()  # a training process: reuse freed memory across steps (moelab.hostmem)
    run_demo(args.config, args.out, per_class=args.per_class, seed=args.seed, progress=not args.no_progress,
             cache_dir=args.cache_dir, max_steps=args.max_steps)
    return 0


def register(sub: Any) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser("demo", help="offline CPU demo: train configs/digits.yaml, sample a grid, evaluate, analyse, export")
    p.add_argument("--config", default="configs/digits.yaml", help="config path or packaged name (default: configs/digits.yaml)")
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
