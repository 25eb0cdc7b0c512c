"""Auxiliary router losses, computed from each layer's recorded routing.

* ``switch``: Switch/GShard load balance ``E * sum_i f_i * P_i`` with ``f_i`` the fraction of the
  N*k routing assignments sent to expert i and ``P_i`` the mean router probability of expert i.
  1.0 when perfectly balanced, E when every unit goes to one expert with certainty.
* ``variance``: MoEFsDiC quick-start's loss, the mean over units of the (population) variance of
  each unit's softmax probabilities; it pushes every unit towards uniform routing.
* ``z``: router z-loss, mean of ``logsumexp(logits)^2`` (ST-MoE), keeps logits small.

``f_i`` is counted over the experts the layer actually selected: a `Routing`'s indices, or the
indices `moelab.moe.router.route` recorded on the logits it returned. So the loss is exact for
every layer's own k (and for any routing, jittered or not) without being told k; only logits that
no router produced need an explicit ``k``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from moelab.errors import ConfigError
from moelab.moe.router import Routing, recorded_indices
from moelab.moe.stats import expert_counts

LossKind = Literal["switch", "variance"]
LOSS_KINDS: tuple[str, ...] = ("switch", "variance")


def selected_experts(logits: Tensor, k: int | None = None, indices: Tensor | None = None) -> Tensor:
    """The ``[N, k]`` experts chosen for ``logits``: ``indices``, else the router's record, else top-``k``."""
    if indices is None:
        indices = recorded_indices(logits)
    if indices is None:
        if k is None:
            raise ConfigError(
                "these router logits carry no recorded routing (they were not returned by a moelab router), so the "
                "number of experts per unit is unknown: pass k (or the Routing / its indices)"
            )
        indices = logits.topk(k, dim=-1).indices
    return indices.reshape(-1, indices.shape[-1])


def switch_loss(logits: Tensor, k: int | None = None, indices: Tensor | None = None) -> Tensor:
    """Switch/GShard load-balance loss for ``logits`` ``[N, E]`` over the experts selected for them."""
    idx = selected_experts(logits, k, indices)
    logits = logits.reshape(-1, logits.shape[-1]).float()
    n, e = logits.shape
    probs = logits.softmax(dim=-1)
    f = expert_counts(idx, e, probs.dtype) / idx.numel()
    return e * (f * probs.mean(dim=0)).sum()


def variance_loss(logits: Tensor) -> Tensor:
    """Mean over units of the variance of their softmax routing probabilities."""
    probs = logits.reshape(-1, logits.shape[-1]).float().softmax(dim=-1)
    return probs.var(dim=-1, unbiased=False).mean()


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss: mean squared log-partition function."""
    return torch.logsumexp(logits.reshape(-1, logits.shape[-1]).float(), dim=-1).pow(2).mean()


def load_loss(logits: Tensor | Routing, k: int | None = None, kind: LossKind = "switch") -> Tensor:
    """One layer's load loss, from its `Routing` (or logits with a recorded routing, or logits + ``k``)."""
    indices = None
    if isinstance(logits, Routing):
        logits, indices = logits.logits, logits.indices
    if kind == "switch":
        return switch_loss(logits, k, indices)
    if kind == "variance":
        return variance_loss(logits)
    raise ValueError(f"unknown load-loss kind {kind!r}; use one of {LOSS_KINDS}")


def aux_loss(
    per_layer: Sequence[Tensor | Routing], k: int | None = None, kind: LossKind = "switch", z_coef: float = 0.0
) -> Tensor:
    """Load loss averaged over MoE layers (plus ``z_coef`` x z-loss); 0 when there is no layer.

    ``per_layer``: each layer's `Routing` or router logits; every layer uses its own recorded
    choice, ``k`` only serves logits without one.
    """
    if len(per_layer) == 0:
        return torch.zeros(())
    total = torch.stack([load_loss(r, k, kind) for r in per_layer]).mean()
    if z_coef:
        logits = [r.logits if isinstance(r, Routing) else r for r in per_layer]
        total = total + z_coef * torch.stack([z_loss(lg) for lg in logits]).mean()
    return total
