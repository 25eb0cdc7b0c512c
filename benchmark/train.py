"""Train SeisMoE or EQTransformer from a pick-benchmark style JSON config.

    python benchmark/train.py configs/stead_seismoe.json [--max_epochs N] [--weights_dir DIR] [--resume weights/<name>/last.ckpt] ...

Checkpoints: weights/<name>/model.ckpt (best val_loss) and last.ckpt (end of the latest epoch, what
--resume PATH continues from); logs: weights/<name>/version_*/.
Same code as `moelab seismic train`.
"""

import argparse
import sys

from moelab.cli import run_guarded
from moelab.seismic import cli


def main() -> int:
    cli.configure_logging()
    parser = cli.add_train_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args()
    return run_guarded(lambda: cli.run_train(args))


if __name__ == "__main__":
    sys.exit(main())
