"""The LightningModule that trains MoEFsDiC (or the dense baseline) to predict the added noise.

Randomness of a training step (timesteps, noise, label dropout) comes from a generator seeded
with (seed, epoch, batch index, rank), and the data order from a per-epoch seeded sampler
(`moelab.seeding.EpochSampler`): resuming from a checkpoint needs no hidden RNG state
and continues exactly as an uninterrupted run would. (The global torch RNG, used only by the
optional router jitter, is saved in the checkpoint as well.)
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from tqdm import tqdm

from moelab.diffusion.config import RunConfig, load_config
from moelab.diffusion.losses import MoELoss
from moelab.diffusion.models import build_model, prepare_for_training
from moelab.diffusion.noise import training_scheduler
from moelab.errors import check_finite_loss
from moelab.seeding import step_seed

METRICS = ("loss", "dm_loss", "load_loss")


class MoEFsDiCLit(pl.LightningModule):
    """Trains ``self.model`` (MoEFsDiC or the dense baseline) to predict the added noise.

    Args:
        config (`RunConfig` or mapping): the run, as `load_config` returns it (a raw YAML-layout
            dict is validated once here). The model is built from ``config.model``, whole; the
            checkpoint stores the config in the YAML layout (plain data, loadable with
            ``weights_only=True``).
    """

    def __init__(self, config: RunConfig | Mapping[str, Any]) -> None:
        super().__init__()
        cfg = load_config(config)
        self.save_hyperparameters({"config": cfg.to_dict()})
        self.config = cfg
        self.model = prepare_for_training(build_model(cfg.model), cfg.train)
        self.criterion = MoELoss.from_config(cfg)
        self.noise_scheduler = training_scheduler(cfg)
        self.last_metrics: dict[str, float] = {}
        self._sums: Tensor | None = None
        self._count = 0

    def forward(self, x: Tensor, t: Tensor, c: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        return self.model(x, t, c)

    def step_generator(self, batch_idx: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(step_seed(self.config.train.seed, self.current_epoch, batch_idx, self.global_rank))
        return g

    def diffusion_loss(self, x: Tensor, y: Tensor, g: torch.Generator, cond_drop_prob: float) -> tuple[Tensor, Tensor, Tensor]:
        b = x.shape[0]
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (b,), generator=g, device=x.device)
        noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        drop = torch.rand(b, generator=g, device=x.device) < cond_drop_prob
        c = torch.where(drop, torch.full_like(y, self.config.model.num_classes), y)
        noisy = self.noise_scheduler.add_noise(x, noise, t)
        pred, logits = self.model(noisy, t, c)
        return self.criterion(pred, noise, logits)

    def _non_finite_fix(self) -> str:
        """What to try when the loss is NaN/Inf. With ``train.compile`` the compiled kernels are a
        suspect too: inductor's on-disk cache, filled under another CPU capability (e.g. built with
        AVX-512 kernels, then run with ``ATEN_CPU_CAPABILITY=avx2``), was measured to give NaN from
        the first step while eager gave the right loss."""
        fix = "lower train.lr, keep train.grad_clip > 0 or use 32-true precision"
        if self.config.train.compile:
            fix += (
                "; with train.compile: true, also try train.compile: false, or an empty torch.compile "
                "cache (TORCHINDUCTOR_CACHE_DIR=<new folder>), to rule out the compiled kernels"
            )
        return fix

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss, dm, load = self.diffusion_loss(x, y, self.step_generator(batch_idx), self.config.train.cond_drop_prob)
        vals = torch.stack([loss.detach(), dm.detach(), load.detach()]).float()
        host = vals.tolist()
        check_finite_loss(
            self.global_step,
            self._non_finite_fix(),
            where=f"epoch {self.current_epoch + 1}, batch {batch_idx}",
            **dict(zip(METRICS, host, strict=True)),
        )
        self._sums = vals if self._sums is None else self._sums.to(vals.device) + vals
        self._count += 1
        self.last_metrics = dict(zip(METRICS, host, strict=True))
        self.log_dict({f"train/{k}": v for k, v in zip(METRICS, vals, strict=True)}, on_step=True, on_epoch=False)
        return loss

    def on_train_epoch_start(self) -> None:
        self._sums, self._count = None, 0

    def on_train_epoch_end(self) -> None:
        if self._sums is None:
            return
        avg = self.trainer.strategy.reduce(self._sums / self._count, reduce_op="mean")
        means = dict(zip(METRICS, avg.tolist(), strict=True))
        # already the same on every rank; sync_dist keeps them so (a mean of equal values) and spares
        # DDP runs Lightning's warning, three lines an epoch, that epoch-level logs want it
        self.log_dict({f"epoch/{k}": v for k, v in means.items()}, on_step=False, on_epoch=True, sync_dist=True)
        if self.trainer.is_global_zero:  # tqdm.write: below the finished bar, or above a running one
            tqdm.write(
                f"[Epoch {self.current_epoch + 1}/{self.trainer.max_epochs}] Avg Loss: {means['loss']:.4f}, "
                f"Avg DM Loss: {means['dm_loss']:.4f}, Avg Load Loss: {means['load_loss']:.4f}",
                file=sys.stdout,
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The only global-RNG consumer in training is the optional router jitter (moe.jitter > 0);
        # its state is saved so that a resumed run draws the same jitter as an uninterrupted one.
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["rng_state"] = rng
        if self._sums is not None:
            # The epoch's running loss sums, so that a run continued from a checkpoint written inside
            # the epoch prints the whole epoch's average, as the uninterrupted run does. Such
            # checkpoints are single-process (`SaveOnSigterm` writes none under DDP): no reduction.
            checkpoint["epoch_sums"] = {"sums": self._sums.detach().cpu(), "count": self._count}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if sums := checkpoint.get("epoch_sums"):  # used when resuming inside an epoch; reset at an epoch's start
            self._sums, self._count = sums["sums"], int(sums["count"])
        rng = checkpoint.get("rng_state")
        if not rng:
            return
        torch.set_rng_state(rng["torch"].cpu())
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])

    def configure_optimizers(self) -> Any:
        tr = self.config.train
        opt = torch.optim.AdamW(self.parameters(), lr=tr.lr, betas=tr.betas, weight_decay=tr.weight_decay)
        kind = tr.lr_schedule
        if kind == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=tr.plateau_factor, patience=tr.plateau_patience)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "epoch/loss", "interval": "epoch"}}
        from diffusers.optimization import get_scheduler

        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        sched = get_scheduler(kind, opt, num_warmup_steps=tr.warmup_steps, num_training_steps=max(total, 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

