"""Dispatch units to their experts and combine the weighted expert outputs.

Two ways, both exact and both free of Python loops over units:

* `grouped_dispatch` works with any list of expert modules: the (unit, slot) pairs are sorted by
  expert, each expert runs once on the contiguous block of units routed to it (experts with no
  unit are skipped), and the weighted outputs are scattered back with one ``index_add``.
* `gathered_dispatch` works with an `ExpertBank` whose experts are stored stacked: the bank
  evaluates, for each of the k routing slots, every unit with its own selected expert in one call
  (gathered-weight kernels, see `moelab.moe.gathered`). Fastest for per-sample conv experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moelab.moe.router import Routing


class ExpertBank(nn.Module):
    """E experts with stacked parameters that can evaluate each unit with its own expert at once.

    Subclasses implement `forward_gathered`; ``forward_gathered(x, full(e))`` is expert ``e`` alone,
    which is also how a naive per-unit reference is computed in tests.
    """

    num_experts: int

    def forward_gathered(self, x: Tensor, expert_idx: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def expert_forward(self, x: Tensor, e: int) -> Tensor:
        """Expert ``e`` applied to every unit of ``x`` (dense use, references, upcycling checks)."""
        return self.forward_gathered(x, torch.full((x.shape[0],), e, dtype=torch.long, device=x.device))


def _bcast(w: Tensor, like: Tensor) -> Tensor:
    return w.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def grouped_dispatch(experts: Sequence[nn.Module], x: Tensor, routing: Routing) -> Tensor:
    """Run each expert once on exactly the units routed to it; return the weighted sum per unit.

    ``x``: ``[N, ...]`` with units on dim 0; experts map ``[n, ...] -> [n, ...out]``.
    """
    n, k = routing.indices.shape
    flat = routing.indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    unit = torch.div(order, k, rounding_mode="floor")
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    chunks = x.index_select(0, unit).split(counts)
    outs = [experts[e](chunk) for e, chunk in enumerate(chunks) if counts[e] > 0]
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    out = out * _bcast(routing.weights.reshape(-1).index_select(0, order), out)
    y = out.new_zeros((n, *out.shape[1:]))
    return y.index_add_(0, unit, out)


def gathered_dispatch(bank: ExpertBank, x: Tensor, routing: Routing) -> Tensor:
    """Weighted sum over the k slots; in slot j every unit runs with its own expert ``indices[:, j]``.

    One bank call per slot (k calls, never E or N). Measured faster on CPU than stacking the k
    copies of the batch into one call, which costs a copy of the activations and its backward.
    """
    y: Tensor | None = None
    for j in range(routing.k):
        out = bank.forward_gathered(x, routing.indices[:, j])
        out = out * _bcast(routing.weights[:, j], out)
        y = out if y is None else y + out
    assert y is not None
    return y


def dispatch(experts: nn.Module, x: Tensor, routing: Routing) -> Tensor:
    """Pick the exact dispatch that fits the experts' storage (bank → gathered, list → grouped)."""
    if isinstance(experts, ExpertBank):
        return gathered_dispatch(experts, x, routing)
    return grouped_dispatch(experts, x, routing)  # type: ignore[arg-type]
