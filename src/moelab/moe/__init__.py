"""The shared sparse Mixture-of-Experts core: routing, dispatch/combine, aux losses, usage stats,
freezing and upcycling. Applications build their experts and call these; they never re-implement them.

The core needs only PyTorch; the Lightning callback lives in `moelab.moe.callbacks`, imported by
the trainers, so ``import moelab.moe`` does not import Lightning."""

from moelab.moe.dispatch import ExpertBank, dispatch, gathered_dispatch, grouped_dispatch
from moelab.moe.freeze import TrainableReport, freeze_except, freeze_non_moe, trainable_report
from moelab.moe.layer import MoELayer, TokenMoE, model_aux_loss, moe_layers, moe_usage, reset_moe_stats, router_logits
from moelab.moe.losses import LOSS_KINDS, aux_loss, load_loss, selected_experts, switch_loss, variance_loss, z_loss
from moelab.moe.router import GATES, Routing, TopKRouter, recorded_indices, route
from moelab.moe.stats import ExpertUsage, sum_over_ranks, usage_summary

__all__ = [
    "ExpertBank", "dispatch", "gathered_dispatch", "grouped_dispatch",
    "TrainableReport", "freeze_except", "freeze_non_moe", "trainable_report",
    "MoELayer", "TokenMoE", "model_aux_loss", "moe_layers", "moe_usage", "reset_moe_stats", "router_logits",
    "LOSS_KINDS", "aux_loss", "load_loss", "selected_experts", "switch_loss", "variance_loss", "z_loss",
    "GATES", "Routing", "TopKRouter", "recorded_indices", "route",
    "ExpertUsage", "sum_over_ranks", "usage_summary",
]
