"""Reading MoEFsDiC training checkpoints back: the validated config, the weights, the model.

A training checkpoint is Lightning's file (``checkpoint_epoch_N.pth``, read with
``weights_only=True``): the run config in the YAML layout under ``hyper_parameters.config``, the
LightningModule's weights under ``state_dict`` (the EMA weights when EMA was on; the raw ones under
``current_model_state``). Everything that opens one goes through here; the key and shape check
is `moelab.checkpoint.check_state_dict`, shared with SeisMoE.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from moelab.checkpoint import check_state_dict, safe_load
from moelab.diffusion.config import RunConfig, load_config
from moelab.diffusion.models import build_model
from moelab.errors import CheckpointError, ConfigError

#: The LightningModule's attribute holding the network (its state-dict keys start with it).
MODEL_PREFIX = "model."


def model_weights(state: Mapping[str, Tensor], prefix: str = MODEL_PREFIX) -> dict[str, Tensor]:
    """The network's weights out of the LightningModule's state dict (``model.`` prefix removed)."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def check_fits(model: nn.Module, weights: Mapping[str, Tensor], source: str | Path) -> None:
    """Raise a `CheckpointError` naming the keys/shapes in which ``weights`` do not fit ``model``."""
    check_state_dict(
        model.state_dict(),
        weights,
        f"checkpoint '{source}' does not fit this model architecture",
        "use the config the checkpoint was trained with (or a checkpoint of this config)",
    )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint (safe load) with its validated `RunConfig` under ``"config"``."""
    ck = safe_load(path)
    if not isinstance(ck, dict) or "state_dict" not in ck:
        raise CheckpointError(f"'{path}' is not a MoEFsDiC training checkpoint (no 'state_dict'); pass a checkpoint_epoch_N.pth file")
    hp = ck.get("hyper_parameters") or {}
    if "config" not in hp:
        if "model_args" in hp or "num_experts_per_token" in hp:
            raise CheckpointError(
                f"checkpoint '{path}' is a SeisMoE/EQTransformer (seismic) checkpoint, not a MoEFsDiC one: use it with "
                "`moelab seismic eval/pick/export`, and pass a checkpoint_epoch_N.pth written by `moelab diffusion train` here"
            )
        raise CheckpointError(f"checkpoint '{path}' carries no config (hyper_parameters.config); it was not written by `moelab diffusion train`")
    try:
        ck["config"] = load_config(hp["config"])
    except ConfigError as e:
        raise CheckpointError(f"checkpoint '{path}' carries an invalid config: {e}") from None
    return ck


def load_model(ckpt_path: str | Path, ema: bool = True) -> tuple[nn.Module, RunConfig]:
    """The trained model (eval mode; EMA weights when present and ``ema``) and its run config."""
    p = Path(ckpt_path)
    if p.is_dir():
        raise CheckpointError(
            f"checkpoint '{p}' is a folder: pass a checkpoint_epoch_N.pth file written by training "
            "(e.g. outputs/demo/checkpoints/checkpoint_epoch_100.pth)"
        )
    ck = read_checkpoint(p)
    cfg = ck["config"]
    state = ck["state_dict"]  # with EMA on, Lightning stores the averaged weights here
    if not ema and "current_model_state" in ck:
        state = ck["current_model_state"]
    model = build_model(cfg.model)
    weights = model_weights(state)
    check_fits(model, weights, p)
    model.load_state_dict(weights)
    model.eval()
    return model, cfg
