"""Dispatch units to their experts and combine the weighted expert outputs.

Two ways, both exact and both free of Python loops over units:

* `grouped_dispatch` sorts the (unit, slot) pairs by expert, runs each expert once on the contiguous
  block of units routed to it (experts with no unit are skipped; one large conv/GEMM per expert,
  with the expert's own weights, no per-unit weight copies) and scatters the weighted outputs back
  with one ``index_add``. It works with any list of expert modules and with an `ExpertBank`
  (through `ExpertBank.expert_forward`). The block sizes must be known on the host to split the
  batch, so it reads the expert counts back (``.tolist()``): free on CPU, a host synchronisation
  on an accelerator.
* `gathered_dispatch` works with an `ExpertBank`: for each of the k routing slots the bank
  evaluates every unit with its own selected expert in one call (gathered-weight kernels, see
  `moelab.moe.gathered`). No sorting and no host synchronisation, but it copies one set of expert
  weights per unit (``[N, C, C]`` for a pointwise conv) and, in backward, a per-unit weight
  gradient of that size: cheap where weights are small next to the activations, dominant where
  they are not (1024 channels at 8x8).

`dispatch` chooses per call: a module list is grouped; a bank asks its `ExpertBank.prefers_grouped`
(cost of the per-unit weight copies against the activations; always gathered on accelerators, so
no MoE block synchronises with the host there).

While autograd records, grouped dispatch runs a bank through `ExpertBank.weighted_runner`: each
expert call gets its routing weights and a way to re-gather its input rows from the layer input,
so a bank may fuse the weighting into the expert and keep less for backward
(`moelab.diffusion.lean_backward`); the default is the expert's output times the weights.

``recompute=True`` (activation checkpointing) recomputes every expert call -- one expert's block of
units in grouped dispatch, one routing slot in gathered dispatch -- separately in backward, so that
only one call's intermediate activations are alive at a time, instead of those of all experts of
the layer (what checkpointing the whole dispatch keeps during its recompute). Same values, same
gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from moelab.moe.router import Routing
from moelab.moe.stats import expert_counts
from moelab.recompute import recomputed

DispatchMode = Literal["auto", "gathered", "grouped"]
DISPATCH_MODES: tuple[str, ...] = ("auto", "gathered", "grouped")


class ExpertBank(nn.Module):
    """E experts with stacked parameters that can evaluate each unit with its own expert at once.

    Subclasses implement `forward_gathered` and, for grouped dispatch, `expert_forward` with
    ordinary (non-gathered) kernels; ``forward_gathered(x, full(e))`` is expert ``e`` alone.
    ``dispatch_mode`` (``"auto"`` | ``"gathered"`` | ``"grouped"``) overrides the cost-based choice.
    """

    num_experts: int
    dispatch_mode: DispatchMode = "auto"
    #: whether `weighted_runner`'s calls may add into grouped dispatch's output themselves (see there)
    adds_into: bool = False

    def forward_gathered(self, x: Tensor, expert_idx: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def expert_forward(self, x: Tensor, e: int) -> Tensor:
        """Expert ``e`` applied to every unit of ``x`` (dense use, references, grouped dispatch)."""
        return self.forward_gathered(x, torch.full((x.shape[0],), e, dtype=torch.long, device=x.device))

    def expert_runner(self) -> Callable[[int, Tensor], Tensor]:
        """``run(e, x)`` = expert ``e`` on ``x``, for grouped dispatch (which calls it once per used
        expert). Banks override this to split their stacked parameters once per call (``unbind``:
        one gradient tensor per parameter in backward instead of one zero-filled ``[E, ...]``
        tensor per expert and parameter, as indexing ``weight[e]`` E times would give)."""
        return lambda e, z: self.expert_forward(z, e)

    def weighted_runner(self) -> Callable[..., Tensor | None]:
        """Grouped dispatch's ``run(e, rows, w, regather)`` while autograd records (and, for a bank
        with ``adds_into``, in inference too, where the runner adds into the layer output): expert ``e`` on
        ``rows``, each output row times its routing weight in ``w``. ``regather()`` (a `Regather`)
        returns ``rows`` again, so that a bank may recompute its input in backward instead of
        keeping it (what `moelab.diffusion.lean_backward` does). Default: `expert_runner`'s output times ``w``.

        For a bank with ``adds_into = True`` (its experts' outputs have their inputs' shape) the
        runner is called as ``run(e, rows, w, regather, into)``; ``into()`` returns the layer output so far in
        the units-last layout (`_units_last`: ``[N, H, W, C]`` for channels-last images, contiguous;
        zeros in the input's dtype if no call has added to it yet). The runner may add its weighted
        output rows to it at ``regather.idx`` in place, recorded by autograd, and return None -- and
        in backward add its input rows' gradient to ``regather.sink`` (`GatherGrad`) and return None
        for them -- or return the output as usual."""
        run = self.expert_runner()

        def weighted(e: int, rows: Tensor, w: Tensor, regather: Callable[[], Tensor]) -> Tensor:
            out = run(e, rows)
            return out * broadcast_rows(w, out)

        return weighted

    def prefers_grouped(self, x: Tensor, routing: Routing) -> bool:
        """Whether grouping units by expert is cheaper than gathering per-unit weights for ``x``.

        Default: gathered (no host synchronisation). Banks override this with their cost model.
        """
        return False


class Regather:
    """An expert's input rows, re-selected from the layer input: ``regather()`` returns
    ``back(src.index_select(0, idx))``, equal to the rows the expert was given.

    Grouped dispatch hands one to `ExpertBank.weighted_runner` so that a bank may recompute its
    input in backward instead of keeping it. An autograd Function should save ``src`` and ``idx``
    (``ctx.save_for_backward``) and call `gather` in backward rather than keep this object on
    ``ctx``: autograd frees saved tensors once backward has used them (and checks them for in-place
    changes), while an object on ``ctx`` lives as long as the graph -- which each MoE layer's
    ``last_routing`` keeps until its next forward. Held that way, every MoE block's input stayed
    alive through the rest of backward and the next step: 44 MB at 64x64, batch 8.

    ``sink`` (a `GatherGrad`, or None): where the call's backward may add its input rows' gradient
    itself, at rows ``idx``, returning None for them.
    """

    __slots__ = ("src", "idx", "back", "sink", "_version")

    def __init__(self, src: Tensor, idx: Tensor, back: Callable[[Tensor], Tensor], sink: GatherGrad | None = None) -> None:
        self.src, self.idx, self.back, self.sink = src, idx, back, sink
        self._version = src._version

    @staticmethod
    def gather(src: Tensor, idx: Tensor, back: Callable[[Tensor], Tensor]) -> Tensor:
        return back(src.index_select(0, idx))

    def __call__(self) -> Tensor:
        if self.src._version != self._version:
            raise RuntimeError("grouped dispatch: the MoE input was modified in place before backward")
        return self.gather(self.src, self.idx, self.back)


class GatherGrad:
    """The gradient at grouped dispatch's layer input (its units-last view), shared by the layer's
    expert calls: a call's backward may add its input rows' gradient here itself -- a kernel adding
    each row as it makes it -- instead of returning a tensor of the rows for the gather's backward to
    add (one copy of the rows and one pass over them less, per call).

    Safe because of the graph's order: the gather's backward runs only after every expert call's
    backward (they consume its outputs), and it takes the buffer (`take`), so nothing is left on
    the object for a later backward.
    """

    __slots__ = ("shape", "like", "grad")

    def __init__(self, like: Tensor) -> None:
        self.shape = like.shape
        self.like = like.new_empty(0)  # dtype and device only: the layer input is not kept here
        self.grad: Tensor | None = None

    def buffer(self) -> Tensor:
        """The gradient so far (zeros before the first call adds to it), ``[N, ...]`` contiguous."""
        if self.grad is None:
            self.grad = self.like.new_zeros(self.shape)
        return self.grad

    def take(self) -> Tensor | None:
        grad, self.grad = self.grad, None
        return grad


def broadcast_rows(w: Tensor, like: Tensor) -> Tensor:
    """Per-row weights ``w`` ``[N]`` shaped to multiply ``like`` ``[N, ...]`` row by row, in its dtype."""
    return w.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _units_last(x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """A view of ``x`` whose dim-0 rows are contiguous (channels-last images: ``[N, H, W, C]``) and
    the inverse permutation, so that selecting and adding rows never changes the memory layout."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1), lambda y: y.permute(0, 3, 1, 2)
    return x, lambda y: y


class _AddRows(torch.autograd.Function):
    """``y.index_add_(0, index, src)`` whose backward keeps only ``index``.

    Autograd's own ``index_add_`` saves ``src`` (for its shape), i.e. every expert output of the
    block, k times the block's activations, held until backward; the gradient of ``src`` is just
    ``grad.index_select(0, index)``.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, y: Tensor, index: Tensor, src: Tensor) -> Tensor:  # type: ignore[override]
        y.index_add_(0, index, src)
        ctx.mark_dirty(y)
        ctx.save_for_backward(index)
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None, Tensor]:  # type: ignore[override]
        (index,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad, None, grad.index_select(0, index)


class _GatherRows(torch.autograd.Function):
    """``tuple(x.index_select(0, i) for i in indices)`` whose backward adds every part's gradient
    into one zero-initialised input gradient (``index_add_``, part after part) -- or into what the
    expert calls have already added to ``sink`` (a `GatherGrad`), where a call returned None.

    Autograd's form of grouped dispatch's gather -- one ``index_select`` of all ``N*k`` rows, then
    ``split`` -- concatenates the parts' gradients in backward (k copies of the block's activations,
    written once more) before its single ``index_add``: at 64x64 the concatenation cost ~10 ms per
    MoE block. Same values and gradients: the rows are added in the same order (the parts are the
    consecutive pieces of the one index).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x: Tensor, sink: GatherGrad | None, *indices: Tensor
    ) -> tuple[Tensor, ...]:
        ctx.save_for_backward(*indices)
        ctx.rows, ctx.sink = x.shape[0], sink  # type: ignore[attr-defined]
        ctx.set_materialize_grads(False)  # a part whose call added its gradient to the sink gets None
        return tuple(x.index_select(0, i) for i in indices)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        indices = ctx.saved_tensors  # type: ignore[attr-defined]
        sink: GatherGrad | None = ctx.sink  # type: ignore[attr-defined]
        gx = sink.take() if sink is not None else None
        if gx is None:
            given = next((g for g in grads if g is not None), None)
            if given is None:
                return (None, None, *(None for _ in indices))
            gx = given.new_zeros((ctx.rows, *given.shape[1:]))  # type: ignore[attr-defined]
        for i, g in zip(indices, grads, strict=True):
            if g is not None:
                gx.index_add_(0, i, g)
        return (gx, None, *(None for _ in indices))


def _grouped(
    run: Callable[[int, Tensor], Tensor] | None,
    num_experts: int,
    x: Tensor,
    routing: Routing,
    recompute: bool = False,
    weighted_run: Callable[..., Tensor | None] | None = None,
    adds_into: bool = False,
) -> Tensor:
    n, k = routing.indices.shape
    flat = routing.indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    unit = torch.div(order, k, rounding_mode="floor")
    counts = expert_counts(flat, num_experts).tolist()  # host sync: the split sizes
    xv, back = _units_last(x)
    units = unit.split(counts)
    weights = routing.weights.reshape(-1).index_select(0, order).split(counts)
    grad = torch.is_grad_enabled()
    # a runner that may add into the layer output itself (`ExpertBank.adds_into`) gets a way to
    # it, and the input gradient to add to in backward
    adds_into = adds_into and weighted_run is not None
    sink = GatherGrad(xv) if adds_into and grad else None  # (no backward in inference)
    acc: list[Tensor | None] = [None]  # the layer output so far (units-last), made by its first use

    def layer_output() -> Tensor:  # for a call that adds into it: zeros shaped like the input
        if acc[0] is None:
            acc[0] = xv.new_zeros(xv.shape)
        return acc[0]

    def weighted(e: int, rows: Tensor, w: Tensor) -> Tensor | None:
        if weighted_run is not None:  # given while autograd records, or in inference for banks that add into
            regather = Regather(xv, units[e], back, sink)
            if adds_into:
                out = weighted_run(e, back(rows), w, regather, layer_output)
            else:
                out = weighted_run(e, back(rows), w, regather)
            return None if out is None else _units_last(out)[0]
        assert run is not None
        out, _ = _units_last(run(e, back(rows)))
        if not grad:  # sampling: weight the fresh output where it is
            return out.mul_(broadcast_rows(w, out))
        return out * broadcast_rows(w, out)

    def gathered_weighted(e: int, src: Tensor, idx: Tensor, w: Tensor) -> Tensor:
        return weighted(e, src.index_select(0, idx), w)

    recompute = recompute and grad
    # Without recompute one gather (`_GatherRows` under autograd) serves every expert; with it, each
    # checkpointed call gathers its own rows from ``xv``, so backward keeps only ``xv`` (once)
    # instead of a copy of every block.
    chunks = None
    if not recompute:
        chunks = list(_GatherRows.apply(xv, sink, *units) if grad else xv.index_select(0, unit).split(counts))
    for e in range(num_experts):
        if counts[e] == 0:
            continue
        if chunks is None:
            out = recomputed(gathered_weighted, e, xv, units[e], weights[e], enabled=True)
        else:
            rows, chunks[e] = chunks[e], None  # an expert that keeps no input (lean) frees its rows now
            out = weighted(e, rows, weights[e])
            del rows
            if out is None:  # the call added its weighted output into the layer output (in place, recorded)
                continue
        if acc[0] is None:
            acc[0] = out.new_zeros((n, *out.shape[1:]))
        acc[0] = _AddRows.apply(acc[0], units[e], out)  # in place, per expert: no concatenated copy of all outputs
    assert acc[0] is not None
    return back(acc[0])


def grouped_dispatch(experts: Sequence[nn.Module] | ExpertBank, x: Tensor, routing: Routing, recompute: bool = False) -> Tensor:
    """Run each expert once on exactly the units routed to it; return the weighted sum per unit.

    ``x``: ``[N, ...]`` with units on dim 0; experts map ``[n, ...] -> [n, ...out]``. Channels-last
    images stay channels-last (rows are selected and added in ``[N, H, W, C]`` order).
    """
    if isinstance(experts, ExpertBank):
        grad = torch.is_grad_enabled()
        # checkpointing recomputes the composed expert; in inference a bank whose calls add into the
        # layer output runs them that way too (MoEFsDiC's sampling: the fused kernels' forward, no
        # separate weighting and row-add passes; 0.86x the guided sampling step at 32x32)
        if (grad and not recompute) or (not grad and experts.adds_into):
            return _grouped(None, experts.num_experts, x, routing, False, experts.weighted_runner(), experts.adds_into)
        return _grouped(experts.expert_runner(), experts.num_experts, x, routing, recompute)
    return _grouped(lambda e, z: experts[e](z), len(experts), x, routing, recompute)


def gathered_dispatch(bank: ExpertBank, x: Tensor, routing: Routing, recompute: bool = False) -> Tensor:
    """Weighted sum over the k slots; in slot j every unit runs with its own expert ``indices[:, j]``.

    One bank call per slot (k calls, never E or N). Measured faster on CPU than stacking the k
    copies of the batch into one call, which costs a copy of the activations and its backward.
    """
    def slot(z: Tensor, idx: Tensor, w: Tensor) -> Tensor:
        out = bank.forward_gathered(z, idx)
        return out * broadcast_rows(w, out)

    y: Tensor | None = None
    for j in range(routing.k):
        out = recomputed(slot, x, routing.indices[:, j], routing.weights[:, j], enabled=recompute)
        y = out if y is None else y + out
    assert y is not None
    return y


def dispatch(experts: nn.Module, x: Tensor, routing: Routing, recompute: bool = False) -> Tensor:
    """The exact dispatch that fits the experts: a module list is grouped; a bank follows its
    ``dispatch_mode``, and in ``"auto"`` its cost model (`ExpertBank.prefers_grouped`) -- except
    under ``torch.compile``, where ``"auto"`` is gathered: grouped row counts depend on the routing,
    which inductor cannot lower ("cannot determine truth value of Relational", torch 2.13)."""
    if isinstance(experts, ExpertBank):
        mode = experts.dispatch_mode
        auto_grouped = mode == "auto" and not torch.compiler.is_compiling() and experts.prefers_grouped(x, routing)
        if mode == "grouped" or auto_grouped:
            return grouped_dispatch(experts, x, routing, recompute)
        return gathered_dispatch(experts, x, routing, recompute)
    return grouped_dispatch(experts, x, routing, recompute)  # type: ignore[arg-type]
