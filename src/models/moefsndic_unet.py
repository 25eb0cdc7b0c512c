"""The quick-start's import path (`from src.models.moefsndic_unet import MoEFsDiC_UNet`, run from
the repository root); the model lives in `moelab.diffusion.unet`."""

from moelab.diffusion.models import build_model
from moelab.diffusion.unet import MoEFsDiC_UNet

__all__ = ["MoEFsDiC_UNet", "build_model"]
