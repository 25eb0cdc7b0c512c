"""The DDPM forward (noising) process, built on diffusers' DDPMScheduler.

Schedules: ``linear`` (DDPM, betas 1e-4 -> 0.02 over 1000 steps, the default), ``scaled_linear``
and ``squaredcos_cap_v2`` (the cosine schedule of Nichol & Dhariwal).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers import DDPMScheduler
from torch import Tensor


def training_scheduler(config: Mapping[str, Any]) -> DDPMScheduler:
    """A DDPMScheduler for ``config["diffusion"]`` (epsilon prediction)."""
    d = config["diffusion"]
    return DDPMScheduler(
        num_train_timesteps=d["num_train_timesteps"],
        beta_start=d["beta_start"],
        beta_end=d["beta_end"],
        beta_schedule=d["beta_schedule"],
        prediction_type="epsilon",
        clip_sample=True,
    )


_DEFAULT: DDPMScheduler | None = None


def add_noise(images: Tensor, t: Tensor, noise: Tensor, scheduler: DDPMScheduler | None = None) -> Tensor:
    """``sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise`` (default: the 1000-step linear schedule)."""
    global _DEFAULT
    if scheduler is None:
        if _DEFAULT is None:
            _DEFAULT = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
        scheduler = _DEFAULT
    return scheduler.add_noise(images, noise, t)
