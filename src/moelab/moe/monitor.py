"""Lightning callback that logs expert usage and warns when routing collapses onto one expert."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl

from moelab.moe.layer import MoELayer


class ExpertCollapseWarning(UserWarning):
    pass


class ExpertUsageMonitor(pl.Callback):
    """Every ``interval`` training steps, log each MoE layer's usage since the last interval.

    If one expert gets more than ``max_share`` of a layer's routing assignments for ``patience``
    consecutive intervals, warn naming the layer and the fix. Usage counts are reset at each
    interval so each figure describes one interval.
    """

    def __init__(self, interval: int = 50, max_share: float = 0.9, patience: int = 3) -> None:
        self.interval, self.max_share, self.patience = interval, max_share, patience
        self.strikes: dict[str, int] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:  # noqa: ANN001
        if (trainer.global_step % self.interval) != 0 or trainer.global_step == 0:
            return
        self.check(trainer, pl_module)

    def check(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> None:
        metrics = {}
        for name, layer in pl_module.named_modules():
            if not isinstance(layer, MoELayer) or layer.usage.total == 0:
                continue
            s = layer.usage.summary()
            metrics[f"moe/{name}/max_share"] = s["max_share"]
            metrics[f"moe/{name}/entropy"] = s["entropy"]
            self.strikes[name] = self.strikes.get(name, 0) + 1 if s["max_share"] > self.max_share else 0
            if self.strikes[name] == self.patience:
                warnings.warn(
                    f"expert collapse in MoE block '{name}': one expert received {s['max_share']:.0%} of the "
                    f"routing for {self.patience} consecutive intervals of {self.interval} steps "
                    f"(counts {s['counts']}); raise the load-loss coefficient (lambda_load / moe_loss_coef)",
                    ExpertCollapseWarning,
                    stacklevel=2,
                )
            layer.usage.reset()
        if metrics and trainer is not None and trainer.logger is not None:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)
