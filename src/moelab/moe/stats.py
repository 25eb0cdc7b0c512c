"""Expert-usage statistics: how many routing assignments each expert received since the last reset.

The counts are this process's own truth. They are deliberately a plain tensor attribute, not a
registered buffer: DistributedDataParallel broadcasts buffers from rank 0 before every forward,
which would overwrite each rank's counts with rank 0's. Figures meant for logging or for the
collapse monitor are summed over ranks explicitly (`ExpertUsage.global_counts`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn


def sum_over_ranks(t: Tensor) -> Tensor:
    """``t`` summed over all processes of the default group (a copy; ``t`` itself when not distributed).

    A collective: under DDP every rank must call it, in the same order.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    out = t.clone()
    if dist.get_backend() == "nccl" and not out.is_cuda:  # counts of a layer that has not run yet live on the CPU
        out = out.cuda()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def expert_counts(indices: Tensor, num_experts: int, dtype: torch.dtype = torch.long) -> Tensor:
    """How many times each of ``num_experts`` experts appears in ``indices`` (any shape), as ``[E]``.

    By ``index_add_`` rather than ``bincount``: bincount sizes its output from the data, which on
    CUDA reads the maximum back to the host once per MoE block; this stays on the device. The
    usage counters and the Switch loss's ``f_i`` both count with it.
    """
    flat = indices.reshape(-1)
    return torch.zeros(num_experts, dtype=dtype, device=indices.device).index_add_(0, flat, torch.ones_like(flat, dtype=dtype))


class ExpertUsage(nn.Module):
    """Accumulates per-expert assignment counts of this process over steps until `reset`.

    Not saved in state_dicts and never synchronised implicitly (see the module docstring); the
    counts follow the routing's device.
    """

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.counts = torch.zeros(num_experts, dtype=torch.long)

    @torch.no_grad()
    def update(self, indices: Tensor) -> None:
        if self.counts.device != indices.device:
            self.counts = self.counts.to(indices.device)
        self.counts += expert_counts(indices, self.num_experts, self.counts.dtype)

    def reset(self) -> None:
        self.counts.zero_()

    def global_counts(self) -> Tensor:
        """This layer's counts summed over all ranks (a collective under DDP)."""
        return sum_over_ranks(self.counts)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def fraction(self) -> Tensor:
        return _fraction(self.counts)

    def entropy(self, normalized: bool = True) -> float:
        """Shannon entropy of the usage distribution (normalised by log E: 1 = perfectly balanced)."""
        return _entropy(self.counts, normalized)

    def summary(self, across_ranks: bool = False) -> dict[str, float | list[int]]:
        """Counts, total, max/min share and normalised entropy; ``across_ranks`` sums over DDP ranks first."""
        return usage_summary(self.global_counts() if across_ranks else self.counts)


def _fraction(counts: Tensor) -> Tensor:
    c = counts.double()
    return c / c.sum().clamp_min(1)


def _entropy(counts: Tensor, normalized: bool = True) -> float:
    f = _fraction(counts)
    h = float(-(f[f > 0] * f[f > 0].log()).sum())
    e = counts.numel()
    return h / math.log(e) if normalized and e > 1 else h


def usage_summary(counts: Tensor) -> dict[str, float | list[int]]:
    """The summary figures of one layer's usage counts (``[E]`` integers)."""
    total = int(counts.sum())
    f = _fraction(counts)
    return {
        "counts": counts.tolist(),
        "total": total,
        "max_share": float(f.max()) if total else 0.0,
        "min_share": float(f.min()) if total else 0.0,
        "entropy": _entropy(counts) if total else 0.0,
    }


def routing_mutual_information(counts: Tensor) -> float:
    """How much knowing a row tells about the expert chosen: I(row; expert) / H(expert) from a
    ``[rows, experts]`` table of routing counts (rows: classes, timestep buckets, data sources).
    0 = the routing ignores the row, 1 = the row determines the expert; 0 when undefined."""
    p = counts.double() / counts.sum().clamp_min(1)
    pr, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pr @ pe)[nz]).log()).sum())
    he = float(-(pe[pe > 0] * pe[pe > 0].log()).sum())
    return mi / he if he > 0 else 0.0
