"""The sparse MoE layer both applications use, plus model-wide helpers over all MoE layers.

A layer routes units (dim 0 of its input; `TokenMoE` flattens ``[B, T, D]`` tokens into units),
dispatches them to experts, records its last `Routing` (for aux losses and analysis) and counts
expert usage in an `ExpertUsage` until `reset_moe_stats` clears it.

Every expert parameter takes part in every backward, even when no unit was routed to its expert
in this batch (grouped dispatch skips such experts): the layer adds a zero-weighted element of every
expert parameter to its output. Their gradient is then an exact 0 instead of missing, which is
what DistributedDataParallel's default (``find_unused_parameters=False``) needs: otherwise an
expert that goes idle on one rank -- exactly what happens when routing collapses -- stops training
with "Expected to have finished reduction in the prior iteration".

Optionally a layer has a *shared expert* (DeepSeek-MoE / DiT-MoE style): a module every unit goes
through, besides the routed experts. The output is then
``shared_weight * shared(x) + (1 - shared_weight) * routed(x)``; with `MoELayer.upcycle` both the
shared expert and the routed experts are copies of the dense module, so the upcycled layer still
computes what the dense module computed (``shared_weight`` 0.5, the default: halves of the same
value). Without one (the default) nothing changes.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from moelab.moe.dispatch import ExpertBank, dispatch
from moelab.moe.losses import LossKind, aux_loss
from moelab.moe.router import Gate, Routing, TopKRouter
from moelab.moe.stats import ExpertUsage


class MoELayer(nn.Module):
    """Router + experts. ``forward(x, router_features=None)``: units on dim 0 of ``x``.

    ``router_features`` (``[N, F]``) lets the caller route on something other than ``x`` itself,
    e.g. pooled features plus time and class embeddings for per-sample conv routing.
    Set ``gradient_checkpointing = True`` to recompute the experts (not the router) in backward, one
    expert call at a time (`dispatch`'s ``recompute``).

    ``shared_expert``: an optional module applied to every unit (always on, not routed); the output
    is then ``shared_weight * shared_expert(x) + (1 - shared_weight) * routed``, with
    ``shared_weight`` in (0, 1). ``None`` (default): the routed output alone, as before.
    """

    def __init__(self, router: TopKRouter, experts: nn.Module, shared_expert: nn.Module | None = None, shared_weight: float = 0.5) -> None:
        super().__init__()
        if shared_expert is not None and not (isinstance(shared_weight, (int, float)) and not isinstance(shared_weight, bool) and 0.0 < shared_weight < 1.0):
            raise ValueError(f"shared_weight must be a number in (0, 1) (the shared expert's share of the output), got {shared_weight!r}")
        self.router = router
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_weight = float(shared_weight) if shared_expert is not None else 0.0
        self.usage = ExpertUsage(router.num_experts)
        self.last_routing: Routing | None = None
        self.gradient_checkpointing = False

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def k(self) -> int:
        return self.router.k

    def forward(self, x: Tensor, router_features: Tensor | None = None) -> Tensor:
        routing = self.router(x if router_features is None else router_features)
        self.last_routing = routing
        self.usage.update(routing.indices)
        y = dispatch(self.experts, x, routing, recompute=self.gradient_checkpointing)
        y = self._touch_all_experts(y)
        if self.shared_expert is not None:
            y = self.shared_weight * self.shared_expert(x) + (1.0 - self.shared_weight) * y
        return y

    def _touch_all_experts(self, y: Tensor) -> Tensor:
        """``y`` plus 0 x (one element of every trainable expert parameter): same values, every expert in the graph.

        An `ExpertBank` needs nothing: its stacked parameters are indexed for every unit, so they
        are always in the graph.
        """
        if not torch.is_grad_enabled() or isinstance(self.experts, ExpertBank):
            return y
        params = [p for p in self.experts.parameters() if p.requires_grad]
        if not params:
            return y
        zero = torch.stack([p.reshape(-1)[0].to(y.dtype) for p in params]).sum() * 0.0
        return y + zero

    @classmethod
    def upcycle(
        cls,
        dense: nn.Module,
        num_experts: int,
        k: int,
        router_in_features: int,
        gate: Gate = "topk_softmax",
        hidden: int | None = None,
        jitter: float = 0.0,
        shared_expert: bool = False,
        shared_weight: float = 0.5,
    ) -> "MoELayer":
        """Build an MoE layer whose experts are copies of ``dense``.

        The combine weights of each unit sum to one, so at initialisation the layer computes
        exactly what ``dense`` did, whatever the router says; training then lets experts diverge.
        ``shared_expert``: add one more copy of ``dense`` as the always-on shared expert; the
        output ``shared_weight * shared(x) + (1 - shared_weight) * routed(x)`` is then still the
        dense output at initialisation (the layer holds ``num_experts + 1`` copies).
        """
        experts = nn.ModuleList(copy.deepcopy(dense) for _ in range(num_experts))
        router = TopKRouter(router_in_features, num_experts, k, hidden=hidden, gate=gate, jitter=jitter)
        shared = copy.deepcopy(dense) if shared_expert else None
        return cls(router, experts, shared_expert=shared, shared_weight=shared_weight)


class TokenMoE(MoELayer):
    """MoE layer routing every position of ``[..., D]`` independently (FFN experts)."""

    def forward(self, x: Tensor, router_features: Tensor | None = None) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        feats = None if router_features is None else router_features.reshape(flat.shape[0], -1)
        y = super().forward(flat, feats)
        return y.reshape(*shape[:-1], y.shape[-1])


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """All MoE layers of ``model`` in module order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def router_logits(model: nn.Module) -> list[Tensor]:
    """Logits of every MoE layer's last forward (``[units, E]`` each), in module order."""
    return [m.last_routing.logits for m in moe_layers(model) if m.last_routing is not None]


def model_aux_loss(model: nn.Module, kind: LossKind = "switch", z_coef: float = 0.0) -> Tensor:
    """Aux load loss of the model's last forward, averaged over its MoE layers.

    Each layer's loss is computed from its recorded `Routing` (its own k, its own selected experts).
    """
    routings = [m.last_routing for m in moe_layers(model) if m.last_routing is not None]
    if not routings:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return aux_loss(routings, kind=kind, z_coef=z_coef)


def reset_moe_stats(model: nn.Module) -> None:
    """Clear the usage counts of every MoE layer."""
    for m in moe_layers(model):
        m.usage.reset()


def moe_usage(model: nn.Module, across_ranks: bool = False) -> dict[str, dict]:
    """Usage summary (counts, max/min share, normalised entropy) per MoE layer, keyed by module name.

    ``across_ranks``: sum every layer's counts over the DDP ranks first (a collective: call it on
    every rank), which is what logs and monitors should show; by default this process's own counts.
    """
    return {name: m.usage.summary(across_ranks) for name, m in model.named_modules() if isinstance(m, MoELayer)}
