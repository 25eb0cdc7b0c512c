"""Lightning callback that logs expert usage and warns when routing collapses onto one expert.

Kept apart from the rest of the core: ``import moelab.moe`` does not import Lightning; the
trainers import this module (``from moelab.moe.callbacks import ExpertUsageMonitor``).
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import torch

from moelab.moe.layer import MoELayer
from moelab.moe.stats import usage_summary


class ExpertCollapseWarning(UserWarning):
    pass


class ExpertUsageMonitor(pl.Callback):
    """Every ``interval`` training steps, log each MoE layer's usage during that interval.

    If one expert gets more than ``max_share`` of a layer's routing assignments for ``patience``
    consecutive intervals, warn naming the layer and the fix. The monitor reads the layers'
    counters without resetting them (it keeps its own snapshot), so per-epoch usage figures that a
    LightningModule logs stay intact. Under DDP it reads the counts summed over all ranks (every
    rank runs the check at the same step), so the shares it logs and judges are global ones.

    Args:
        interval (`int`, defaults to 50): training steps between two checks.
        max_share (`float`, defaults to 0.9): share of one expert above which an interval counts
            as collapsed.
        patience (`int`, defaults to 3): consecutive collapsed intervals before the warning.
    """

    def __init__(self, interval: int = 50, max_share: float = 0.9, patience: int = 3) -> None:
        self.interval, self.max_share, self.patience = interval, max_share, patience
        self.strikes: dict[str, int] = {}
        self._seen: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.interval == 0:
            self.check(pl_module, trainer)

    def interval_counts(self, name: str, layer: MoELayer) -> torch.Tensor:
        """Counts (summed over ranks) since the previous check; counters reset in between count from zero."""
        now = layer.usage.global_counts().detach().clone()
        before = self._seen.get(name)
        self._seen[name] = now
        return now if before is None or bool((now < before).any()) else now - before

    def check(self, pl_module: pl.LightningModule, trainer: pl.Trainer | None = None) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for name, layer in pl_module.named_modules():
            if not isinstance(layer, MoELayer):
                continue
            s = usage_summary(self.interval_counts(name, layer))
            if s["total"] == 0:
                continue
            metrics[f"moe/{name}/max_share"] = float(s["max_share"])
            metrics[f"moe/{name}/entropy"] = float(s["entropy"])
            self.strikes[name] = self.strikes.get(name, 0) + 1 if s["max_share"] > self.max_share else 0
            if self.strikes[name] == self.patience and (trainer is None or trainer.is_global_zero):
                warnings.warn(
                    f"expert collapse in MoE block '{name}': one expert received {s['max_share']:.0%} of the "
                    f"routing for {self.patience} consecutive intervals of {self.interval} steps "
                    f"(counts {s['counts']}); raise the load-loss coefficient (lambda_load / moe_loss_coef)",
                    ExpertCollapseWarning,
                    stacklevel=2,
                )
        if metrics and trainer is not None and trainer.logger is not None:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        return metrics
