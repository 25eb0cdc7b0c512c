"""`moelab <diffusion|seismic> <command> ...`: one entry point, each application owns its commands.

Every `MoelabError` is printed as one line (``error: ...``) with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from moelab.errors import MoelabError


def run_guarded(fn: Callable[[], int | None]) -> int:
    """Run ``fn`` and turn user errors into one clear line on stderr and exit status 2."""
    try:
        return int(fn() or 0)
    except MoelabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moelab", description=__doc__.splitlines()[0])
    apps = parser.add_subparsers(dest="app", required=True)
    from moelab.diffusion import cli as diffusion_cli
    from moelab.seismic import cli as seismic_cli

    diffusion_cli.add_commands(apps.add_parser("diffusion", help="MoEFsDiC class-conditional image diffusion"))
    seismic_cli.add_commands(apps.add_parser("seismic", help="SeisMoE earthquake detection and phase picking"))
    args = parser.parse_args(argv)
    return run_guarded(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
