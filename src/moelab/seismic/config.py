"""Benchmark configs (pick-benchmark style JSON), validated once when they are loaded.

A config names a model (``SeisMoE`` or ``EQTransformer``), a data set (a SeisBench data set name
or a local SeisBench folder) and the Lightning-module arguments; optional keys control training.
Everything a user can get wrong is reported here as a `ConfigError` naming the key, the bad value
and the fix (with the closest valid key for typos), so later code can trust the config.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelab.errors import ConfigError
from moelab.validation import check_type as _check_type
from moelab.validation import distinct_names
from moelab.validation import did_you_mean

MODELS: tuple[str, ...] = ("SeisMoE", "EQTransformer")
#: Learning-rate schedules of ``model_args.lr_schedule`` (diffusers' names, no warm-up).
LR_SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")

#: Optional top-level keys: name -> (accepted types, description).
TOP_LEVEL: dict[str, tuple[tuple[type, ...], str]] = {
    "model": ((str,), "SeisMoE or EQTransformer"),
    "data": ((str,), "SeisBench data set name (STEAD, ETHZ, ...) or local SeisBench folder"),
    "model_args": ((dict,), "arguments of the Lightning module"),
    "trainer_args": ((dict,), "arguments passed to lightning.pytorch.Trainer"),
    "batch_size": ((int,), "traces per batch"),
    "max_epochs": ((int,), "training epochs"),
    "name": ((str,), "experiment name (checkpoints go to weights/<name>/)"),
    "num_workers": ((int,), "DataLoader worker processes"),
    "seed": ((int,), "seed of data order, augmentation and initialisation"),
    "sampling_rate": ((int, float), "Hz the waveforms are resampled to"),
    "training_fraction": ((int, float), "fraction of training traces used, in (0, 1]"),
    "targets": ((str,), "folder of evaluation targets (task1.csv, task23.csv)"),
    "comment": ((str,), "free text, ignored"),
    "monitor_interval": ((int,), "training steps between expert-usage checks (SeisMoE)"),
    "collapse_share": ((int, float), "warn when one expert takes more than this share of the routing"),
    "collapse_patience": ((int,), "... for this many consecutive checks"),
}

# Lightning-module arguments and their checks; everything else is refused with a suggestion.
_COMMON_ARGS: dict[str, tuple[tuple[type, ...], str]] = {
    "base_model": ((str, type(None)), '"stead", "original", another SeisBench weight name, a local weights path, or null'),
    "lr": ((int, float), "Adam learning rate > 0"),
    "sigma": ((int, float), "width of the P/S label Gaussians in samples > 0"),
    "sample_boundaries": ((list,), "[low, high] of the random window (null for none)"),
    "loss_weights": ((list,), "three non-negative weights: detection, P, S"),
    "rotate_array": ((bool,), "rotate waveforms along time in training"),
    "detection_fixed_window": ((int, type(None)), "fixed detection length after P in samples"),
    "in_samples": ((int,), "window length in samples (EQTransformer default 6000)"),
    "drop_rate": ((int, float), "dropout rate in [0, 1)"),
    "lstm_blocks": ((int,), "EQTransformer LSTM blocks"),
    "original_compatible": ((bool,), "EQTransformer original-weights compatibility mode"),
    "norm": ((str,), '"std" or "peak" input normalisation for annotate/classify'),
    "redo_every": ((int, type(None)), "recycle dormant decoder channels every this many steps (ReDo; for training from scratch), null: never"),
    "redo_tau": ((int, float), "dormancy threshold of redo_every: mean activation <= this fraction of the layer's, in [0, 1)"),
    "lr_schedule": ((str,), '"constant" (pick-benchmark, default), "linear" or "cosine": the rate falls to 0 over the run\'s steps'),
    "head_prior": ((int, float, type(None)), "from scratch: P and S output biases start at -log((1-p)/p), both pick heads first output ~p (e.g. 0.01), null: PyTorch's default"),
}
_MOE_ARGS: dict[str, tuple[tuple[type, ...], str]] = {
    "num_experts": ((int,), "experts per MoE layer, >= 1 (guide: 4-16)"),
    "num_experts_per_token": ((int,), "experts per token k, 1 <= k <= num_experts (guide: 1-4)"),
    "moe_loss_coef": ((int, float), "load-balance loss weight >= 0 (guide: 0.01-0.02)"),
    "freeze_non_moe": ((bool,), "train only the MoE layers (fine-tuning)"),
    "gate": ((str,), "router gate (see moelab.moe.GATES)"),
    "router_jitter": ((int, float), "router noise in training >= 0"),
    "aux_loss": ((str,), "load-balance loss kind (see moelab.moe.LOSS_KINDS)"),
    "router_lr": ((int, float, type(None)), "learning rate of the routers alone (null: lr)"),
    "expert_lr": ((int, float, type(None)), "learning rate of the routed experts alone (null: lr)"),
    "detach_router_input": ((bool,), "route on gradient-free features, so the load loss moves only the routers (default true)"),
    "upcycle_noise": ((int, float), "relative std of the noise added to upcycled expert copies, in [0, 1) (default 0: exact copies)"),
    "upcycle_drop": ((int, float), "fraction of each upcycled expert's hidden units re-initialised (Drop-Upcycling), in [0, 1) (default 0: none)"),
    "shared_expert": ((bool,), "add an always-on shared expert (a copy of the dense FFN) to each MoE layer (default false)"),
    "router_context": ((bool,), "route each token on [token, mean of its trace's tokens], so the router knows the kind of window (default false: the token alone)"),
    "router_sources": ((list, type(None)), "names of the data sources (trace_domain values) each router is told per trace, Task-MoE style (default null: none)"),
    "expert_hidden": ((int, type(None)), "hidden size of each expert FFN, >= 128 (default null: the dense FFN's 128; wider experts are upcycled without changing the output)"),
}
MODEL_ARGS: dict[str, dict[str, tuple[tuple[type, ...], str]]] = {
    "SeisMoE": {**_COMMON_ARGS, **_MOE_ARGS},
    "EQTransformer": {
        **_COMMON_ARGS,
        "freeze_non_ffn": ((bool,), "train only the two transformer feed-forward networks (the dense control of SeisMoE's freeze_non_moe)"),
    },
}
#: Trainer arguments the harness sets itself (a config must not override them).
HARNESS_TRAINER_ARGS = ("logger", "callbacks", "plugins", "default_root_dir", "enable_checkpointing")


@dataclass
class BenchmarkConfig:
    """A validated benchmark config; ``raw`` is the JSON as written (stored next to checkpoints)."""

    model: str
    data: str
    model_args: dict[str, Any] = field(default_factory=dict)
    trainer_args: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    max_epochs: int = 100
    name: str | None = None
    num_workers: int = 0
    seed: int = 42
    sampling_rate: float = 100.0
    training_fraction: float = 1.0
    targets: str | None = None
    source: str = "<dict>"
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def experiment_name(self) -> str:
        """``<model>_<data>`` (pick-benchmark naming), data reduced to its folder name for paths."""
        if self.name:
            return self.name
        data = Path(self.data).name if looks_like_path(self.data) else self.data
        return f"{self.model}_{data}"


def looks_like_path(data: str) -> bool:
    return any(sep in data for sep in ("/", os.sep)) or data.startswith(".") or data.startswith("~")


def _suggest(key: str, options: list[str] | tuple[str, ...]) -> str:
    return did_you_mean(key, options, cutoff=0.6)


def validate(raw: Any, source: str = "<dict>") -> BenchmarkConfig:
    """Check every key and value of a config dict and return the typed config."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a JSON object like {{\"model\": \"SeisMoE\", \"data\": \"STEAD\", \"model_args\": {{...}}}}, got {type(raw).__name__}")
    for key in raw:
        if key not in TOP_LEVEL:
            raise ConfigError(f"{source}: unknown key '{key}'{_suggest(key, list(TOP_LEVEL))}; allowed keys: {', '.join(TOP_LEVEL)}")
    for key in ("model", "data"):
        if key not in raw:
            raise ConfigError(f"{source}: missing required key '{key}' ({TOP_LEVEL[key][1]})")
    for key, value in raw.items():
        _check_type(f"{source}: '{key}'", value, *TOP_LEVEL[key])

    model = raw["model"]
    if model not in MODELS:
        raise ConfigError(f"{source}: unknown model '{model}'{_suggest(model, MODELS)}; choose one of {', '.join(MODELS)}")
    if not raw["data"].strip():
        raise ConfigError(f"{source}: 'data' is empty; name a SeisBench data set (STEAD, ETHZ, ...) or a local SeisBench folder")

    model_args = dict(raw.get("model_args", {}))
    allowed = MODEL_ARGS[model]
    for key, value in model_args.items():
        if key not in allowed:
            hint = _suggest(key, list(allowed))
            if model == "EQTransformer" and key in _MOE_ARGS:
                hint = " (it is a SeisMoE argument: EQTransformer has no experts; use \"model\": \"SeisMoE\")"
            if model == "SeisMoE" and key == "freeze_non_ffn":
                hint = " (SeisMoE's feed-forward networks are MoE layers: use freeze_non_moe)"
            raise ConfigError(f"{source}: unknown model_args key '{key}' for {model}{hint}; allowed: {', '.join(allowed)}")
        _check_type(f"{source}: model_args.{key}", value, *allowed[key])
    _check_model_values(model_args, source)

    trainer_args = dict(raw.get("trainer_args", {}))
    _check_trainer_args(trainer_args, source)

    def positive(key: str, default: Any, minimum: int = 1) -> Any:
        v = raw.get(key, default)
        if v < minimum:
            raise ConfigError(f"{source}: '{key}' must be >= {minimum}, got {v}")
        return v

    fraction = raw.get("training_fraction", 1.0)
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"{source}: 'training_fraction' must be in (0, 1], got {fraction}")
    sr = raw.get("sampling_rate", 100.0)
    if sr <= 0:
        raise ConfigError(f"{source}: 'sampling_rate' must be > 0 Hz, got {sr}")
    return BenchmarkConfig(
        model=model,
        data=raw["data"],
        model_args=model_args,
        trainer_args=trainer_args,
        batch_size=positive("batch_size", 64),
        max_epochs=positive("max_epochs", 100),
        name=raw.get("name"),
        num_workers=positive("num_workers", 0, minimum=0),
        seed=raw.get("seed", 42),
        sampling_rate=float(sr),
        training_fraction=float(fraction),
        targets=raw.get("targets"),
        source=source,
        raw=dict(raw),
    )


def _check_model_values(a: dict[str, Any], source: str) -> None:
    where = f"{source}: model_args"
    if "num_experts" in a and a["num_experts"] < 1:
        raise ConfigError(f"{where}.num_experts must be >= 1, got {a['num_experts']} (the guide recommends 4-16)")
    if "num_experts_per_token" in a:
        k, e = a["num_experts_per_token"], a.get("num_experts", 4)
        if k < 1:
            raise ConfigError(f"{where}.num_experts_per_token must be >= 1, got {k}")
        if k > e:
            raise ConfigError(
                f"{where}.num_experts_per_token={k} exceeds num_experts={e}: each token can use at most all experts; "
                f"lower num_experts_per_token or raise num_experts"
            )
    if a.get("expert_hidden") is not None and a["expert_hidden"] < 1:
        raise ConfigError(f"{where}.expert_hidden must be >= 1 (SeisMoE needs >= 128, the dense FFN's hidden size), got {a['expert_hidden']}")
    for key in ("router_lr", "expert_lr"):
        if a.get(key) is not None and a[key] <= 0:
            raise ConfigError(f"{where}.{key} must be > 0 (or null for lr), got {a[key]}")
    for key in ("lr", "sigma"):
        if key in a and a[key] <= 0:
            raise ConfigError(f"{where}.{key} must be > 0, got {a[key]}")
    if "lr_schedule" in a and a["lr_schedule"] not in LR_SCHEDULES:
        raise ConfigError(f"{where}.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got '{a['lr_schedule']}'{_suggest(a['lr_schedule'], LR_SCHEDULES)}")
    if a.get("redo_every") is not None and a["redo_every"] < 1:
        raise ConfigError(f"{where}.redo_every must be >= 1 step (or null: never), got {a['redo_every']}")
    if a.get("head_prior") is not None and not 0 < a["head_prior"] < 1:
        raise ConfigError(f"{where}.head_prior must be a probability in (0, 1), e.g. 0.01, got {a['head_prior']}")
    if a.get("head_prior") is not None and a.get("base_model") is not None:
        raise ConfigError(f"{where}.head_prior initialises a model trained from scratch; drop it or set base_model to null")
    if "redo_tau" in a and not 0 <= a["redo_tau"] < 1:
        raise ConfigError(f"{where}.redo_tau must be in [0, 1) (a fraction of the layer's mean activation, e.g. 0.025), got {a['redo_tau']}")
    for key in ("moe_loss_coef", "router_jitter"):
        if key in a and a[key] < 0:
            raise ConfigError(f"{where}.{key} must be >= 0, got {a[key]}")
    for key, meaning in (
        ("upcycle_noise", "relative std of the expert noise at upcycling, e.g. 0.01"),
        ("upcycle_drop", "fraction of each expert's hidden units re-initialised at upcycling, e.g. 0.5"),
    ):
        if key in a and not 0 <= a[key] < 1:
            raise ConfigError(f"{where}.{key} must be in [0, 1) ({meaning}), got {a[key]}")
    if a.get("router_sources") is not None:
        r = a["router_sources"]
        if not distinct_names(r):
            raise ConfigError(f"{where}.router_sources must be a non-empty list of distinct source names (trace_domain values) or null, got {r}")
    if "drop_rate" in a and not 0 <= a["drop_rate"] < 1:
        raise ConfigError(f"{where}.drop_rate must be in [0, 1), got {a['drop_rate']}")
    if "in_samples" in a and a["in_samples"] < 256:
        raise ConfigError(f"{where}.in_samples must be >= 256 (EQTransformer downsamples 7 times), got {a['in_samples']}")
    if "loss_weights" in a:
        w = a["loss_weights"]
        if len(w) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in w):
            raise ConfigError(f"{where}.loss_weights must be three non-negative numbers (detection, P, S), got {w}")
    if "sample_boundaries" in a:
        b = a["sample_boundaries"]
        if len(b) != 2 or not all(x is None or (isinstance(x, int) and not isinstance(x, bool)) for x in b):
            raise ConfigError(f"{where}.sample_boundaries must be [low, high] with integers or null, got {b}")
    if "gate" in a or "aux_loss" in a:
        from moelab.moe import GATES, LOSS_KINDS

        if "gate" in a and a["gate"] not in GATES:
            raise ConfigError(f"{where}.gate '{a['gate']}' is unknown{_suggest(a['gate'], list(GATES))}; choose one of {', '.join(GATES)}")
        if "aux_loss" in a and a["aux_loss"] not in LOSS_KINDS:
            raise ConfigError(
                f"{where}.aux_loss '{a['aux_loss']}' is unknown{_suggest(a['aux_loss'], list(LOSS_KINDS))}; choose one of {', '.join(LOSS_KINDS)}"
            )
    for freeze in ("freeze_non_moe", "freeze_non_ffn"):
        if a.get(freeze) and a.get("base_model") is None:
            raise ConfigError(
                f"{where}.{freeze} is true but base_model is null: freezing a randomly initialised trunk trains nothing "
                f"useful; set base_model (\"stead\" or a weights path) or {freeze} false"
            )


def _check_trainer_args(t: dict[str, Any], source: str) -> None:
    import inspect

    import lightning.pytorch as pl

    allowed = [p for p in inspect.signature(pl.Trainer.__init__).parameters if p != "self"]
    for key in t:
        if key in HARNESS_TRAINER_ARGS:
            raise ConfigError(f"{source}: trainer_args.{key} is set by the harness (CSV logger, checkpoints under weights/<name>/); remove it")
        if key not in allowed:
            raise ConfigError(f"{source}: unknown trainer_args key '{key}'{_suggest(key, allowed)}; see lightning.pytorch.Trainer")
    if "max_epochs" in t:
        raise ConfigError(f"{source}: put max_epochs at the top level of the config, not in trainer_args")
    check_accelerator(t.get("accelerator"), where=f"{source}: trainer_args.accelerator")


def check_accelerator(accelerator: Any, where: str = "--device") -> None:
    """Refuse a GPU request on a machine without one, before any work starts."""
    if accelerator is None:
        return
    if not isinstance(accelerator, str):
        raise ConfigError(f"{where} must be a string like \"cpu\", \"gpu\", \"cuda\" or \"auto\", got {json.dumps(accelerator)}")
    acc = accelerator.lower().split(":")[0]
    if acc not in ("cpu", "gpu", "cuda", "mps", "auto", "tpu"):
        raise ConfigError(f"{where} '{accelerator}' is unknown; use cpu, gpu/cuda or auto")
    if acc in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"{where} '{accelerator}' asks for a CUDA GPU but none is available here (torch.cuda.is_available() is False); "
                "use cpu or auto"
            )
    if acc == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise ConfigError(f"{where} '{accelerator}' asks for Apple MPS but it is not available here; use cpu or auto")
    if acc == "tpu":
        import importlib.util

        if importlib.util.find_spec("torch_xla") is None:
            raise ConfigError(f"{where} '{accelerator}' asks for a TPU but torch_xla is not installed here; use cpu or auto")


def load_config(path: str | os.PathLike) -> BenchmarkConfig:
    """Read and validate a JSON config file."""
    from moelab.configs import resolve_config

    path = resolve_config(path, "seismic")  # a folder is refused there
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config '{path}' is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config '{path}' is not a text JSON file") from None
    return validate(raw, source=str(path))
