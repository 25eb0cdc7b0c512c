"""`moelab <diffusion|seismic> <command> ...`: one entry point, each application owns its commands.

Every `MoelabError` is printed as one line (``error: ...``) with exit status 2, never a traceback
(`moelab.guard.run_guarded`, re-exported here for the repository's scripts).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from moelab.guard import run_guarded, show_info_logs

__all__ = ["main", "run_guarded"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moelab", description=__doc__.splitlines()[0])
    apps = parser.add_subparsers(dest="app", required=True)
    from moelab.diffusion import cli as diffusion_cli
    from moelab.seismic import cli as seismic_cli

    diffusion_cli.add_commands(apps.add_parser("diffusion", help="MoEFsDiC class-conditional image diffusion"))
    seismic_cli.add_commands(apps.add_parser("seismic", help="SeisMoE earthquake detection and phase picking"))
    from moelab.diffusion import fetch_cli

    fetch_cli.add_commands(apps.add_parser("data", help="image data sets: fetch MNIST, Fashion-MNIST, CIFAR-10"))
    # (further command families register here, one line each)
    args = parser.parse_args(argv)
    show_info_logs()
    return run_guarded(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
