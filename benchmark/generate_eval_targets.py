"""Write pick-benchmark evaluation targets (task1.csv, task23.csv) for a data set.

    python benchmark/generate_eval_targets.py STEAD targets/stead
    python benchmark/generate_eval_targets.py data/synth data/synth/targets

Task 1: 30 s windows with an earthquake's first arrival or noise; tasks 2/3: 10 s windows holding
exactly one P or S onset. Same code as `moelab seismic targets`.
"""

import argparse
import sys

from moelab.cli import run_guarded
from moelab.seismic import cli


def main() -> int:
    cli.configure_logging()
    parser = cli.add_targets_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args()
    return run_guarded(lambda: cli.run_targets(args))


if __name__ == "__main__":
    sys.exit(main())
