"""Which network a config asks for: MoEFsDiC, or the dense diffusers `UNet2DModel` baseline.

The one place that knows both architectures, so that neither model module imports the other's
users (`unet` <- `baseline` <- this module).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moelab.diffusion.baseline import DenseUNet2D
from moelab.diffusion.config import ModelConfig, TrainConfig, model_config
from moelab.diffusion.unet import MoEFsDiC_UNet
from moelab.errors import ConfigError

#: ``model.arch`` -> model class (both are diffusers ModelMixin + ConfigMixin models).
ARCHITECTURES: dict[str, type] = {"moefsdic": MoEFsDiC_UNet, "unet2d": DenseUNet2D}


def build_model(config: ModelConfig | Mapping[str, Any]) -> MoEFsDiC_UNet | DenseUNet2D:
    """The model ``model.arch`` names, built from the whole model config (validated once if raw)."""
    mc = model_config(config)
    return ARCHITECTURES[mc.arch](mc)


def prepare_for_training(model: MoEFsDiC_UNet | DenseUNet2D, train: TrainConfig) -> MoEFsDiC_UNet | DenseUNet2D:
    """Apply the ``train`` options that change how ``model`` runs, not what it computes:
    ``gradient_checkpointing``, ``lean_backward`` (MoEFsDiC only; the dense baseline has no experts)
    and ``compile`` (in place, ``nn.Module.compile``: the state dict keeps its keys). One place, so
    that the trainer and `bench/train_step.py` measure the same network."""
    levels = train.gradient_checkpointing
    if levels:
        arch = next(name for name, cls in ARCHITECTURES.items() if isinstance(model, cls))
        if levels is not True and not isinstance(model, MoEFsDiC_UNet):
            raise ConfigError(
                f"train.gradient_checkpointing={list(levels)}: a list of resolution levels applies to "
                f"MoEFsDiC only, not to model.arch={arch}"
            )
        if not hasattr(model, "set_gradient_checkpointing"):
            raise ConfigError(f"train.gradient_checkpointing is not supported by model.arch={arch}")
        model.set_gradient_checkpointing(True, **({} if levels is True else {"levels": levels}))
    if isinstance(model, MoEFsDiC_UNet):
        model.set_lean_backward(train.lean_backward)
    if train.compile:
        model.compile()
    return model
