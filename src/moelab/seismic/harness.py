"""Training and evaluation runs of the seismic benchmark (what benchmark/train.py and eval.py call).

Training follows pick-benchmark: the Lightning module supplies SeisBench augmentations, a
``GenericGenerator`` feeds a DataLoader, a Lightning Trainer fits with a CSV logger. On top:

* checkpoints go to ``weights/<name>/`` through `AtomicCheckpointIO`: ``model.ckpt`` is the best
  (lowest ``val_loss``, synchronised across DDP ranks) and ``last.ckpt`` the state at the end of
  the latest epoch (written after every epoch, so a crash loses at most the epoch in progress),
  both overwritten in place atomically;
* exact resume: the data order and every augmentation/dropout draw are functions of
  (seed, epoch, rank) — `moelab.seeding.EpochSampler` reseeds them when an epoch starts — so
  ``resume="weights/<name>/last.ckpt"`` continues exactly without storing hidden RNG state;
* the config is checked once (`moelab.seismic.config`) and the data/weights are checked before any
  work starts, so an offline STEAD run fails with one clear message.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelab.checkpoint import check_state_dict
from moelab.moe.callbacks import ExpertUsageMonitor
from moelab.errors import CheckpointError, ConfigError, DataError, MoelabError
from moelab.seismic.config import BenchmarkConfig, check_accelerator
from moelab.seismic.data import DataSource, check_window, open_dataset, resolve_data, split_data
from moelab.seeding import EpochSampler, seed_everything
from moelab.validation import check_output

log = logging.getLogger(__name__)

BEST_NAME = "model"  # weights/<name>/model.ckpt: what the user guide evaluates
LAST_NAME = "last"


def lit_class(model: str):
    from moelab.seismic.lit import EQTransformerLit, SeisMoELit

    return {"SeisMoE": SeisMoELit, "EQTransformer": EQTransformerLit}[model]


def _worker_init(worker_id: int) -> None:
    """Worker RNGs derive from the torch seed PyTorch gives each worker (drawn from the epoch-seeded generator)."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def preflight(cfg: BenchmarkConfig, data_root: str | Path | None = None, check_weights: bool = True) -> DataSource:
    """Check data and pretrained weights up front; both problems are reported together."""
    problems: list[str] = []
    source = None
    try:
        source = resolve_data(cfg.data, data_root)
        if source.kind == "named":
            _check_named_available(source)
    except ConfigError:
        raise
    except DataError as e:
        problems.append(f"data: {e}")
    base = cfg.model_args.get("base_model")
    if check_weights and base is not None:
        try:
            from moelab.seismic.weights import load_base_weights

            load_base_weights(base)
        except MoelabError as e:
            problems.append(f"base_model: {e}")
    if problems:
        raise DataError(f"{cfg.source} cannot run here:\n  - " + "\n  - ".join(problems))
    assert source is not None
    return source


def _check_named_available(source: DataSource) -> None:
    """A named SeisBench data set must be cached or downloadable; probing is cheap when offline."""
    import seisbench

    cache = Path(seisbench.cache_root) / "datasets" / source.name.lower()
    if (cache / "metadata.csv").exists() or any(cache.glob("metadata*.csv")):
        return
    from moelab.seismic.data import offline_data_message

    try:
        import socket
        from urllib.parse import urlparse

        socket.getaddrinfo(urlparse(seisbench.remote_root).hostname, 443)
    except OSError as e:
        raise DataError(offline_data_message(source.name, e)) from None


def build_module(cfg: BenchmarkConfig):
    """The Lightning module of ``cfg`` with a seeded initialisation."""
    seed_everything(cfg.seed)
    cls = lit_class(cfg.model)
    try:
        return cls(**cfg.model_args)
    except TypeError as e:
        raise ConfigError(f"{cfg.source}: model_args do not fit {cls.__name__}: {e}") from None


def make_loaders(cfg: BenchmarkConfig, module, ds):
    """pick-benchmark's loaders: GenericGenerator + the module's train/val augmentations."""
    import seisbench.generate as sbg
    from torch.utils.data import DataLoader

    train = split_data(ds, "train")
    dev = split_data(ds, "dev")
    if cfg.training_fraction < 1.0:
        rng = np.random.default_rng(cfg.seed)
        keep = np.zeros(len(train), dtype=bool)
        keep[rng.permutation(len(train))[: max(1, int(cfg.training_fraction * len(train)))]] = True
        train.filter(keep, inplace=True)
    train.preload_waveforms(pbar=False)
    dev.preload_waveforms(pbar=False)
    train_gen = sbg.GenericGenerator(train)
    dev_gen = sbg.GenericGenerator(dev)
    train_gen.add_augmentations(module.get_train_augmentations())
    dev_gen.add_augmentations(module.get_val_augmentations())
    if len(train_gen) < cfg.batch_size:
        log.warning("only %d training traces for batch_size %d: one smaller batch per epoch", len(train_gen), cfg.batch_size)
    workers = dict(num_workers=cfg.num_workers, worker_init_fn=_worker_init, persistent_workers=False)
    train_sampler = EpochSampler(len(train_gen), cfg.seed, reseed_global=True)
    dev_sampler = EpochSampler(len(dev_gen), cfg.seed, shuffle=False)
    train_loader = DataLoader(
        train_gen,
        batch_size=cfg.batch_size,
        sampler=train_sampler,
        generator=train_sampler.generator,
        drop_last=len(train_gen) >= cfg.batch_size,  # batch norm needs > 1 trace per batch
        **workers,
    )
    dev_loader = DataLoader(dev_gen, batch_size=cfg.batch_size, sampler=dev_sampler, generator=dev_sampler.generator, **workers)
    return train_loader, dev_loader


def _dump_config(cfg: BenchmarkConfig, folder: Path) -> None:
    from moelab.checkpoint import atomic_write_bytes

    atomic_write_bytes((json.dumps(cfg.raw, indent=2) + "\n").encode(), folder / "config.json")


def train(
    cfg: BenchmarkConfig,
    weights_dir: str | Path = "weights",
    data_root: str | Path | None = None,
    resume: str | Path | None = None,
    device: str | None = None,
    trainer_overrides: dict[str, Any] | None = None,
    check_weights: bool = True,
) -> Path:
    """Fit ``cfg`` and return the best checkpoint (``weights/<name>/model.ckpt``).

    ``resume``: a training checkpoint to continue from exactly, normally ``weights/<name>/last.ckpt``
    (the end of the latest finished epoch).
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from moelab.checkpoint import AtomicCheckpointIO
    from moelab.interrupt import fit_or_report

    check_accelerator(device)
    check_output("--weights_dir", weights_dir, folder=True)
    source = preflight(cfg, data_root, check_weights=check_weights)
    out = Path(weights_dir) / cfg.experiment_name
    last = out / f"{LAST_NAME}.ckpt"
    if resume is not None and not Path(resume).is_file():
        what = "is a folder" if Path(resume).is_dir() else "does not exist"
        raise CheckpointError(f"--resume '{resume}' {what}: pass a training checkpoint such as '{last}' (train without --resume first)")
    module = build_module(cfg)
    if resume is not None:
        _check_resume(resume, module, cfg)
    ds = open_dataset(source, sampling_rate=cfg.sampling_rate)
    check_window(ds, module.in_samples, source.label)
    train_loader, dev_loader = make_loaders(cfg, module, ds)

    out.mkdir(parents=True, exist_ok=True)
    _dump_config(cfg, out)
    logger = CSVLogger(save_dir=str(Path(weights_dir)), name=cfg.experiment_name)
    logger.log_hyperparams({"config": json.dumps(cfg.raw)})
    best_ckpt = ModelCheckpoint(dirpath=out, filename=BEST_NAME, monitor="val_loss", mode="min", save_top_k=1, enable_version_counter=False)
    # last.ckpt: its own every-epoch checkpoint. Lightning's save_last=True on the best checkpoint
    # only copies when a new best is saved, so it fell behind as soon as val_loss stopped improving.
    last_ckpt = ModelCheckpoint(dirpath=out, filename=LAST_NAME, monitor=None, save_top_k=1, every_n_epochs=1, enable_version_counter=False)
    trainer_args: dict[str, Any] = {
        "max_epochs": cfg.max_epochs,
        "accelerator": device or "auto",
        "devices": 1 if (device or "auto") in ("cpu", "auto") else "auto",
        "log_every_n_steps": 1,
        "enable_model_summary": False,
        "use_distributed_sampler": False,  # EpochSampler shards by rank itself, keeping exact resume
        **cfg.trainer_args,
        **(trainer_overrides or {}),
    }
    if "accelerator" in cfg.trainer_args and device is not None:
        trainer_args["accelerator"] = device
    check_accelerator(trainer_args.get("accelerator"))
    callbacks: list[pl.Callback] = [best_ckpt, last_ckpt]  # best first: last.ckpt holds its updated state
    if cfg.model == "SeisMoE":
        callbacks.append(
            ExpertUsageMonitor(
                interval=cfg.raw.get("monitor_interval", 50),
                max_share=cfg.raw.get("collapse_share", 0.9),
                patience=cfg.raw.get("collapse_patience", 3),
            )
        )
    trainer = pl.Trainer(
        default_root_dir=str(out),
        logger=logger,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        **trainer_args,
    )
    # SIGTERM or Ctrl-C: one line naming the newest last.ckpt (the end of the latest finished epoch:
    # a run stopped inside an epoch continues from its start, exactly) and the signal's exit status
    def newest() -> Path | None:
        path = getattr(last_ckpt, "_last_checkpoint_saved", None) or resume
        return Path(path) if path else None

    command = f"python benchmark/train.py {cfg.source} " if Path(cfg.source).is_file() else ""
    fit_or_report(
        trainer,
        lambda: trainer.fit(module, train_loader, dev_loader, ckpt_path=str(resume) if resume is not None else None),
        newest,
        command + "--resume {path}",
    )
    best = out / f"{BEST_NAME}.ckpt"
    if not best.exists():
        raise CheckpointError(f"training finished without writing '{best}' (no validation ran?); check limit_val_batches")
    return best


def _check_resume(resume: str | Path, module, cfg: BenchmarkConfig) -> None:
    """``--resume`` must be a full training checkpoint of this config's model, checked before Lightning
    restores it (whose own errors are raw tracebacks)."""
    from moelab.seismic.weights import read_lightning_file

    fix = f"pass a last.ckpt/model.ckpt written by training {cfg.source}"
    ckpt = read_lightning_file(resume, fix=fix)
    missing = [k for k in ("optimizer_states", "loops", "pytorch-lightning_version") if k not in ckpt]
    if missing:
        raise CheckpointError(f"--resume '{resume}' is not a full training checkpoint (no {', '.join(missing)}); {fix}")
    check_state_dict(module.state_dict(), ckpt["state_dict"], f"--resume '{resume}' does not fit the {cfg.model} of {cfg.source}",
                     f"resume with the config it was trained with, or {fix}")


# --------------------------------------------------------------------------------- evaluation
def load_for_eval(cfg: BenchmarkConfig, path: str | Path):
    """The trained module from ``path`` (weights_only), checked against the config's architecture."""
    from moelab.seismic.weights import holds_moe, read_lightning_checkpoint

    path = Path(path)
    if not path.exists():
        hint = f" (train it first: python benchmark/train.py {cfg.source})" if path.name == f"{BEST_NAME}.ckpt" else ""
        raise CheckpointError(f"checkpoint '{path}' does not exist{hint}")
    state, hp = read_lightning_checkpoint(path, fix="pass the model.ckpt written by benchmark/train.py")
    is_moe = holds_moe(state)
    held = "SeisMoE" if is_moe else "EQTransformer"
    if held != cfg.model:
        raise CheckpointError(
            f"'{path}' holds a {held} (its keys {'include' if is_moe else 'lack'} MoE experts) but the config "
            f"{cfg.source} says model '{cfg.model}'; evaluate it with a {held} config or pass the matching checkpoint"
        )
    ckpt_arch = hp.get("model_args") if isinstance(hp.get("model_args"), dict) else {}
    diffs = []
    for key in ("num_experts", "num_experts_per_token", "in_samples"):
        if key in cfg.model_args and key in ckpt_arch and cfg.model_args[key] != ckpt_arch[key]:
            diffs.append(f"{key}: checkpoint {ckpt_arch[key]}, config {cfg.model_args[key]}")
    if diffs:
        raise CheckpointError(f"'{path}' does not match the architecture in {cfg.source} ({'; '.join(diffs)}); use the config it was trained with")
    args = {k: v for k, v in cfg.model_args.items() if k not in ("base_model", "freeze_non_moe", "freeze_non_ffn")}
    if ckpt_arch:
        args["model_args"] = ckpt_arch  # resolved architecture: no pretrained weights are fetched
    seed_everything(cfg.seed)
    module = lit_class(cfg.model)(**args)
    check_state_dict(
        module.state_dict(), state, f"'{path}' does not fit the {cfg.model} of {cfg.source}", "use the config it was trained with"
    )
    module.load_state_dict(state)
    module.eval()
    return module


def default_targets_dir(cfg: BenchmarkConfig, source: DataSource) -> Path:
    """``targets/<data>/`` (pick-benchmark's layout); for local folders, next to the data."""
    if cfg.targets:
        return Path(cfg.targets)
    if source.kind == "folder" and source.path is not None:
        return source.path / "targets"
    return Path("targets") / source.name.lower()


def ensure_targets(ds, folder: Path, seed: int = 42, in_samples: int | None = None) -> dict:
    """Load the evaluation targets, generating them first when the folder has none."""
    from moelab.seismic.evaluate import generate_targets, load_targets

    if not any((folder / f).is_file() for f in ("task1.csv", "task23.csv")):
        sr = float(ds.sampling_rate or 100.0)
        # pick-benchmark's 30 s / 10 s windows inside EQTransformer's 60 s input; a shorter model
        # window keeps the targets within its middle half, away from the edges where the
        # predictions are unreliable (as 30 s of 60 s are)
        half = None if in_samples is None else int(in_samples // 2) / sr
        w1 = 30.0 if half is None else min(30.0, half)
        w23 = 10.0 if half is None else min(10.0, half)
        log.warning("no evaluation targets in %s; generating them (task 1 windows %.1f s, task 2/3 %.1f s)", folder, w1, w23)
        generate_targets(ds, folder, seed=seed, task1_window_s=w1, task23_window_s=w23)
    return load_targets(folder)


def look_at_heads(model, ds, in_samples: int, split: str = "dev") -> dict[str, float]:
    """`moelab.seismic.heads.health_stats` of ``model`` on up to 64 ``split`` windows around P onsets of
    ``ds`` (the split the thresholds are tuned on), so that every evaluation says whether a pick head
    is capped; nothing when ``split`` holds no P pick (a noise-only set)."""
    from moelab.seismic.heads import event_windows, head_health, health_stats

    try:
        x = event_windows(ds, in_samples, split=split)
    except DataError:
        return {}
    return health_stats(head_health(model, x.to(next(model.parameters()).device)))


def evaluate(
    cfg: BenchmarkConfig,
    model_path: str | Path,
    data_root: str | Path | None = None,
    targets: str | Path | None = None,
    sets: tuple[str, ...] = ("dev", "test"),
    batch_size: int | None = None,
    device: str | None = None,
    output: str | Path | None = None,
) -> tuple[dict[str, float], Path]:
    """Evaluate a checkpoint on pick-benchmark's three tasks; writes predictions and results.csv."""
    import pandas as pd

    from moelab.seismic.evaluate import evaluate_module

    check_accelerator(device)
    for flag, path in (("--targets", targets), ("--output", output)):
        if path:
            check_output(flag, path, folder=True)
    module = load_for_eval(cfg, model_path)
    source = preflight(cfg, data_root, check_weights=False)
    ds = open_dataset(source, sampling_rate=cfg.sampling_rate)
    folder = Path(targets) if targets else default_targets_dir(cfg, source)
    tg = ensure_targets(ds, folder, seed=cfg.seed, in_samples=module.in_samples)
    out = Path(output) if output else Path(model_path).parent / "eval"
    accelerator = "gpu" if device in ("gpu", "cuda") else "cpu"
    stats = evaluate_module(module, ds, tg, sets=sets, batch_size=batch_size or cfg.batch_size, accelerator=accelerator, pred_dir=out)
    stats.update(look_at_heads(module.model, ds, module.in_samples, split=sets[0]))
    row = {"model": cfg.model, "data": source.label, "checkpoint": str(model_path), **stats}
    from moelab.checkpoint import atomic_write_bytes

    atomic_write_bytes(pd.DataFrame([row]).to_csv(index=False).encode(), out / "results.csv")
    return stats, out
