"""Pretrained EQTransformer weights for SeisMoE's ``base_model``, online or offline, never unpickled.

``base_model`` may be

* a SeisBench weight name (``"stead"``, ``"original"``, ``"ethz"``, ...): looked up in SeisBench's
  cache and downloaded there by SeisBench's own machinery when missing (needs internet once);
* a local path: a SeisBench-format pair (``<name>.json`` + ``<name>.pt``, optionally ``.v<N>``
  suffixed; give the folder holding it, either file, or the common prefix as passed to ``save``),
  a plain ``.pt``/``.pth`` state dict, a Lightning ``.ckpt`` of an `EQTransformerLit`/`SeisMoELit`,
  or a ``.safetensors`` file (a ``.json`` with the same stem supplies the model arguments);
* None / ``"none"``: random initialisation.

The architecture arguments stored with the weights (``model_args`` in the json, e.g.
``original_compatible``, ``lstm_blocks`` and ``norm`` of the ``"original"`` weights) are returned with
them so the model is built to fit.

Pretrained names go through SeisBench's public API (``EQTransformer.from_pretrained`` /
``list_versions`` and its cache ``seisbench.cache_model_root``). SeisBench 0.12.6's ``load`` calls a
bare ``torch.load``, which refuses pickled code only where torch defaults to ``weights_only=True``
(torch >= 2.6): there SeisBench reads the files itself; with an older torch, and for every local
file, they are read here with `moelab.checkpoint.safe_load` (or safetensors) instead, so a pickle
payload is refused, never run.

This module reads weight files only; it builds no SeisMoE (that is `moelab.seismic.model`, which
imports this module and never the other way round).
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import seisbench
import torch
from packaging import version as _version
from seisbench.models import EQTransformer
from torch import Tensor

from moelab.checkpoint import check_state_dict, safe_load
from moelab.errors import CheckpointError, ConfigError

#: Model arguments a SeisMoE's weights carry besides EQTransformer's (``SeisMoE.get_model_args``).
MOE_ARGS: tuple[str, ...] = (
    "num_experts", "num_experts_per_token", "gate", "router_jitter", "aux_loss", "detach_router_input", "upcycle_noise", "shared_expert",
    "expert_hidden", "upcycle_drop", "router_context", "router_sources",
)
NO_BASE = frozenset({"", "none", "null", "random", "scratch"})
WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")
_VERSIONED = re.compile(r"^(?P<stem>.+)\.(?P<kind>json|pt)(?:\.v(?P<version>[^/]+))?$")


@dataclass
class BaseWeights:
    """A dense EQTransformer's (or a SeisMoE's) weights with the arguments needed to rebuild it."""

    state_dict: dict[str, Tensor]
    model_args: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def holds_moe(state_dict: dict[str, Any]) -> bool:
    """Whether a state dict (plain, or a Lightning one with ``model.`` prefixes) holds SeisMoE weights.

    The one place that tells the two models' weights apart: SeisMoE's feed-forward layers have a
    router and experts (``transformer_d0.ff.router.*``, ``transformer_d.ff.experts.<e>.*``).
    """
    return any(".ff.router." in k or ".ff.experts." in k for k in state_dict)


def read_lightning_checkpoint(
    path: str | os.PathLike, fix: str = "pass the .ckpt written by training", map_location: Any = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(state_dict, hyper_parameters)`` of a Lightning checkpoint, read with ``weights_only=True``.

    Every seismic reader of training checkpoints (the Lightning modules, evaluation, picking,
    export) comes through here, so a missing, corrupt, pickled or non-Lightning file fails with the
    same message everywhere; ``fix`` ends the message for a file that is not a Lightning checkpoint.
    """
    ckpt = read_lightning_file(path, fix, map_location)
    hparams = ckpt.get("hyper_parameters") or {}
    return ckpt["state_dict"], dict(hparams) if isinstance(hparams, dict) else {}


def read_lightning_file(path: str | os.PathLike, fix: str = "pass the .ckpt written by training", map_location: Any = "cpu") -> dict[str, Any]:
    """The whole Lightning checkpoint at ``path`` (weights_only), checked to hold a seismic model's ``state_dict``."""
    path = Path(path)
    ckpt = safe_load(path, map_location=map_location)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"'{path}' is not a Lightning checkpoint (no 'state_dict'); {fix}")
    refuse_diffusion_checkpoint(ckpt, path, fix)
    return ckpt


def refuse_diffusion_checkpoint(ckpt: Any, path: str | os.PathLike, fix: str) -> None:
    """A MoEFsDiC training checkpoint (its run config under ``hyper_parameters.config``) is named as
    such, instead of failing later as weights that "do not fit" an EQTransformer."""
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    config = hp.get("config") if isinstance(hp, dict) else None
    if isinstance(config, dict) and "diffusion" in config:
        raise CheckpointError(
            f"'{path}' is a MoEFsDiC (image diffusion) checkpoint, not a SeisMoE/EQTransformer one: use it with "
            f"`moelab diffusion sample/evaluate`; {fix}"
        )


def load_base_weights(base_model: str | os.PathLike | None) -> BaseWeights | None:
    """Resolve ``base_model`` (name, path or none) to weights; None means random initialisation."""
    if base_model is None:
        return None
    if isinstance(base_model, str):
        if base_model.strip().lower() in NO_BASE:
            return None
        if not _looks_like_path(base_model):
            return load_pretrained(base_model.strip())
    elif not isinstance(base_model, os.PathLike):
        raise ConfigError(f"base_model must be a weight name, a path or null, got {type(base_model).__name__} {base_model!r}")
    return load_local(Path(base_model).expanduser())


def _looks_like_path(s: str) -> bool:
    return (
        "/" in s
        or os.sep in s
        or s.startswith((".", "~"))
        or s.endswith(WEIGHT_SUFFIXES + (".json",))
        or _VERSIONED.match(Path(s).name) is not None
    )


# --------------------------------------------------------------------------- SeisBench pretrained
def cache_folder() -> Path:
    """Where SeisBench keeps EQTransformer weights (``seisbench.cache_model_root / "eqtransformer"``)."""
    return Path(seisbench.cache_model_root) / "eqtransformer"


def remote_folder() -> str:
    """SeisBench's remote repository of EQTransformer weights (``seisbench.remote_model_root``)."""
    return urljoin(seisbench.remote_model_root, "eqtransformer")


def available_offline(base_model: str | os.PathLike | None) -> bool:
    """Whether ``base_model`` can be resolved without the network (none, a local path, or cached weights)."""
    if base_model is None or (isinstance(base_model, str) and base_model.strip().lower() in NO_BASE):
        return True
    if not isinstance(base_model, str) or _looks_like_path(base_model):
        return True  # local paths never need the network (a missing one fails with its own message)
    try:
        return bool(EQTransformer.list_versions(base_model.strip(), remote=False))
    except Exception:  # noqa: BLE001
        return False


def torch_load_refuses_pickles() -> bool:
    """Whether a bare ``torch.load`` (as SeisBench's ``load`` calls it) defaults to ``weights_only=True``.

    True from torch 2.6 on unless ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set; only then may SeisBench
    itself read downloaded weights without the risk of running code from the file.
    """
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        return False
    return _version.parse(torch.__version__.split("+")[0]) >= _version.parse("2.6")


def load_pretrained(name: str) -> BaseWeights:
    """SeisBench pretrained EQTransformer weights ``name``, from the cache or downloaded by SeisBench.

    Goes through SeisBench's public ``EQTransformer.from_pretrained`` (cache lookup, download, version
    warnings) when torch reads files with ``weights_only=True`` by default; with an older torch the
    cached pair is read by our own safe reader instead, and downloading is left to the user.
    """
    if not torch_load_refuses_pickles():
        return _cached_pretrained(name)
    try:
        model = EQTransformer.from_pretrained(name)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"SeisBench's cached weights '{name}' in {cache_folder()} were refused: they hold Python objects "
            f"that would have to be executed ({str(e).splitlines()[0][:200]}); delete them and download again"
        ) from None
    except ValueError as e:
        if "No version" in str(e):
            raise CheckpointError(
                f"SeisBench has no EQTransformer weights named '{name}'; see "
                "seisbench.models.EQTransformer.list_pretrained() for the names (e.g. 'stead', 'original', 'ethz')"
            ) from None
        raise CheckpointError(_offline_message(name, e)) from None
    except Exception as e:  # noqa: BLE001 - requests/HTTP/OS errors all mean "not reachable"
        raise CheckpointError(_offline_message(name, e)) from None
    metadata = {
        "docstring": model.weights_docstring or "",
        "version": model.weights_version,
        "default_args": dict(model.default_args),
        "model_args": model.get_model_args(),
    }
    return BaseWeights(
        state_dict=model.state_dict(),
        model_args=dict(metadata["model_args"]),
        metadata=metadata,
        source=f"SeisBench EQTransformer weights '{name}' (version {model.weights_version}, {cache_folder()})",
    )


def _cached_pretrained(name: str) -> BaseWeights:
    try:
        versions = EQTransformer.list_versions(name, remote=False)
    except Exception:  # noqa: BLE001 - an unreadable cache is treated like an empty one
        versions = []
    pair = _seisbench_pair(cache_folder(), name) if versions and cache_folder().is_dir() else None
    if pair is None:
        raise CheckpointError(
            _offline_message(name, RuntimeError(f"torch {torch.__version__} would unpickle downloaded files; moelab does not let it"))
            + "; or upgrade torch to >= 2.6 so that SeisBench may download them"
        )
    return _load_pair(*pair)


def _offline_message(name: str, error: BaseException) -> str:
    folder = cache_folder()
    reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    return (
        f"pretrained EQTransformer weights '{name}' are not in SeisBench's cache and could not be downloaded "
        f"({type(error).__name__}: {reason}). Fix: run once with internet access (SeisBench then caches them), or "
        f"copy the files '{name}.json.v<N>' and '{name}.pt.v<N>' (or unversioned '{name}.json' + '{name}.pt') "
        f"from {remote_folder()}/ into {folder}/ ; or pass a local path as base_model "
        "(a SeisBench .json+.pt pair or its folder, a .pt state dict, a .ckpt, or a .safetensors file); "
        "or base_model='none' to start from random weights"
    )


# --------------------------------------------------------------------------- local files
def load_local(path: Path) -> BaseWeights:
    """Weights from a local folder or file (see the module docstring for the accepted layouts)."""
    if path.is_dir():
        return _load_folder(path)
    if not path.exists():
        pair = _seisbench_pair(path.parent, path.name) if path.parent.is_dir() else None
        if pair is not None:
            return _load_pair(*pair)
        raise CheckpointError(
            f"base_model path '{path}' does not exist: give an existing weights folder or file, "
            "a SeisBench weight name such as 'stead', or 'none'"
        )
    m = _VERSIONED.match(path.name)
    if m is not None:
        pair = _seisbench_pair(path.parent, m["stem"], m["version"])
        if pair is not None:
            return _load_pair(*pair)
        if m["kind"] == "json":
            raise CheckpointError(f"'{path}' has no weights file next to it: expected '{m['stem']}.pt' in {path.parent}")
    json_path = path.with_suffix(".json")
    metadata = _read_json(json_path) if json_path.is_file() else {}
    return _from_state(_read_state_dict(path), metadata, f"'{path}'", path)


def _load_folder(folder: Path) -> BaseWeights:
    stems = sorted({m["stem"] for f in folder.iterdir() if (m := _VERSIONED.match(f.name)) and m["kind"] == "json"})
    pairs = [p for s in stems if (p := _seisbench_pair(folder, s)) is not None]
    if len(pairs) == 1:
        return _load_pair(*pairs[0])
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    if not pairs and len(files) == 1:
        return load_local(files[0])
    found = [str(p[1].name) for p in pairs] + [f.name for f in files]
    raise CheckpointError(
        f"weights folder '{folder}' must hold exactly one set of weights, found "
        f"{found if found else 'none'}; pass the file itself (e.g. '{folder / (found[0] if found else 'model.pt')}')"
    )


def _seisbench_pair(folder: Path, stem: str, version: str | None = None) -> tuple[Path, Path] | None:
    """The (json, pt) pair ``stem.json[.vN]`` + ``stem.pt[.vN]`` in ``folder``, newest version first."""
    if version is not None:
        j, p = folder / f"{stem}.json.v{version}", folder / f"{stem}.pt.v{version}"
        return (j, p) if j.is_file() and p.is_file() else None
    candidates: list[tuple[Any, Path, Path]] = []
    for f in folder.iterdir():
        m = _VERSIONED.match(f.name)
        if m is None or m["kind"] != "json" or m["stem"] != stem:
            continue
        suffix = f".v{m['version']}" if m["version"] else ""
        pt = folder / f"{stem}.pt{suffix}"
        if pt.is_file():
            candidates.append((_version.parse(m["version"]) if m["version"] else _version.parse("0"), f, pt))
    if not candidates:
        return None
    _, j, p = max(candidates, key=lambda c: c[0])
    return j, p


def _load_pair(json_path: Path, pt_path: Path) -> BaseWeights:
    return _from_state(_read_state_dict(pt_path), _read_json(json_path), f"'{pt_path}'", pt_path)


def _from_state(raw: Any, metadata: dict[str, Any], source: str, path: Path) -> BaseWeights:
    state, ckpt_args = _as_state_dict(raw, path)
    args = {**ckpt_args, **dict(metadata.get("model_args", {}))}
    return BaseWeights(state_dict=state, model_args=args, metadata=metadata, source=source)


def _as_state_dict(raw: Any, path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A plain state dict from a state dict or a Lightning checkpoint (``model.`` prefix removed)."""
    args: dict[str, Any] = {}
    refuse_diffusion_checkpoint(raw, path, "pass a SeisMoE/EQTransformer checkpoint or exported weights")
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        hparams = raw.get("hyper_parameters") or {}
        resolved = hparams.get("model_args") if isinstance(hparams.get("model_args"), dict) else {}
        args = {**resolved, **{k: v for k, v in hparams.items() if k in _model_arg_names()}}
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, Tensor) for v in raw.values()):
        raise CheckpointError(f"'{path}' is not a state dict of tensors (nor a Lightning checkpoint holding one)")
    if all(k.startswith("model.") for k in raw):
        raw = {k[len("model."):]: v for k, v in raw.items()}
    return dict(raw), args


def _model_arg_names() -> set[str]:
    names = set(inspect.signature(EQTransformer.__init__).parameters) - {"self", "kwargs"}
    return names | set(MOE_ARGS) | {"component_order"}


def _read_state_dict(path: Path) -> Any:
    if path.name.endswith(".safetensors"):
        if not path.is_file():
            raise CheckpointError(f"weights file '{path}' does not exist")
        try:
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"'{path}' is not a valid safetensors file ({type(e).__name__}: {e})") from None
    return safe_load(path, map_location="cpu")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"weights metadata '{path}' does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"weights metadata '{path}' is not valid json ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"weights metadata '{path}' must be a json object with 'model_args'")
    return data


# --------------------------------------------------------------------------- dense baseline
def build_eqtransformer(base_model: str | os.PathLike | None = None, **kwargs: Any) -> EQTransformer:
    """Plain SeisBench EQTransformer from ``base_model`` (same resolution as SeisMoE), for baselines."""
    return eqtransformer_from(load_base_weights(base_model), **kwargs)


def eqtransformer_from(base: BaseWeights | None, **kwargs: Any) -> EQTransformer:
    """Plain EQTransformer built to fit ``base`` (None: random initialisation), ``kwargs`` overriding its arguments.

    The weights' ``default_args`` (e.g. tuned pick thresholds) and docstring come along, as
    SeisBench's own ``load`` does.
    """
    args = {**(base.model_args if base else {}), **kwargs}
    if base is not None and holds_moe(base.state_dict):
        raise CheckpointError(f"{base.source} holds SeisMoE weights, not a plain EQTransformer: load them with SeisMoE")
    args = {k: v for k, v in args.items() if k not in MOE_ARGS}
    try:
        model = EQTransformer(**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid EQTransformer arguments: {e}") from None
    if base is not None:
        check_state_dict(model.state_dict(), base.state_dict, f"{base.source} does not fit EQTransformer({args})",
                         "pass the model arguments the weights were trained with")
        model.load_state_dict(base.state_dict)
        apply_metadata(model, base.metadata)
    return model


def apply_metadata(model: EQTransformer, metadata: dict[str, Any]) -> None:
    """Give ``model`` the ``default_args``, docstring and version stored with its weights (as SeisBench's ``load``)."""
    model.default_args.update(json.loads(json.dumps(metadata.get("default_args") or {})))
    model._weights_docstring = metadata.get("docstring", "")
    model._weights_version = metadata.get("version", "1")
