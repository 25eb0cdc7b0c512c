"""moelab: one sparse Mixture-of-Experts core, two applications (MoEFsDiC diffusion, SeisMoE picking).

The application classes are exported lazily so that ``import moelab`` stays cheap and the seismic
side is only imported (with SeisBench) when it is used.
"""

from __future__ import annotations

from typing import Any

from moelab.errors import MoelabError

__version__ = "0.1.0"

_LAZY = {
    "MoEFsDiC_UNet": "moelab.diffusion.unet",
    "DenseUNet2D": "moelab.diffusion.baseline",  # diffusers pipelines load their components by this name
    "MoEFsDiCPipeline": "moelab.diffusion.pipeline",
    "MoELoss": "moelab.diffusion.losses",
    "SeisMoE": "moelab.seismic.model",
    "SeisMoELit": "moelab.seismic.lit",
    "EQTransformerLit": "moelab.seismic.lit",
}

__all__ = ["MoelabError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moelab' has no attribute {name!r}")
