"""pick-benchmark's `models` module: `from models import SeisMoELit` (as the SeisMoE guide writes it,
run from inside benchmark/) gives the package's Lightning modules."""

import sys
from pathlib import Path

try:
    import moelab  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moelab.seismic.lit import EQTransformerLit, SeisBenchModuleLit, SeisMoELit

__all__ = ["EQTransformerLit", "SeisBenchModuleLit", "SeisMoELit"]
