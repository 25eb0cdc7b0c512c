"""MoEFsDiC configuration: one schema with defaults, YAML files that state only what differs.

A config file may start with ``extends: other.yaml`` (resolved next to the file); the files are
deep-merged over the schema defaults below, then validated once, here: unknown keys (with the
closest valid key suggested), wrong types and inconsistent values raise a `ConfigError` naming
the key and the fix. Everything downstream trusts the returned dict.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from moelab.configs import config_dir, resolve_config
from moelab.errors import ConfigError

#: Where ``extends:`` of an in-memory dict (no file to be relative to) is also looked up.
CONFIG_DIR = config_dir("diffusion")

# Schema: section -> key -> (default, allowed type(s) or tuple of allowed values). The defaults are
# the full model of the quick-start (configs/diffusion/default.yaml states the same values).
_NUM = (int, float)
SCHEMA: dict[str, dict[str, tuple[Any, Any]]] = {
    "model": {
        "arch": ("moefsdic", ("moefsdic", "unet2d")),
        "in_channels": (3, int),
        "model_channels": (128, int),
        "channel_mults": ([1, 2, 4, 8], list),
        "image_size": (64, int),
        "num_classes": (10, int),
        "emb_dim": (None, (int, type(None))),  # time/class embedding width; None = 4 * model_channels
        "layers_per_block": (1, int),  # MoE (or fusion) blocks per U-Net level, like diffusers' layers_per_block
        "freq_bands": (8, int),  # radial frequency bands the Freq_Global_Module weights per channel
    },
    "moe": {
        "enabled": (True, bool),
        "num_experts": (8, int),
        "k_active": (2, int),
        "gate": ("topk_softmax", ("topk_softmax", "softmax_topk")),
        "router_hidden": (64, int),  # 0 = linear router
        "jitter": (0.0, _NUM),
        "load_loss": ("switch", ("switch", "variance")),
        "z_loss_coef": (0.0, _NUM),
        "kernel_size": (3, int),
    },
    "freq": {
        "enabled": (True, bool),
    },
    "train": {
        "use_dsconv_global": (True, bool),
        "batch_size": (16, int),
        "lr": (1e-4, _NUM),
        "weight_decay": (0.0, _NUM),
        "betas": ([0.9, 0.999], list),
        "epochs": (100, int),
        "lambda_load": (0.01, _NUM),
        "cond_drop_prob": (0.1, _NUM),
        "lr_schedule": ("constant", ("constant", "constant_with_warmup", "cosine", "plateau")),
        "warmup_steps": (0, int),
        "plateau_factor": (0.5, _NUM),
        "plateau_patience": (5, int),
        "grad_clip": (1.0, _NUM),  # max gradient norm; 0 = off
        "accumulate_grad_batches": (1, int),
        "precision": ("32-true", ("32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "fp16", "bf16")),
        "gradient_checkpointing": (False, bool),
        "ema": (True, bool),
        "ema_decay": (0.999, _NUM),
        "checkpoint_every": (1, int),  # epochs between checkpoints
        "keep_last": (0, int),  # keep only the newest N checkpoints; 0 = keep all
        "seed": (0, int),
        "num_workers": (0, int),
        "log_every": (10, int),
        "monitor_interval": (50, int),  # steps between expert-usage checks (collapse warning)
        "collapse_share": (0.9, _NUM),  # warn when one expert takes more than this share of a block's routing
        "collapse_patience": (3, int),  # ... for this many consecutive checks
    },
    "data": {
        "dataset": ("cifar10", ("digits", "mnist", "fashion_mnist", "cifar10", "image_folder")),
        "root": ("data/cifar-10-batches-py", str),
        "fit": ("resize", ("resize", "pad")),  # how native images reach image_size
        "subset": (None, (int, type(None))),  # use only the first N images of each split (quick runs)
    },
    "diffusion": {
        "num_train_timesteps": (1000, int),
        "beta_start": (1e-4, _NUM),
        "beta_end": (0.02, _NUM),
        "beta_schedule": ("linear", ("linear", "scaled_linear", "squaredcos_cap_v2")),
    },
}
TOP_LEVEL = ("extends",)
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
PRECISION_ALIASES = {"32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}


def default_config() -> dict[str, dict[str, Any]]:
    return {s: {k: copy.deepcopy(v[0]) for k, v in keys.items()} for s, keys in SCHEMA.items()}


def _closest(word: str, options: list[str]) -> str:
    m = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f"; did you mean '{m[0]}'?" if m else f"; valid keys: {', '.join(options)}"


def _read_yaml(path: Path) -> dict:
    path = resolve_config(path, "diffusion")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
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
            out[k] = copy.deepcopy(v)
    return out


def _resolve(data: Mapping, base_dir: Path | None, seen: tuple[Path, ...] = ()) -> dict:
    """Follow ``extends:`` chains and return the merged raw dict (without ``extends``)."""
    data = dict(data)
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
    parent_data = _resolve(_read_yaml(path), path.parent, (*seen, path))
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


def _check_type(section: str, key: str, value: Any, spec: Any) -> Any:
    name = f"{section}.{key}"
    if isinstance(spec, tuple) and all(isinstance(s, str) for s in spec):
        if value not in spec:
            hint = difflib.get_close_matches(str(value), list(spec), n=1, cutoff=0.5)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{name}={value!r} is not allowed{extra}; use one of: {', '.join(spec)}")
        return value
    types = spec if isinstance(spec, tuple) else (spec,)
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"{name} must be {_type_names(types)}, not a boolean ({value!r})")
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value) if int not in types else value
    if float in types and isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, types):
        raise ConfigError(f"{name} must be {_type_names(types)}, got {type(value).__name__} {value!r}")
    return value


def _type_names(types: tuple) -> str:
    if int in types and float in types:
        types = tuple(t for t in types if t is not int)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list", type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def validate(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Defaults filled, every key and value checked; returns a fresh plain dict."""
    cfg = default_config()
    for section, values in raw.items():
        if section in TOP_LEVEL:
            continue
        if section not in SCHEMA:
            raise ConfigError(f"unknown config section '{section}'{_closest(section, list(SCHEMA))}")
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"config section '{section}' must be a mapping of keys, not {values!r}")
        for key, value in values.items():
            if key not in SCHEMA[section]:
                raise ConfigError(f"unknown key '{section}.{key}'{_closest(str(key), list(SCHEMA[section]))}")
            cfg[section][key] = _check_type(section, key, value, SCHEMA[section][key][1])
    _check_values(cfg)
    return cfg


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
    betas = tr["betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"train.betas={betas} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    tr["betas"] = [float(b) for b in betas]
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


def load_config(source: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Read (YAML path or dict), follow ``extends:``, apply ``overrides`` ({"train.lr": 1e-3} or nested), validate."""
    if isinstance(source, (str, Path)):
        path = resolve_config(source, "diffusion")
        raw = _resolve(_read_yaml(path), path.resolve().parent)
    elif isinstance(source, Mapping):
        raw = _resolve(source, None)
    else:
        raise ConfigError(f"a config must be a YAML file path or a dict, not {type(source).__name__}")
    if overrides:
        raw = _merge(raw, _expand_overrides(overrides))
    return validate(raw)


def dump_config(cfg: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(cfg), sort_keys=False)
