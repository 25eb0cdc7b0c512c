"""Recycling dormant decoder channels of EQTransformer's heads (ReDo, Sokar et al., ICML 2023).

EQTransformer's three heads (detection, P, S) each decode through seven ReLU convolutions, the last
with 8 channels, read by one linear convolution and a sigmoid. At initialisation the decoders' input
barely varies in time, so a channel is either on everywhere or off everywhere, and one that is off
passes no gradient and never comes back; training kills more. Trained from scratch on a few
thousand traces, a head can end with no live channel that raises its logit, and its probability
is then capped at ``sigmoid(bias)``, about 0.5 (`moelab.seismic.heads` measures it): a P head so
capped marks the onset with a plateau a second wide instead of a peak.

ReDo's remedy: every so many steps, find the channels whose mean activation on the batch is at most
``tau`` times their layer's mean, draw their incoming weights afresh (PyTorch's default
initialisation) and zero their outgoing weights and the optimizer's moments of both, so that the
network's output does not change at the reset and the channel learns from there. Under DDP the
activations are summed over the ranks before judging and the fresh weights come from a generator
seeded by the step, so every rank recycles the same channels into the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from moelab.seismic.heads import decoder_chains

__all__ = ["channel_activity", "recycle_dormant"]


@torch.no_grad()
def channel_activity(model: nn.Module, x: Tensor, all_reduce: Callable[[Tensor], Tensor] | None = None) -> dict[tuple[str, int], Tensor]:
    """Mean ReLU activation of every decoder channel on windows ``x``: {(head, layer): (channels,)}.

    The model runs in eval mode (no dropout, BatchNorm statistics untouched) and every module is put
    back in the mode it was in (a frozen trunk's BatchNorm layers stay in eval mode while the rest
    trains); a SeisMoE's expert-usage counts are restored, so this look does not count as routing. ``all_reduce`` (sum over DDP ranks) makes every rank judge the same activity.
    """
    from moelab.moe import MoELayer

    counts = {m: m.usage.counts.clone() for m in model.modules() if isinstance(m, MoELayer)}
    sums: dict[tuple[str, int], Tensor] = {}
    hooks = []
    for name, convs in decoder_chains(model):
        for i, conv in enumerate(convs[:-1]):
            hooks.append(conv.register_forward_hook(lambda _m, _i, out, key=(name, i): sums.__setitem__(key, out.relu().mean(dim=(0, 2)))))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        for m, c in counts.items():
            m.usage.counts.copy_(c)
    if all_reduce is not None:
        packed = all_reduce(torch.cat([sums[k] for k in sums]))
        sizes = [len(v) for v in sums.values()]
        sums = dict(zip(sums, packed.split(sizes), strict=True))
    return sums


def _zero_moments(optimizer: torch.optim.Optimizer | None, param: Tensor, index: tuple) -> None:
    if optimizer is None:
        return
    for value in optimizer.state.get(param, {}).values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value[index] = 0


@torch.no_grad()
def recycle_dormant(
    model: nn.Module,
    x: Tensor,
    tau: float = 0.025,
    generator: torch.Generator | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, int]:
    """Recycle the dormant channels of every trainable decoder layer; returns the count per head.

    Args:
        model: an EQTransformer (or SeisMoE).
        x: a batch of training windows, normalised as in training.
        tau: a channel is dormant when its mean activation is at most ``tau`` times its layer's
            mean (0: only channels that never fire).
        generator: source of the fresh incoming weights (seed it by the step under DDP).
        optimizer: its moments (Adam's ``exp_avg``, ``exp_avg_sq``) of the touched weights are zeroed.
        all_reduce: sums a tensor over DDP ranks (None: one process).
    """
    activity = channel_activity(model, x, all_reduce)
    counts: dict[str, int] = {}
    for name, convs in decoder_chains(model):
        counts[name] = 0
        for i, (conv, reader) in enumerate(zip(convs[:-1], convs[1:], strict=True)):
            if not (conv.weight.requires_grad and reader.weight.requires_grad):
                continue  # a frozen layer (fine-tuning recipes) stays as it is
            act = activity[(name, i)]
            dormant = act <= tau * act.mean()
            if not bool(dormant.any()):
                continue
            idx = dormant.nonzero().flatten()
            bound = 1.0 / math.sqrt(conv.weight[0].numel())  # nn.Conv1d's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            # drawn on the CPU (the generator's device) for every channel, so the draw does not depend on which are dormant
            fresh = torch.empty(conv.weight.shape).uniform_(-bound, bound, generator=generator).to(conv.weight)
            conv.weight[idx] = fresh[idx]
            _zero_moments(optimizer, conv.weight, (idx,))
            if conv.bias is not None:
                bias = torch.empty(conv.bias.shape).uniform_(-bound, bound, generator=generator).to(conv.bias)
                conv.bias[idx] = bias[idx]
                _zero_moments(optimizer, conv.bias, (idx,))
            reader.weight[:, idx] = 0
            _zero_moments(optimizer, reader.weight, (slice(None), idx))
            counts[name] += int(len(idx))
    return counts
