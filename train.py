#!/usr/bin/env python
"""Train MoEFsDiC: `python train.py --config configs/default.yaml --device cpu|cuda [--resume checkpoints/checkpoint_epoch_N.pth]`.

Thin wrapper over `moelab diffusion train` (same arguments; see --help).
"""

import sys
from pathlib import Path

try:
    import moelab  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from moelab.diffusion.train_cli import main

if __name__ == "__main__":
    sys.exit(main())
