"""The quick-start's progress display on Lightning's TQDM bar:

``Epoch 1/100: 100%|████| 3125/3125 [10:23<00:00, 5.01it/s, loss=0.1234, dm_loss=0.1200, load_loss=0.0034]``
(the per-epoch summary line is printed by the LightningModule at epoch end).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar


class MoEProgressBar(TQDMProgressBar):
    """``Epoch N/M`` description and the last step's loss, dm_loss, load_loss (4 decimals).

    Args:
        refresh_rate (`int`, defaults to 1): update the bar every this many steps.
        leave (`bool`, defaults to `True`): keep each finished epoch's bar, one line per epoch, as
            the quick-start shows them.
    """

    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def __init__(self, refresh_rate: int = 1, leave: bool = True) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)  # one finished bar per epoch, as in the quick-start

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return {k: f"{v:.4f}" for k, v in getattr(pl_module, "last_metrics", {}).items()}
