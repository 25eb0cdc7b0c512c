"""Expert-usage statistics: how many routing assignments each expert received since the last reset."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class ExpertUsage(nn.Module):
    """Accumulates per-expert assignment counts over steps until `reset` (not saved in state_dicts)."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.register_buffer("counts", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    @torch.no_grad()
    def update(self, indices: Tensor) -> None:
        self.counts += torch.bincount(indices.reshape(-1), minlength=self.num_experts)

    def reset(self) -> None:
        self.counts.zero_()

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def fraction(self) -> Tensor:
        c = self.counts.double()
        return c / c.sum().clamp_min(1)

    def entropy(self, normalized: bool = True) -> float:
        """Shannon entropy of the usage distribution (normalised by log E: 1 = perfectly balanced)."""
        f = self.fraction()
        h = float(-(f[f > 0] * f[f > 0].log()).sum())
        return h / math.log(self.num_experts) if normalized and self.num_experts > 1 else h

    def summary(self) -> dict[str, float | list[int]]:
        f = self.fraction()
        return {
            "counts": self.counts.tolist(),
            "total": self.total,
            "max_share": float(f.max()) if self.total else 0.0,
            "min_share": float(f.min()) if self.total else 0.0,
            "entropy": self.entropy() if self.total else 0.0,
        }
