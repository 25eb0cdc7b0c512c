"""The shared sparse Mixture-of-Experts core: routing, dispatch/combine, aux losses, usage stats,
freezing and upcycling. Applications build their experts and call these; they never re-implement them."""

from moelab.moe.dispatch import ExpertBank, dispatch, gathered_dispatch, grouped_dispatch
from moelab.moe.freeze import TrainableReport, freeze_non_moe, trainable_report
from moelab.moe.layer import MoELayer, TokenMoE, model_aux_loss, moe_layers, moe_usage, reset_moe_stats, router_logits
from moelab.moe.losses import LOSS_KINDS, aux_loss, load_loss, switch_loss, variance_loss, z_loss
from moelab.moe.monitor import ExpertCollapseWarning, ExpertUsageMonitor
from moelab.moe.router import GATES, Routing, TopKRouter, route
from moelab.moe.stats import ExpertUsage

__all__ = [
    "ExpertBank", "dispatch", "gathered_dispatch", "grouped_dispatch",
    "TrainableReport", "freeze_non_moe", "trainable_report",
    "MoELayer", "TokenMoE", "model_aux_loss", "moe_layers", "moe_usage", "reset_moe_stats", "router_logits",
    "LOSS_KINDS", "aux_loss", "load_loss", "switch_loss", "variance_loss", "z_loss",
    "ExpertCollapseWarning", "ExpertUsageMonitor",
    "GATES", "Routing", "TopKRouter", "route",
    "ExpertUsage",
]
