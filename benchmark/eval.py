"""Evaluate a trained checkpoint on pick-benchmark's three tasks (detection, phase id, onset time).

    python benchmark/eval.py --model_path weights/SeisMoE_STEAD/model.ckpt --config configs/stead_seismoe.json

Evaluation targets are read from targets/<data>/ (generated there when absent); predictions and
results.csv go to <model dir>/eval/. Same code as `moelab seismic eval`.
"""

import argparse
import sys

from moelab.cli import run_guarded
from moelab.seismic import cli


def main() -> int:
    cli.configure_logging()
    parser = cli.add_eval_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args()
    return run_guarded(lambda: cli.run_eval(args))


if __name__ == "__main__":
    sys.exit(main())
