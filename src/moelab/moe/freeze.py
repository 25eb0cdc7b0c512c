"""Freezing for fine-tuning: train only the MoE layers on top of a pretrained model."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from moelab.moe.layer import moe_layers


@dataclass(frozen=True)
class TrainableReport:
    total: int
    trainable: int
    tensors: int  # number of trainable parameter tensors

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable {self.trainable:,} / {self.total:,} parameters ({self.percent:.1f}%, "
            f"{100 - self.percent:.1f}% frozen) in {self.tensors} tensors"
        )


def trainable_report(model: nn.Module) -> TrainableReport:
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    return TrainableReport(sum(p.numel() for p in params), sum(p.numel() for p in trainable), len(trainable))


def freeze_except(model: nn.Module, keep: Iterable[nn.Module]) -> TrainableReport:
    """Make only the parameters of the modules in ``keep`` trainable; return the report.

    One rule for every "fine-tune only these layers" recipe, so that an MoE model and its dense
    control (the same layers left dense) freeze exactly the same trunk."""
    for p in model.parameters():
        p.requires_grad_(False)
    for module in keep:
        for p in module.parameters():
            p.requires_grad_(True)
    return trainable_report(model)


def freeze_non_moe(model: nn.Module) -> TrainableReport:
    """Make only parameters inside MoE layers (routers and experts) trainable; return the report."""
    return freeze_except(model, moe_layers(model))
