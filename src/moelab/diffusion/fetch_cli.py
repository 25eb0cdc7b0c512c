"""`moelab data fetch cifar10|mnist|fashion_mnist --root DIR`: the real image data sets, verified.

Registered by the top-level CLI as the ``data`` command family; errors are `MoelabError`s (one
``error: ...`` line, exit status 2), offline ones naming the file, its URL and where to put it.
"""

from __future__ import annotations

import argparse
import sys


def cmd_fetch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from moelab.diffusion.fetch import fetch

    bars: dict[str, tqdm] = {}

    def progress(name: str, got: int, total: int | None) -> None:
        if name not in bars:
            bars[name] = tqdm(total=total, unit="B", unit_scale=True, desc=name, leave=False, file=sys.stderr)
        bars[name].update(got - bars[name].n)

    try:
        root = fetch(args.name, args.root, base_url=args.base_url, timeout=args.timeout, log=print,
                     progress=None if args.no_progress else progress)
    finally:
        for bar in bars.values():
            bar.close()
    print(f"ready: set data.dataset: {args.name} and data.root: {root}")
    return 0


def add_commands(parser: argparse.ArgumentParser) -> None:
    """Add the ``fetch`` subcommand to the ``data`` family."""
    from moelab.diffusion.fetch import BASE_URL_ENV, DEFAULT_ROOTS, SOURCES

    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch", help="download a data set with checksum verification (atomic, resumable)")
    p.add_argument("name", choices=sorted(SOURCES), help="data set (the data.dataset name)")
    p.add_argument("--root", default=None,
                   help="folder to download into, then data.root (default: " +
                        ", ".join(f"{k}: {v}" for k, v in DEFAULT_ROOTS.items()) + ")")
    p.add_argument("--base-url", default=None, help=f"mirror holding the same files (default ${BASE_URL_ENV} or the official server)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fetch)
