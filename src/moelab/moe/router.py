"""Top-k routers: map each routing unit's feature vector to logits over experts, pick k of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

Gate = Literal["topk_softmax", "softmax_topk"]
GATES: tuple[str, ...] = ("topk_softmax", "softmax_topk")


@dataclass
class Routing:
    """One routing decision for N units: raw logits, chosen experts and their combine weights."""

    logits: Tensor  # [N, E] router logits (after jitter), what the aux losses are computed from
    indices: Tensor  # [N, k] expert ids, best first
    weights: Tensor  # [N, k] combine weights, each row sums to 1

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]

    @property
    def k(self) -> int:
        return self.indices.shape[-1]


def route(logits: Tensor, k: int, gate: Gate = "topk_softmax") -> Routing:
    """Select the top-k experts per row of ``logits`` and their weights.

    ``topk_softmax`` (default, MoEFsDiC's quick-start): softmax over the k selected logits.
    ``softmax_topk`` (Switch/GShard style): softmax over all logits, keep the top k, renormalise.
    Both give weights that sum to exactly one per unit, so identical experts reproduce the dense output.
    """
    top, indices = logits.topk(k, dim=-1)
    if gate == "topk_softmax":
        weights = top.float().softmax(dim=-1)
    elif gate == "softmax_topk":
        weights = logits.float().softmax(dim=-1).gather(-1, indices)
        weights = weights / weights.sum(dim=-1, keepdim=True)
    else:
        raise ValueError(f"unknown gate {gate!r}; use one of {GATES}")
    return Routing(logits=logits, indices=indices, weights=weights.to(logits.dtype))


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
