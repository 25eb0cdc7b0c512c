"""Auxiliary router losses, computed from router logits alone (so any model can return logits).

* ``switch``: Switch/GShard load balance ``E * sum_i f_i * P_i`` with ``f_i`` the fraction of the
  N*k routing assignments sent to expert i and ``P_i`` the mean router probability of expert i.
  1.0 when perfectly balanced, E when every unit goes to one expert with certainty.
* ``variance``: MoEFsDiC quick-start's loss, the mean over units of the (population) variance of
  each unit's softmax probabilities; it pushes every unit towards uniform routing.
* ``z``: router z-loss, mean of ``logsumexp(logits)^2`` (ST-MoE), keeps logits small.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

LossKind = Literal["switch", "variance"]
LOSS_KINDS: tuple[str, ...] = ("switch", "variance")


def switch_loss(logits: Tensor, k: int) -> Tensor:
    """Switch/GShard load-balance loss for ``logits`` ``[N, E]`` routed top-``k``."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    n, e = logits.shape
    probs = logits.softmax(dim=-1)
    idx = logits.topk(k, dim=-1).indices.reshape(-1)
    f = torch.bincount(idx, minlength=e).to(probs.dtype) / (n * k)
    return e * (f * probs.mean(dim=0)).sum()


def variance_loss(logits: Tensor) -> Tensor:
    """Mean over units of the variance of their softmax routing probabilities."""
    probs = logits.reshape(-1, logits.shape[-1]).float().softmax(dim=-1)
    return probs.var(dim=-1, unbiased=False).mean()


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss: mean squared log-partition function."""
    return torch.logsumexp(logits.reshape(-1, logits.shape[-1]).float(), dim=-1).pow(2).mean()


def load_loss(logits: Tensor, k: int, kind: LossKind = "switch") -> Tensor:
    if kind == "switch":
        return switch_loss(logits, k)
    if kind == "variance":
        return variance_loss(logits)
    raise ValueError(f"unknown load-loss kind {kind!r}; use one of {LOSS_KINDS}")


def aux_loss(
    logits_per_layer: Sequence[Tensor], k: int, kind: LossKind = "switch", z_coef: float = 0.0
) -> Tensor:
    """Load loss averaged over MoE layers (plus ``z_coef`` x z-loss); 0 when there is no layer."""
    if len(logits_per_layer) == 0:
        return torch.zeros(())
    total = torch.stack([load_loss(lg, k, kind) for lg in logits_per_layer]).mean()
    if z_coef:
        total = total + z_coef * torch.stack([z_loss(lg) for lg in logits_per_layer]).mean()
    return total
