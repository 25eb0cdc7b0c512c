"""Top-k routers: map each routing unit's feature vector to logits over experts, pick k of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

Gate = Literal["topk_softmax", "softmax_topk"]
GATES: tuple[str, ...] = ("topk_softmax", "softmax_topk")
_RECORD = "_moe_indices"  # attribute of a router's logits tensor: the top-k indices chosen from it


@dataclass
class Routing:
    """One routing decision for N units: raw logits, chosen experts and their combine weights."""

    logits: Tensor  # [N, E] router logits (after jitter), what the aux losses are computed from
    indices: Tensor  # [N, k] expert ids, best first
    weights: Tensor  # [N, k] combine weights; rows sum to 1 (k = 1 with softmax_topk: Switch's p)

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]

    @property
    def k(self) -> int:
        return self.indices.shape[-1]


def route(logits: Tensor, k: int, gate: Gate = "topk_softmax") -> Routing:
    """Select the top-k experts per row of ``logits`` and their combine weights.

    For k >= 2:

    * ``topk_softmax`` (default, MoEFsDiC's quick-start): softmax over the k selected logits.
    * ``softmax_topk`` (GShard style): softmax over all logits, keep the top k, renormalise.

    Both give weights that sum to one per unit, so identical experts reproduce the dense output,
    and the router learns from the task loss through the relative weights of the k experts.

    For k = 1 either renormalisation would make the single weight the constant 1 and leave the
    router without any gradient from the task loss (it would then be trained by the load loss
    alone). So at k = 1 the weight carries the chosen expert's full-softmax probability ``p``:

    * ``softmax_topk``: the weight is ``p`` itself, not renormalised (Switch Transformer,
      Fedus et al. 2022, eq. 2): the unit's output is scaled by ``p`` in ``[1/E, 1]``.
    * ``topk_softmax``: the weight is ``p / p.detach()`` -- exactly 1 in the forward pass (so an
      upcycled layer still equals its dense FFN and the quick-start's "weights sum to 1" holds),
      with the gradient of ``log p`` in the backward pass (a straight-through estimate of Switch's
      gradient, scaled by ``1/p <= E``).
    """
    if gate not in GATES:
        raise ValueError(f"unknown gate {gate!r}; use one of {GATES}")
    top, indices = logits.topk(k, dim=-1)
    if k == 1:
        p = logits.float().softmax(dim=-1).gather(-1, indices)
        weights = p if gate == "softmax_topk" else p / p.detach()
    elif gate == "topk_softmax":
        weights = top.float().softmax(dim=-1)
    else:
        weights = logits.float().softmax(dim=-1).gather(-1, indices)
        weights = weights / weights.sum(dim=-1, keepdim=True)
    setattr(logits, _RECORD, indices)  # integer tensor, no autograd history: no reference cycle
    return Routing(logits=logits, indices=indices, weights=weights.to(logits.dtype))


def recorded_indices(logits: Tensor) -> Tensor | None:
    """The experts a router selected from ``logits`` (``[N, k]``), or None for any other tensor.

    `route` records its choice on the logits tensor it returns, so that a loss handed only a
    model's router logits (MoEFsDiC's ``moe_logits``) still uses the experts actually selected --
    that layer's own k and indices -- instead of re-deriving a top-k it would have to be told.
    """
    return getattr(logits, _RECORD, None)


class TopKRouter(nn.Module):
    """Linear (or small-MLP) gate followed by top-k selection.

    ``jitter`` multiplies the router input by U(1-jitter, 1+jitter) during training (Switch
    Transformer's exploration noise); it is off in eval mode so inference is deterministic.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: int,
        hidden: int | None = None,
        gate: Gate = "topk_softmax",
        jitter: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"k={k} must be between 1 and num_experts={num_experts}")
        if gate not in GATES:
            raise ValueError(f"unknown gate {gate!r}; use one of {GATES}")
        self.num_experts, self.k, self.gate, self.jitter = num_experts, k, gate, jitter
        if hidden:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(in_features, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, num_experts, bias=bias)
            )
        else:
            self.net = nn.Linear(in_features, num_experts, bias=bias)

    def forward(self, features: Tensor) -> Routing:
        if self.training and self.jitter > 0:
            noise = torch.empty_like(features).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            features = features * noise
        return route(self.net(features), self.k, self.gate)
