"""MoEFsDiC configuration: YAML files validated once, here, into typed configs.

A config file may start with ``extends: other.yaml`` (resolved next to the file, or among the
packaged configs); the files are deep-merged over the schema defaults below, then validated once:
unknown keys (with the closest valid key suggested), wrong types and inconsistent values raise a
`ConfigError` naming the key and the fix. The result is a `RunConfig` of typed sections:

- `ModelConfig` — every architecture field, flat (the MoE, frequency-module and DS-conv choices
  included), passed whole to the model; it is also what `MoEFsDiC_UNet` records as its diffusers
  config (``config.json``).
- `TrainConfig`, `DataConfig`, `DiffusionConfig` — the run's other sections.

Nothing downstream re-validates. The YAML vocabulary stays the quick-start's (``moe.k_active``,
``train.use_dsconv_global``, ...); the loader maps it onto the typed fields (``top_k``,
``use_dsconv``), and `RunConfig.to_dict` maps it back (that dict is what checkpoints store).
Keys of the original MoEFsDiC project's layout (``model.t_dim``, ``train.learning_rate``, ...) are
accepted as aliases and reported once in the log.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from moelab.configs import config_dir, resolve_config
from moelab.errors import ConfigError
from moelab.validation import check_choice, check_type, unknown_key

log = logging.getLogger(__name__)

#: Where ``extends:`` of an in-memory dict (no file to be relative to) is also looked up.
CONFIG_DIR = config_dir("diffusion")

# The YAML layout: section -> key -> allowed type(s), or a tuple of allowed values. The defaults
# live once, in the typed sections below (the full model of the quick-start; configs/diffusion/
# default.yaml states the same values); `SCHEMA` pairs each key with its default.
_NUM = (int, float)
_TYPES: dict[str, dict[str, Any]] = {
    "model": {
        "arch": ("moefsdic", "unet2d"),
        "in_channels": int,
        "model_channels": int,
        "channel_mults": list,
        "image_size": int,
        "num_classes": int,
        "emb_dim": (int, type(None)),  # time/class embedding width; None = 4 * model_channels
        "layers_per_block": int,  # MoE (or fusion) blocks per U-Net level, like diffusers' layers_per_block
        "freq_bands": int,  # radial frequency bands the Freq_Global_Module weights per channel
    },
    "moe": {
        "enabled": bool,
        "num_experts": int,
        "k_active": int,
        "gate": ("topk_softmax", "softmax_topk"),
        "router_hidden": int,  # 0 = linear router
        "jitter": _NUM,
        "load_loss": ("switch", "variance"),
        "z_loss_coef": _NUM,
        "kernel_size": int,
    },
    "freq": {
        "enabled": bool,
    },
    "train": {
        "use_dsconv_global": bool,
        "batch_size": int,
        "lr": _NUM,
        "weight_decay": _NUM,
        "betas": list,
        "epochs": int,
        "lambda_load": _NUM,
        "cond_drop_prob": _NUM,
        "lr_schedule": ("constant", "constant_with_warmup", "cosine", "plateau"),
        "warmup_steps": int,
        "plateau_factor": _NUM,
        "plateau_patience": int,
        "grad_clip": _NUM,  # max gradient norm; 0 = off
        "accumulate_grad_batches": int,
        "precision": ("32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "fp16", "bf16"),
        "gradient_checkpointing": (bool, list),  # true/false, or the resolution levels to recompute ([0] = full resolution)
        "lean_backward": bool,  # experts, upsampling convs and output head keep less for backward (moelab.diffusion.lean_backward)
        "compile": bool,  # torch.compile the network (nn.Module.compile: same state-dict keys)
        "ema": bool,
        "ema_decay": _NUM,
        "checkpoint_every": int,  # epochs between checkpoints
        "keep_last": int,  # keep only the newest N checkpoints; 0 = keep all
        "checkpoint_dir": str,  # where checkpoint_epoch_N.pth go (--checkpoint-dir overrides)
        "seed": int,
        "num_workers": int,
        "log_every": int,
        "monitor_interval": int,  # steps between expert-usage checks (collapse warning)
        "collapse_share": _NUM,  # warn when one expert takes more than this share of a block's routing
        "collapse_patience": int,  # ... for this many consecutive checks
        "eval_every_epochs": int,  # sample + evaluate every N epochs (0 = off); moelab.diffusion.eval_callback
        "eval_per_class": int,
        "eval_guidance": _NUM,
        "select_metric": ("frechet_distance", "accuracy", "fid"),  # the best checkpoint is kept by it
        "inception_weights": (str, type(None)),  # local Inception weights file: adds the standard FID
    },
    "data": {
        "dataset": ("digits", "mnist", "fashion_mnist", "cifar10", "image_folder"),
        "root": str,
        "fit": ("resize", "pad"),  # how native images reach image_size
        "subset": (int, type(None)),  # use only the first N images of each split (quick runs)
    },
    "diffusion": {
        "num_train_timesteps": int,
        "beta_start": _NUM,
        "beta_end": _NUM,
        "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    },
}
TOP_LEVEL = ("extends",)
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
PRECISION_ALIASES = {"32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}

#: The original MoEFsDiC project's keys -> ours (section, key). Values are taken as they are,
#: except ``diffusion.schedule``, whose names are mapped by `_SCHEDULE_NAMES`.
ALIASES: dict[tuple[str, str], tuple[str, str]] = {
    ("model", "t_dim"): ("model", "emb_dim"),
    ("model", "c_dim"): ("model", "emb_dim"),
    ("train", "learning_rate"): ("train", "lr"),
    ("train", "num_epochs"): ("train", "epochs"),
    ("train", "image_size"): ("model", "image_size"),
    ("train", "num_classes"): ("model", "num_classes"),
    ("train", "log_interval"): ("train", "log_every"),
    ("train", "save_interval"): ("train", "checkpoint_every"),
    ("diffusion", "num_timesteps"): ("diffusion", "num_train_timesteps"),
    ("diffusion", "schedule"): ("diffusion", "beta_schedule"),
}
_SCHEDULE_NAMES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


# --- typed configs --------------------------------------------------------------------------------
class _Section(Mapping):
    """Read-only mapping access to a typed section (``cfg.train["lr"]`` == ``cfg.train.lr``).

    Code written against the quick-start's plain dict keeps working; new code reads attributes.
    """

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        value = getattr(self, key)
        return list(value) if isinstance(value, tuple) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/YAML-safe values (tuples as lists)."""
        return {k: self[k] for k in self._names()}


@dataclass(frozen=True)
class ModelConfig(_Section):
    """Every architecture choice of MoEFsDiC (and of its dense baseline), flat and typed.

    Args:
        arch (`str`, defaults to `"moefsdic"`): `"moefsdic"`, or `"unet2d"` for the dense diffusers
            `UNet2DModel` baseline at matched active parameters.
        in_channels (`int`, defaults to 3): image channels.
        model_channels (`int`, defaults to 128): width of the first U-Net level.
        channel_mults (`tuple[int, ...]`, defaults to `(1, 2, 4, 8)`): width multiplier per level;
            the image is halved `len(channel_mults) + 1` times.
        image_size (`int`, defaults to 64): square image side, divisible by `2 ** (levels + 1)`.
        num_classes (`int`, defaults to 10): classes; id `num_classes` is the null class of guidance.
        emb_dim (`int`, *optional*): time/class embedding width; `None` means `4 * model_channels`.
        layers_per_block (`int`, defaults to 1): MoE (or fusion) blocks per level on each side.
        freq_bands (`int`, defaults to 8): radial frequency bands of the Freq_Global_Module.
        moe_enabled (`bool`, defaults to `True`): MoE conv blocks; `False` uses Dilated_Fusion_Blocks.
        num_experts (`int`, defaults to 8): experts per MoE block.
        top_k (`int`, defaults to 2): experts each sample uses (YAML: `moe.k_active`).
        gate (`str`, defaults to `"topk_softmax"`): softmax over the k selected logits, or
            `"softmax_topk"` (softmax, top-k, renormalise).
        router_hidden (`int`, defaults to 64): hidden width of the router MLP; 0 = linear router.
        jitter (`float`, defaults to 0.0): multiplicative router-input noise during training.
        kernel_size (`int`, defaults to 3): odd kernel size of the expert convolutions.
        freq_enabled (`bool`, defaults to `True`): Freq_Global_Module at the bottleneck (else a block).
        use_dsconv (`bool`, defaults to `True`): depthwise-separable convs; `False` = standard 3x3
            (YAML: `train.use_dsconv_global`, where the quick-start put it).
    """

    arch: str = "moefsdic"
    in_channels: int = 3
    model_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 4, 8)
    image_size: int = 64
    num_classes: int = 10
    emb_dim: int | None = None
    layers_per_block: int = 1
    freq_bands: int = 8
    moe_enabled: bool = True
    num_experts: int = 8
    top_k: int = 2
    gate: str = "topk_softmax"
    router_hidden: int = 64
    jitter: float = 0.0
    kernel_size: int = 3
    freq_enabled: bool = True
    use_dsconv: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mults", tuple(int(c) for c in self.channel_mults))

    @property
    def embed_dim(self) -> int:
        """The time/class embedding width actually used."""
        return self.emb_dim or 4 * self.model_channels

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied, checked like a loaded config."""
        return model_config(None, **dataclasses.replace(self, **changes).to_dict())


@dataclass(frozen=True)
class TrainConfig(_Section):
    """The training run: optimiser, schedule, loss weights, precision, EMA, checkpoints, seeds.

    Args (YAML ``train.*`` unless noted; the original project's names in brackets):
        batch_size (`int`, 16): images per optimizer step and device.
        lr (`float`, 1e-4) [learning_rate], weight_decay (`float`, 0), betas (`(float, float)`,
            (0.9, 0.999)): AdamW.
        epochs (`int`, 100) [num_epochs]: epochs to train (``--max-steps`` can stop earlier).
        lambda_load (`float`, 0.01): weight of the load-balance loss.
        load_loss (`str`, "switch"; YAML ``moe.load_loss``): "switch" (Switch/GShard) or "variance".
        z_loss_coef (`float`, 0; YAML ``moe.z_loss_coef``): weight of the router z-loss.
        cond_drop_prob (`float`, 0.1): fraction of labels replaced by the null class (guidance).
        lr_schedule (`str`, "constant"): constant | constant_with_warmup | cosine | plateau, with
            warmup_steps (`int`, 0), plateau_factor (`float`, 0.5), plateau_patience (`int`, 5).
        grad_clip (`float`, 1.0): max gradient norm, 0 = off.
        accumulate_grad_batches (`int`, 1), precision (`str`, "32-true"): Lightning's options.
        gradient_checkpointing (`bool` or `tuple[int, ...]`, False): recompute in backward instead
            of keeping activations. True: every block (diffusers' ``enable_gradient_checkpointing``).
            A list of resolution levels (MoEFsDiC only; indices into ``model.channel_mults``, 0 =
            full resolution): only those levels' blocks and up/down-sampling convs. Activations
            shrink with resolution while the pointwise GEMMs cost the same at every level, so the
            full-resolution levels give the most memory for the least recompute (README,
            Benchmarks: at 64x64 under TCMalloc, ``[0, 1]`` kept 1.29x the dense model's peak
            memory at 1.36x its step time, against 1.25x at 1.49x for True).
        lean_backward (`bool`, True): MoEFsDiC's depthwise-separable experts keep only their
            pointwise outputs for backward and recompute the rest, its upsampling convs keep their
            input instead of the upsampled map and the depthwise output, and its output head keeps
            its input instead of the norm's and GELU's outputs (`moelab.diffusion.lean_backward`;
            experts: CPU, channels-last, grouped dispatch). Same values and gradients; less memory for some
            recompute time (README, `bench/train_step.py`'s ``moe_plain``). False: plain autograd ops.
        compile (`bool`, False): ``torch.compile`` the network in place (``nn.Module.compile``, so
            checkpoints keep their keys). MoE blocks then trace their gathered dispatch, whose
            shapes do not depend on the routing; same outputs as eager up to float rounding. Meant
            for GPUs; on the 2-core CPU it was not faster (README, Benchmarks).
        ema (`bool`, True), ema_decay (`float`, 0.999): EMA weights (the ones checkpoints export).
        checkpoint_every (`int`, 1) [save_interval], keep_last (`int`, 0 = all), checkpoint_dir
            (`str`, "checkpoints"; ``--checkpoint-dir`` overrides): checkpoints.
        seed (`int`, 0): every random draw of training is a function of it (exact resume).
        num_workers (`int`, 0): DataLoader workers.
        log_every (`int`, 10) [log_interval]: steps between logged metrics.
        monitor_interval (`int`, 50), collapse_share (`float`, 0.9), collapse_patience (`int`, 3):
            the expert-collapse warning (checked every N steps; one expert above the share for
            that many checks).
        eval_every_epochs (`int`, 0 = off), eval_per_class (`int`, 100), eval_guidance (`float`, 1.25),
            select_metric (`str`, "frechet_distance" | "accuracy" | "fid"), inception_weights (`str`,
            *optional*): evaluation during training (`moelab.diffusion.eval_callback`): every N epochs
            that many EMA samples per class are scored, and the checkpoint best by select_metric kept.
    """

    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: int = 100
    lambda_load: float = 0.01
    load_loss: str = "switch"
    z_loss_coef: float = 0.0
    cond_drop_prob: float = 0.1
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    grad_clip: float = 1.0
    accumulate_grad_batches: int = 1
    precision: str = "32-true"
    gradient_checkpointing: bool | tuple[int, ...] = False
    lean_backward: bool = True
    compile: bool = False
    ema: bool = True
    ema_decay: float = 0.999
    checkpoint_every: int = 1
    keep_last: int = 0
    checkpoint_dir: str = "checkpoints"
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    monitor_interval: int = 50
    collapse_share: float = 0.9
    collapse_patience: int = 3
    eval_every_epochs: int = 0
    eval_per_class: int = 100
    eval_guidance: float = 1.25
    select_metric: str = "frechet_distance"
    inception_weights: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if not isinstance(self.gradient_checkpointing, bool):
            object.__setattr__(self, "gradient_checkpointing", tuple(self.gradient_checkpointing))


@dataclass(frozen=True)
class DataConfig(_Section):
    """Which images to train on and how they reach ``model.image_size``.

    Args:
        dataset (`str`, "cifar10"): digits | mnist | fashion_mnist | cifar10 | image_folder.
        root (`str`, "data/cifar-10-batches-py"): the data folder (unused for digits).
        fit (`str`, "resize"): "resize" or "pad" native images to ``image_size``.
        subset (`int`, *optional*): only the first N images of each split (quick runs).
    """

    dataset: str = "cifar10"
    root: str = "data/cifar-10-batches-py"
    fit: str = "resize"
    subset: int | None = None


@dataclass(frozen=True)
class DiffusionConfig(_Section):
    """The DDPM noise schedule training uses (and every sampler is rebuilt from).

    Args:
        num_train_timesteps (`int`, 1000) [num_timesteps]: diffusion steps.
        beta_start (`float`, 1e-4), beta_end (`float`, 0.02): the beta range.
        beta_schedule (`str`, "linear") [schedule: linear | cosine]: linear | scaled_linear |
            squaredcos_cap_v2 (the cosine schedule), diffusers' names.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"


# (YAML section, key) -> (typed section, field) wherever the two differ; every other key keeps
# its section and name.
_TYPED_PLACE: dict[tuple[str, str], tuple[str, str]] = {
    ("moe", "enabled"): ("model", "moe_enabled"),
    ("moe", "num_experts"): ("model", "num_experts"),
    ("moe", "k_active"): ("model", "top_k"),
    ("moe", "gate"): ("model", "gate"),
    ("moe", "router_hidden"): ("model", "router_hidden"),
    ("moe", "jitter"): ("model", "jitter"),
    ("moe", "kernel_size"): ("model", "kernel_size"),
    ("moe", "load_loss"): ("train", "load_loss"),
    ("moe", "z_loss_coef"): ("train", "z_loss_coef"),
    ("freq", "enabled"): ("model", "freq_enabled"),
    ("train", "use_dsconv_global"): ("model", "use_dsconv"),
}


def _place(section: str, key: str) -> tuple[str, str]:
    return _TYPED_PLACE.get((section, key), (section, key))


@dataclass(frozen=True)
class RunConfig(Mapping):
    """A validated run: ``cfg.model`` (`ModelConfig`), ``cfg.train``, ``cfg.data``, ``cfg.diffusion``.

    Made by `load_config` (which validates); build one directly only from sections that came
    from a loaded config.

    Indexing reads the YAML layout (``cfg["moe"]["k_active"]``), the vocabulary of the config files
    and of scripts written against them; `to_dict` returns that layout as a plain dict.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The YAML layout (sections model, moe, freq, train, data, diffusion), plain values."""
        out: dict[str, dict[str, Any]] = {}
        for section, keys in SCHEMA.items():
            out[section] = {}
            for key in keys:
                typed, name = _place(section, key)
                out[section][key] = getattr(self, typed)[name]
        return out

    def __getitem__(self, section: str) -> dict[str, Any]:
        if section not in SCHEMA:
            raise KeyError(section)
        return self.to_dict()[section]

    def __iter__(self) -> Iterator[str]:
        return iter(SCHEMA)

    def __len__(self) -> int:
        return len(SCHEMA)

    def replace(self, **sections: Mapping[str, Any]) -> RunConfig:
        """A copy with YAML-layout changes applied and validated, e.g. ``replace(model={"arch": "unet2d"})``."""
        return load_config(self.to_dict(), {s: dict(v) for s, v in sections.items()})


def _default(section: str, key: str) -> Any:
    typed, name = _place(section, key)
    value = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig, "diffusion": DiffusionConfig}[typed]()[name]
    return value


#: section -> key -> (default, allowed type(s) or values), in the YAML layout.
SCHEMA: dict[str, dict[str, tuple[Any, Any]]] = {
    section: {key: (_default(section, key), spec) for key, spec in keys.items()} for section, keys in _TYPES.items()
}


def default_config() -> dict[str, dict[str, Any]]:
    """The schema defaults in the YAML layout."""
    return {s: {k: copy.deepcopy(v[0]) for k, v in keys.items()} for s, keys in SCHEMA.items()}


# --- reading and merging ------------------------------------------------------------------------
def _read_yaml(path: Path) -> dict:
    path = resolve_config(path, "diffusion")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not a text (UTF-8) file: pass a YAML config such as configs/digits.yaml") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (model, moe, ...), not {type(data).__name__}")
    return data


def _merge(base: dict, over: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(dict(v) if isinstance(v, Mapping) else v)
    return out


def _apply_aliases(data: Mapping, used: list[str]) -> dict:
    """One file's (or dict's) original-layout keys moved onto ours; ``used`` collects the mappings."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for (section, key), (to_section, to_key) in ALIASES.items():
        values = out.get(section)
        if not isinstance(values, dict) or key not in values:
            continue
        value = values.pop(key)
        if (section, key) == ("diffusion", "schedule"):
            check_choice("diffusion.schedule", value, list(_SCHEDULE_NAMES))
            value = _SCHEDULE_NAMES[value]
        target = out.setdefault(to_section, {})
        if not isinstance(target, dict):
            continue  # reported as a malformed section by validation
        if to_key in target and target[to_key] != value:
            raise ConfigError(
                f"{section}.{key}={value!r} and {to_section}.{to_key}={target[to_key]!r} disagree: {section}.{key} is the "
                f"original project's name for {to_section}.{to_key}; keep one of them"
            )
        target[to_key] = value
        used.append(f"{section}.{key} -> {to_section}.{to_key}")
    return out


def _resolve(data: Mapping, base_dir: Path | None, used: list[str], seen: tuple[Path, ...] = ()) -> dict:
    """Follow ``extends:`` chains and return the merged raw dict (without ``extends``)."""
    data = _apply_aliases(data, used)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"'extends' must be a file name such as 'default.yaml', not {parent!r}")
    candidates = [base_dir / parent] if base_dir is not None else [Path(parent), CONFIG_DIR / parent]
    path = next((p for p in candidates if p.exists()), candidates[0])
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"'extends' loop through '{path}': a config cannot extend itself")
    parent_data = _resolve(_read_yaml(path), path.parent, used, (*seen, path))
    return _merge(parent_data, data)


def _expand_overrides(overrides: Mapping[str, Any]) -> dict:
    """``{"train.lr": 1e-3}`` or nested dicts -> nested dict."""
    out: dict = {}
    for key, value in overrides.items():
        parts = str(key).split(".")
        if len(parts) == 1 and isinstance(value, Mapping):
            out = _merge(out, {key: value})
            continue
        if len(parts) != 2:
            raise ConfigError(f"override '{key}' must look like section.key (e.g. train.lr=1e-3)")
        out = _merge(out, {parts[0]: {parts[1]: value}})
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=1e-3"`` -> ``("train.lr", 0.001)``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}' must look like section.key=value (e.g. --set train.lr=1e-3)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _NUMBER.match(value.strip()):  # YAML 1.1 leaves "1e-3" a string
        value = float(value)
    return key.strip(), value


# --- validation -----------------------------------------------------------------------------------
def _check_value(section: str, key: str, value: Any, spec: Any) -> Any:
    """``value`` checked against the schema entry (and numbers normalised); returns the value to keep."""
    where = f"{section}.{key}"
    if isinstance(spec, tuple) and all(isinstance(s, str) for s in spec):
        check_choice(where, value, spec)
        return value
    types = spec if isinstance(spec, tuple) else (spec,)
    if float in types and isinstance(value, str) and _NUMBER.match(value.strip()):  # YAML 1.1 reads "1e-4" as a string
        value = float(value)
    check_type(where, value, types)
    if float in types and int not in types and isinstance(value, int):
        value = float(value)
    return value


def validate(raw: Mapping[str, Any]) -> RunConfig:
    """Defaults filled, every key and value checked; returns the typed `RunConfig`."""
    cfg = default_config()
    for section, values in raw.items():
        if section in TOP_LEVEL:
            continue
        if section not in SCHEMA:
            raise unknown_key(f"config section '{section}'", section, SCHEMA)
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"config section '{section}' must be a mapping of keys, not {values!r}")
        for key, value in values.items():
            if key not in SCHEMA[section]:
                known = [*SCHEMA[section], *(k for (s, k) in ALIASES if s == section)]  # suggest either layout's name
                raise unknown_key(f"key '{section}.{key}'", str(key), known)
            cfg[section][key] = _check_value(section, key, value, SCHEMA[section][key][1])
    _check_values(cfg)
    typed: dict[str, dict[str, Any]] = {"model": {}, "train": {}, "data": {}, "diffusion": {}}
    for section, keys in cfg.items():
        for key, value in keys.items():
            to_section, name = _place(section, key)
            typed[to_section][name] = value
    return RunConfig(
        model=ModelConfig(**typed["model"]),
        train=TrainConfig(**typed["train"]),
        data=DataConfig(**typed["data"]),
        diffusion=DiffusionConfig(**typed["diffusion"]),
    )


def _positive(cfg: dict, section: str, key: str, allow_zero: bool = False) -> None:
    v = cfg[section][key]
    if v < 0 or (v == 0 and not allow_zero):
        raise ConfigError(f"{section}.{key}={v} must be {'>= 0' if allow_zero else '> 0'}")


def _check_values(cfg: dict) -> None:
    m, moe, tr, d = cfg["model"], cfg["moe"], cfg["train"], cfg["diffusion"]
    for key in ("in_channels", "model_channels", "image_size", "num_classes", "layers_per_block", "freq_bands"):
        _positive(cfg, "model", key)
    if m["emb_dim"] is not None and m["emb_dim"] < 1:
        raise ConfigError(f"model.emb_dim={m['emb_dim']} must be a positive integer (or null for 4 * model_channels)")
    mults = m["channel_mults"]
    if not mults:
        raise ConfigError("model.channel_mults is empty: give one multiplier per U-Net level, e.g. [1, 2, 4]")
    if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in mults):
        raise ConfigError(f"model.channel_mults={mults} must be a list of positive integers, e.g. [1, 2, 4, 8]")
    factor = 2 ** (len(mults) + 1)
    if m["image_size"] % factor:
        lo = max(factor, m["image_size"] // factor * factor)
        raise ConfigError(
            f"model.image_size={m['image_size']} must be divisible by {factor} (the U-Net halves the image "
            f"{len(mults) + 1} times with channel_mults of length {len(mults)}); use e.g. {lo} or {lo + factor}, "
            "or fewer channel_mults"
        )
    if moe["num_experts"] < 1:
        raise ConfigError(f"moe.num_experts={moe['num_experts']} must be at least 1")
    if moe["k_active"] < 1:
        raise ConfigError(f"moe.k_active={moe['k_active']} must be at least 1 (experts used per sample)")
    if moe["k_active"] > moe["num_experts"]:
        raise ConfigError(
            f"moe.k_active={moe['k_active']} is larger than moe.num_experts={moe['num_experts']}: "
            "a sample cannot use more experts than exist; lower k_active or raise num_experts"
        )
    if moe["kernel_size"] < 1 or moe["kernel_size"] % 2 == 0:
        raise ConfigError(f"moe.kernel_size={moe['kernel_size']} must be a positive odd integer (3, 5, ...)")
    _positive(cfg, "moe", "router_hidden", allow_zero=True)
    if not 0 <= moe["jitter"] < 1:
        raise ConfigError(f"moe.jitter={moe['jitter']} must be in [0, 1)")
    _positive(cfg, "moe", "z_loss_coef", allow_zero=True)
    for key in ("batch_size", "epochs", "accumulate_grad_batches", "checkpoint_every", "log_every", "monitor_interval"):
        _positive(cfg, "train", key)
    for key in ("weight_decay", "lambda_load", "grad_clip", "warmup_steps", "keep_last", "num_workers", "seed", "plateau_patience"):
        _positive(cfg, "train", key, allow_zero=True)
    _positive(cfg, "train", "lr")
    if not 0 <= tr["cond_drop_prob"] < 1:
        raise ConfigError(f"train.cond_drop_prob={tr['cond_drop_prob']} must be in [0, 1) (fraction of labels dropped for guidance)")
    if not 0 < tr["ema_decay"] < 1:
        raise ConfigError(f"train.ema_decay={tr['ema_decay']} must be in (0, 1), e.g. 0.999")
    if not 0 < tr["plateau_factor"] < 1:
        raise ConfigError(f"train.plateau_factor={tr['plateau_factor']} must be in (0, 1)")
    _positive(cfg, "train", "eval_every_epochs", allow_zero=True)
    if tr["eval_per_class"] < 2:
        raise ConfigError(f"train.eval_per_class={tr['eval_per_class']} must be at least 2 (the Fréchet distance needs a spread)")
    if tr["eval_guidance"] < 1:
        raise ConfigError(f"train.eval_guidance={tr['eval_guidance']} must be >= 1 (1 = no guidance)")
    if tr["select_metric"] == "fid" and tr["inception_weights"] is None:
        raise ConfigError("train.select_metric=fid needs train.inception_weights: a local Inception weights file")
    if not tr["checkpoint_dir"].strip():
        raise ConfigError("train.checkpoint_dir is empty: give a folder name such as checkpoints")
    betas = tr["betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"train.betas={betas} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    tr["betas"] = [float(b) for b in betas]
    levels = tr["gradient_checkpointing"]
    if isinstance(levels, list):
        n = len(cfg["model"]["channel_mults"])
        ok = all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in levels)
        if not ok or len(set(levels)) != len(levels):
            raise ConfigError(
                f"train.gradient_checkpointing={levels} must be true, false or a list of distinct resolution levels "
                f"0..{n - 1} (indices into model.channel_mults, 0 = full resolution), e.g. [0] or [0, 1]"
            )
        tr["gradient_checkpointing"] = sorted(levels) or False
    tr["precision"] = PRECISION_ALIASES.get(tr["precision"], tr["precision"])
    if cfg["data"]["subset"] is not None and cfg["data"]["subset"] < 1:
        raise ConfigError(f"data.subset={cfg['data']['subset']} must be a positive number of images (or null for all)")
    if d["num_train_timesteps"] < 2:
        raise ConfigError(f"diffusion.num_train_timesteps={d['num_train_timesteps']} must be at least 2 (1000 is standard)")
    if not 0 < d["beta_start"] < d["beta_end"] < 1:
        raise ConfigError(
            f"diffusion.beta_start={d['beta_start']} and beta_end={d['beta_end']} must satisfy 0 < beta_start < beta_end < 1 "
            "(standard: 1e-4 and 0.02)"
        )


def load_config(source: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read (YAML path, raw dict or `RunConfig`), follow ``extends:``, apply ``overrides``, validate.

    ``overrides``: ``{"train.lr": 1e-3}`` or nested dicts, in the YAML layout. A `RunConfig`
    without overrides is returned as it is: it was validated when it was made.
    """
    if isinstance(source, RunConfig) and not overrides:
        return source
    used: list[str] = []
    if isinstance(source, (str, Path)):
        path = resolve_config(source, "diffusion")
        raw = _resolve(_read_yaml(path), path.resolve().parent, used)
    elif isinstance(source, RunConfig):
        raw = source.to_dict()
    elif isinstance(source, Mapping):
        raw = _resolve(source, None, used)
    else:
        raise ConfigError(f"a config must be a YAML file path or a dict, not {type(source).__name__}")
    if overrides:
        raw = _merge(raw, _apply_aliases(_expand_overrides(overrides), used))
    cfg = validate(raw)
    if used:
        log.info("config: original MoEFsDiC keys mapped onto moelab's: %s", ", ".join(dict.fromkeys(used)))
    return cfg


def model_config(source: ModelConfig | Mapping[str, Any] | None = None, **fields_: Any) -> ModelConfig:
    """A `ModelConfig` from a `ModelConfig`, a run config (YAML layout, raw or loaded), or flat fields.

    Flat fields (``num_experts=4, top_k=1``) are checked by the same rules as the YAML keys.
    """
    if isinstance(source, ModelConfig) and not fields_:
        return source
    if isinstance(source, RunConfig) and not fields_:
        return source.model
    if source is None or isinstance(source, ModelConfig):
        flat = {**(source.to_dict() if isinstance(source, ModelConfig) else {}), **fields_}
        unknown = [k for k in flat if k not in ModelConfig._names()]
        if unknown:
            raise unknown_key(f"model config field '{unknown[0]}'", unknown[0], ModelConfig._names())
        yaml_layout: dict[str, dict[str, Any]] = {}
        for (section, key) in ((s, k) for s, keys in SCHEMA.items() for k in keys):
            typed, name = _place(section, key)
            if typed == "model" and name in flat:
                value = flat[name]
                yaml_layout.setdefault(section, {})[key] = list(value) if isinstance(value, tuple) else value
        return validate(yaml_layout).model
    if fields_:
        raise ConfigError("give either a run config or model config fields, not both")
    return load_config(source).model


def dump_config(cfg: Mapping[str, Any]) -> str:
    """YAML text of a config in the file layout (loadable by `load_config`)."""
    data = cfg.to_dict() if isinstance(cfg, RunConfig) else dict(cfg)
    return yaml.safe_dump(data, sort_keys=False)
