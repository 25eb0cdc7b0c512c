"""`SampleEvaluation`: every N epochs, a labelled sample grid and the evaluation, logged during training.

What papers report for a diffusion model is measured on its EMA weights with thousands of
samples; a Fréchet distance on a few dozen samples mostly measures the sample count (the known
trap of in-training FID). So every ``train.eval_every_epochs`` epochs this callback

1. swaps Lightning's EMA weights in (through `EMAWeightAveraging`'s own validation-time swap, so
   the images come from the weights the checkpoints export), or uses the raw weights without EMA;
2. on global rank 0 only, samples ``train.eval_per_class`` images of every class (SDE-DPM-Solver++,
   20 steps, guidance ``train.eval_guidance``, fixed seed: the same noise at every evaluation) and
   scores them with `moelab.diffusion.evaluate.Evaluator` against the held-out split (conditional
   accuracy, Fréchet distance in the evaluation classifier's features, and the standard FID when
   ``train.inception_weights`` names a local Inception file);
3. broadcasts the numbers to every rank and logs them as ``eval/<metric>`` (Lightning loggers:
   TensorBoard and CSV; identical on every rank, so no reduction), writes the grid PNG (also to
   TensorBoard) and a JSON file, and prints one line with the sample count;
4. swaps the training weights back and restores the random state and the expert-usage counters,
   so training continues exactly as it would have without the evaluation.

``train.select_metric`` (``frechet_distance`` | ``accuracy`` | ``fid``) is the metric the best
checkpoint is kept by: `best_checkpoint` builds the `ModelCheckpoint` that monitors it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tqdm import tqdm

from moelab.errors import ConfigError

SAMPLER, STEPS, SEED = "dpm++sde", 20, 0
#: select_metric -> ModelCheckpoint mode
MODES = {"frechet_distance": "min", "fid": "min", "accuracy": "max"}
GRID_PER_CLASS = 10


class SampleEvaluation(pl.Callback):
    """Evaluates generated samples every ``every_n_epochs`` epochs (see the module docstring).

    Args:
        config: the run config (`RunConfig`); its data set gives the judge and the real images.
        every_n_epochs (`int`): evaluate after epochs N, 2N, ... (counted from 1).
        out_dir (`str` or `Path`): where ``grid_epoch_N.png`` and ``metrics_epoch_N.json`` go.
        per_class (`int`, defaults to 100): generated images per class for the metrics.
        guidance (`float`, defaults to 1.25): classifier-free guidance weight of the sampler.
        select_metric (`str`, defaults to ``"frechet_distance"``): the metric `best_checkpoint` monitors.
        inception_weights (`str`, *optional*): local Inception weights file; adds the standard FID.
        cache_dir (`str`, *optional*): where the evaluation classifier is cached.
        batch_size (`int`, defaults to 250): images denoised at once.
    """

    def __init__(
        self,
        config: Any,
        every_n_epochs: int,
        out_dir: str | Path,
        per_class: int = 100,
        guidance: float = 1.25,
        select_metric: str = "frechet_distance",
        inception_weights: str | Path | None = None,
        cache_dir: str | Path | None = None,
        batch_size: int = 250,
    ) -> None:
        super().__init__()
        if every_n_epochs < 1 or per_class < 2:
            raise ConfigError(f"evaluation every {every_n_epochs} epochs on {per_class} images per class: both must be >= 1 and >= 2")
        if select_metric not in MODES:
            raise ConfigError(f"train.select_metric={select_metric!r} is not one of {', '.join(MODES)}")
        if select_metric == "fid" and inception_weights is None:
            raise ConfigError("train.select_metric=fid needs train.inception_weights (a local Inception weights file)")
        self.config, self.every_n_epochs, self.out_dir = config, every_n_epochs, Path(out_dir)
        self.per_class, self.guidance, self.select_metric = per_class, guidance, select_metric
        self.inception_weights, self.cache_dir, self.batch_size = inception_weights, cache_dir, batch_size
        self._evaluator: Any = None
        self.history: list[dict[str, Any]] = []  # rank 0: every evaluation's results

    @property
    def monitor(self) -> str:
        return f"eval/{self.select_metric}"

    @property
    def mode(self) -> str:
        return MODES[self.select_metric]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero and self.inception_weights is not None:
            from moelab.diffusion.inception import read_inception_weights

            read_inception_weights(self.inception_weights)  # a wrong file fails now, not after the first N epochs

    def _ema(self, trainer: pl.Trainer) -> WeightAveraging | None:
        return next((cb for cb in trainer.callbacks if isinstance(cb, WeightAveraging)), None)  # type: ignore[attr-defined]

    def evaluator(self) -> Any:
        if self._evaluator is None:
            from moelab.diffusion.evaluate import Evaluator
            from moelab.diffusion.inception import load_inception

            self._evaluator = Evaluator.for_config(self.config, self.cache_dir)
            if self.inception_weights is not None:
                self._evaluator.inception = load_inception(self.inception_weights)
        return self._evaluator

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs:
            return
        ema = self._ema(trainer)
        if ema is not None:
            ema.on_validation_epoch_start(trainer, pl_module)  # averaged weights in (Lightning's own swap)
        was_training = pl_module.training
        try:
            with torch.random.fork_rng(devices=[pl_module.device] if pl_module.device.type == "cuda" else []):
                metrics = self._evaluate_on_rank_zero(trainer, pl_module, epoch) if trainer.is_global_zero else None
        finally:
            pl_module.train(was_training)
            if ema is not None:
                ema.on_validation_epoch_end(trainer, pl_module)  # training weights back
        metrics = trainer.strategy.broadcast(metrics, src=0)
        # the same numbers on every rank (broadcast); sync_dist keeps them so (a mean of equal values)
        # and spares DDP runs Lightning's warning that epoch-level logs want it
        pl_module.log_dict({f"eval/{k}": float(v) for k, v in metrics.items()}, on_step=False, on_epoch=True, sync_dist=True)

    def _evaluate_on_rank_zero(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> dict[str, float]:
        from moelab.diffusion.evaluate import write_json
        from moelab.diffusion.sample import grid_labels, sample, save_grid
        from moelab.moe.stats import ExpertUsage

        usage = {m: m.counts.clone() for m in pl_module.modules() if isinstance(m, ExpertUsage)}
        model = pl_module.model  # type: ignore[attr-defined]
        model.eval()
        classes = range(self.config.model.num_classes)
        labels = grid_labels(classes, self.per_class)
        t0 = time.perf_counter()
        with torch.no_grad():
            images = sample(model, self.config, labels, sampler=SAMPLER, steps=STEPS, guidance=self.guidance,
                            seed=SEED, batch_size=self.batch_size, device=pl_module.device).cpu()
        spp = (time.perf_counter() - t0) / len(labels)
        for m, counts in usage.items():  # evaluation routing is not training routing (collapse monitor)
            m.counts = counts
        res = self.evaluator().score(images, labels)
        metrics = {k: float(res[k]) for k in ("accuracy", "frechet_distance", "fid") if k in res}
        metrics["seconds_per_sample"] = spp
        keep = torch.cat([torch.nonzero(labels == c).flatten()[:GRID_PER_CLASS] for c in classes])
        grid = save_grid(images[keep], labels[keep], self.out_dir / f"grid_epoch_{epoch}.png")
        record = {"epoch": epoch, "global_step": trainer.global_step, **metrics, "num_samples": len(labels),
                  "per_class": self.per_class, "num_real": res["num_real"], "sampler": SAMPLER, "steps": STEPS,
                  "guidance": self.guidance, "ema": self._ema(trainer) is not None,
                  "per_class_accuracy": res["per_class_accuracy"], "grid": str(grid)}
        write_json(record, self.out_dir / f"metrics_epoch_{epoch}.json")
        self.history.append(record)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("eval/grid", np.asarray(Image.open(grid).convert("RGB")), trainer.global_step, dataformats="HWC")
        fid = f", FID {metrics['fid']:.2f}" if "fid" in metrics else ""
        tqdm.write(
            f"[Eval epoch {epoch}] accuracy {metrics['accuracy']:.4f}, Fréchet (clf) {metrics['frechet_distance']:.3f}{fid} "
            f"on {len(labels)} samples ({self.per_class} per class, {SAMPLER}-{STEPS}, guidance {self.guidance}, "
            f"{'EMA' if record['ema'] else 'raw'} weights) vs {res['num_real']} held-out images; grid: {grid}"
        )
        return metrics


def best_checkpoint_kwargs(callback: SampleEvaluation) -> dict[str, Any]:
    """`ModelCheckpoint` arguments that keep the one checkpoint best by ``callback``'s metric."""
    return dict(
        filename="best_epoch_{epoch}", monitor=callback.monitor, mode=callback.mode, save_top_k=1,
        every_n_epochs=callback.every_n_epochs, save_on_train_epoch_end=True, auto_insert_metric_name=False,
        enable_version_counter=False,
    )
