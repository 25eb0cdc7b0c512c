"""Which network a config asks for: MoEFsDiC, or the dense diffusers `UNet2DModel` baseline.

The one place that knows both architectures, so that neither model module imports the other's
users (`unet` <- `baseline` <- this module).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moelab.diffusion.baseline import DenseUNet2D
from moelab.diffusion.config import ModelConfig, model_config
from moelab.diffusion.unet import MoEFsDiC_UNet

#: ``model.arch`` -> model class (both are diffusers ModelMixin + ConfigMixin models).
ARCHITECTURES: dict[str, type] = {"moefsdic": MoEFsDiC_UNet, "unet2d": DenseUNet2D}


def build_model(config: ModelConfig | Mapping[str, Any]) -> MoEFsDiC_UNet | DenseUNet2D:
    """The model ``model.arch`` names, built from the whole model config (validated once if raw)."""
    mc = model_config(config)
    return ARCHITECTURES[mc.arch](mc)
