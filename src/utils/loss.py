"""The quick-start's import path (`from src.utils.loss import MoELoss`, run from the repository
root); the loss lives in `moelab.diffusion.losses`."""

from moelab.diffusion.losses import MoELoss

__all__ = ["MoELoss"]
