"""`fit`: MoEFsDiC training through Lightning (devices/DDP, precision, accumulation, clipping,
LR schedules, EMA, atomic checkpoints every N epochs, exact resume, CSV/TensorBoard logs,
expert-usage monitoring).

A run stopped by SIGTERM (a scheduler's preemption or time limit, ``kill``) loses no finished
batch: Lightning finishes the batch in flight, `SaveOnSigterm` writes the state as
``checkpoint_epoch_<E>_step_<S>.pth``, and ``--resume`` from it continues mid-epoch exactly as the
uninterrupted run would have (the data loader, `EpochLoader`, is resumable: the epoch's order is a
function of the seed and the epoch, and the batches already done are left out). Ctrl-C can land
anywhere, an optimizer step included, so it saves nothing; both name the newest checkpoint
(`moelab.interrupt.fit_or_report`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, Dataset

from moelab.checkpoint import AtomicCheckpointIO
from moelab.diffusion.config import load_config
from moelab.diffusion.data import load_split
from moelab.diffusion.eval_callback import SampleEvaluation, best_checkpoint_kwargs
from moelab.diffusion.checkpoints import check_fits, model_weights, read_checkpoint
from moelab.diffusion.lit import MoEFsDiCLit
from moelab.diffusion.progress import MoEProgressBar
from moelab.errors import CheckpointError, ConfigError, NonFiniteLossError
from moelab.interrupt import between_epochs, fit_or_report
from moelab.moe.callbacks import ExpertUsageMonitor
from moelab.seeding import EpochSampler
from moelab.validation import at_least_one, check_output

CKPT_RE = re.compile(r"checkpoint_epoch_(\d+)\.pth$")
#: A checkpoint `SaveOnSigterm` wrote inside an epoch (group 1: the global step).
STOP_RE = re.compile(r"^checkpoint_epoch_\d+_step_(\d+)\.pth$")


class EpochCheckpoint(ModelCheckpoint):
    """``checkpoint_epoch_N.pth`` with N counted from 1, as the quick-start names them."""

    FILE_EXTENSION = ".pth"

    def _monitor_candidates(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        cands = super()._monitor_candidates(trainer)
        cands["epoch"] = torch.tensor(trainer.current_epoch + 1)
        return cands


def checkpoints_in(folder: str | Path) -> list[Path]:
    """``checkpoint_epoch_N.pth`` files in ``folder``, oldest epoch first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CKPT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def resolve_accelerator(device: str) -> str:
    """``cpu`` / ``cuda`` (``gpu``) / ``mps`` / ``auto`` -> a Lightning accelerator, checked."""
    device = device.lower()
    if device in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was requested but no CUDA GPU is available (torch.cuda.is_available() is False); use --device cpu")
        return "gpu"
    if device == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError("--device mps was requested but Apple MPS is not available; use --device cpu")
        return "mps"
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    raise ConfigError(f"unknown device '{device}'; use cpu, cuda or auto")


class EpochLoader(DataLoader):
    """The training DataLoader, resumable mid-epoch through Lightning's loader protocol
    (``state_dict`` / ``load_state_dict``, restored when a run continues from a checkpoint written
    inside an epoch).

    Its state is the epoch and the batches the run has completed in it, read from ``progress``
    (set by `fit`): not the loader's own count, which runs ahead of training by the batches
    Lightning and the workers prefetch. Restoring it makes the `EpochSampler` leave those batches'
    samples out of that epoch's order.
    """

    progress: Callable[[], int] | None = None

    def state_dict(self) -> dict[str, int]:
        batches = self.progress() if self.progress is not None else 0
        return {"epoch": self.sampler.epoch, "batches": batches, "batch_size": int(self.batch_size or 1)}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, int]) -> None:
        # samples, not batches: a run continued with another batch size still skips what was seen
        self.sampler.resume_at(int(state["epoch"]), int(state["batches"]) * int(state.get("batch_size", self.batch_size or 1)))  # type: ignore[attr-defined]


class SaveOnSigterm(pl.Callback):
    """On SIGTERM, write the state after the last finished batch to ``dirpath`` (atomically, through
    the trainer's checkpoint IO): ``checkpoint_epoch_<E>_step_<S>.pth`` inside epoch E, or
    ``checkpoint_epoch_<E>.pth`` between epochs when the periodic checkpoint skipped epoch E.
    Nothing is written in the middle of a gradient-accumulation cycle (its partial gradients are
    not in a checkpoint), nor under DDP: Lightning's ranks learn of the signal at different batches
    (the one that received it stops after its batch, the others at the next one's broadcast), and a
    checkpoint write, itself collective, from that point could hang. The run then continues from the
    previous checkpoint. ``saved``: the path written, or None. With ``prune`` (``train.keep_last``
    set), the files of earlier stops in ``dirpath``, which the new one supersedes, are removed.
    """

    def __init__(self, dirpath: Path, periodic: ModelCheckpoint, prune: bool = False) -> None:
        self.dirpath, self.periodic, self.prune, self.saved = Path(dirpath), periodic, prune, None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.global_step == 0 or trainer.world_size > 1:
            return
        if between_epochs(trainer):
            if getattr(self.periodic, "_last_global_step_saved", -1) == trainer.global_step:
                return  # the periodic checkpoint holds this very state
            path = self.dirpath / f"checkpoint_epoch_{trainer.current_epoch}.pth"
        else:
            done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
            if done % trainer.accumulate_grad_batches and done < trainer.num_training_batches:
                return  # the last batch's gradient waits for the rest of its accumulation cycle
            path = self.dirpath / f"checkpoint_epoch_{trainer.current_epoch + 1}_step_{trainer.global_step}.pth"
        trainer.save_checkpoint(path, weights_only=False)
        self.saved = path
        if self.prune:
            for old in self.dirpath.glob("checkpoint_epoch_*_step_*.pth"):
                if (m := STOP_RE.search(old.name)) and int(m.group(1)) < trainer.global_step:
                    old.unlink(missing_ok=True)


def make_dataloader(dataset: Dataset, config: Mapping[str, Any]) -> EpochLoader:
    tr = config["train"]
    sampler = EpochSampler(len(dataset), tr["seed"])
    return EpochLoader(
        dataset,
        batch_size=tr["batch_size"],
        sampler=sampler,  # type: ignore[arg-type]
        # the iterator's base seed comes from the sampler's generator, not the global RNG: the router
        # jitter's draws then do not depend on when an epoch's iterator was made (a run resumed
        # inside an epoch makes it at another point of the global RNG stream than the original)
        generator=sampler.generator,
        num_workers=tr["num_workers"],
        persistent_workers=tr["num_workers"] > 0,
        drop_last=False,
    )


def _check_resume(resume: str | Path, lit: MoEFsDiCLit) -> dict[str, int] | None:
    """Check that ``resume`` is a full training checkpoint of this model; return the data loader's
    state when it was written inside an epoch (`SaveOnSigterm`), else None."""
    ck = read_checkpoint(resume)
    for key in ("optimizer_states", "epoch", "global_step"):
        if key not in ck:
            raise CheckpointError(f"'{resume}' is a weights-only checkpoint (no {key}); --resume needs a full training checkpoint")
    check_fits(lit.model, model_weights(ck["state_dict"]), resume)
    fit_loop = ck.get("loops", {}).get("fit_loop", {})
    states = fit_loop.get("state_dict", {}).get("combined_loader") or [None]
    epochs = fit_loop.get("epoch_progress", {}).get("current", {})
    inside = epochs.get("started", 0) > epochs.get("processed", 0)  # `between_epochs`, on the saved progress
    return states[0] if inside and isinstance(states[0], dict) else None


def fit(
    config: Mapping[str, Any] | str | Path,
    *,
    checkpoint_dir: str | Path = "checkpoints",
    accelerator: str = "cpu",
    devices: int = 1,
    max_steps: int | None = None,
    max_epochs: int | None = None,
    resume: str | Path | None = None,
    seed: int | None = None,
    progress: bool = True,
    logger_dir: str | Path | None = None,
    max_time: float | None = None,
) -> Path:
    """Train; return the last checkpoint written. ``seed``/``max_epochs`` override the config.

    ``max_time``: a wall-clock training budget in seconds (Lightning's ``Trainer(max_time=...)``,
    counted from the start of training, checked after every step); training stops at whichever of
    budget, ``max_steps`` and epochs comes first. The LR schedule keeps the config's length.
    """
    overrides: dict[str, Any] = {}
    if seed is not None:
        overrides["train.seed"] = seed
    if max_epochs is not None:
        overrides["train.epochs"] = max_epochs
    cfg = load_config(config, overrides)
    tr = cfg["train"]
    acc = resolve_accelerator(accelerator)
    at_least_one(("--devices", devices))
    if max_steps is not None:
        at_least_one(("--max-steps", max_steps))
    if max_time is not None and not max_time > 0:
        raise ConfigError(f"--budget-seconds {max_time} must be a positive number of seconds")
    if acc == "cpu" and tr["precision"] == "16-mixed":
        raise ConfigError("train.precision=16-mixed needs a GPU; on CPU use bf16-mixed or 32-true")
    check_output("--checkpoint-dir", checkpoint_dir, folder=True)
    if logger_dir is not None:
        check_output("--log-dir", logger_dir, folder=True)
    if resume is not None and Path(resume).is_dir():
        raise CheckpointError(f"--resume '{resume}' is a folder: pass one of its checkpoint_epoch_N.pth files")
    if resume is not None and not Path(resume).is_file():
        raise CheckpointError(f"--resume '{resume}' does not exist: pass an existing checkpoint_epoch_N.pth (see {checkpoint_dir}/)")

    pl.seed_everything(tr["seed"], workers=True, verbose=False)
    dataset = load_split(cfg, "train")
    lit = MoEFsDiCLit(cfg)
    loader_state = _check_resume(resume, lit) if resume is not None else None

    ckpt_dir = Path(checkpoint_dir)
    ckpt = EpochCheckpoint(
        dirpath=ckpt_dir,
        filename="checkpoint_epoch_{epoch}",
        auto_insert_metric_name=False,
        every_n_epochs=tr["checkpoint_every"],
        save_top_k=tr["keep_last"] if tr["keep_last"] > 0 else -1,
        monitor="step" if tr["keep_last"] > 0 else None,
        mode="max",
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    on_sigterm = SaveOnSigterm(ckpt_dir, ckpt, prune=tr["keep_last"] > 0)
    callbacks: list[pl.Callback] = [ckpt, on_sigterm]
    if progress:
        callbacks.append(MoEProgressBar())
    if tr["ema"]:
        callbacks.append(EMAWeightAveraging(decay=tr["ema_decay"], use_buffers=False))
    if cfg["model"]["arch"] == "moefsdic" and cfg["moe"]["enabled"]:
        callbacks.append(ExpertUsageMonitor(interval=tr["monitor_interval"], max_share=tr["collapse_share"], patience=tr["collapse_patience"]))
    log_root = Path(logger_dir) if logger_dir is not None else ckpt_dir / "logs"
    loggers = [CSVLogger(log_root, name="csv"), TensorBoardLogger(log_root, name="tensorboard")]
    if tr["eval_every_epochs"] > 0:  # samples + evaluation every N epochs; the checkpoint best by train.select_metric kept
        evaluation = SampleEvaluation(cfg, tr["eval_every_epochs"], log_root / "eval", tr["eval_per_class"], tr["eval_guidance"],
                                      tr["select_metric"], tr["inception_weights"])
        callbacks += [evaluation, EpochCheckpoint(dirpath=ckpt_dir, **best_checkpoint_kwargs(evaluation))]
    callbacks.append(LearningRateMonitor(logging_interval="step"))

    trainer = pl.Trainer(
        accelerator=acc,
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        precision=tr["precision"],
        max_epochs=tr["epochs"],
        max_steps=max_steps if max_steps is not None else -1,
        max_time=timedelta(seconds=max_time) if max_time is not None else None,
        gradient_clip_val=tr["grad_clip"] or None,
        accumulate_grad_batches=tr["accumulate_grad_batches"],
        callbacks=callbacks,
        logger=loggers,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,
        log_every_n_steps=tr["log_every"],
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=ckpt_dir,
    )
    loader = make_dataloader(dataset, cfg)
    loader.progress = lambda: trainer.fit_loop.epoch_loop.batch_progress.current.completed
    if loader_state is not None:
        # Set here, not left to Lightning: its restore of loader states is skipped when the train
        # loader was already set up, which the LR schedule's `estimated_stepping_batches` does first.
        loader.load_state_dict(loader_state)

    def newest() -> Path | None:
        last = on_sigterm.saved or getattr(ckpt, "_last_checkpoint_saved", None) or resume
        return Path(last) if last else None

    try:
        fit_or_report(
            trainer,
            lambda: trainer.fit(lit, train_dataloaders=loader, ckpt_path=str(resume) if resume is not None else None),
            newest,
            # the training command, whichever command trained (the demo and compare have no --resume)
            "moelab diffusion train --resume {path} (or python train.py --resume {path})",
        )
    except NonFiniteLossError as e:
        saved = checkpoints_in(ckpt_dir)
        last = f"the last good checkpoint is '{saved[-1]}' (untouched)" if saved else "no checkpoint had been written yet"
        raise NonFiniteLossError(f"{e}; {last}") from None
    last_saved = getattr(ckpt, "_last_checkpoint_saved", None)
    if getattr(ckpt, "_last_global_step_saved", -1) != trainer.global_step:
        # Stopped by max_steps / max_time, or after an epoch that checkpoint_every skips: keep the
        # final state too, so a finished run always ends with its last weights on disk (atomic IO).
        final = ckpt_dir / f"checkpoint_epoch_{max(trainer.current_epoch, 1)}.pth"
        trainer.save_checkpoint(final, weights_only=False)  # a full training checkpoint: --resume works from it
        return final
    if last_saved:
        return Path(last_saved)
    saved = checkpoints_in(ckpt_dir)
    if not saved:
        raise CheckpointError(f"training finished without writing a checkpoint to '{ckpt_dir}' (train.checkpoint_every={tr['checkpoint_every']} > epochs run?)")
    return saved[-1]
