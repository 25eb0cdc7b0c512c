"""MoEFsDiC's experts: residual blocks of depthwise-separable (or standard 3x3) convolutions.

Expert = conv -> GroupNorm -> GELU -> conv -> GroupNorm, + input, -> GELU, where conv is a
DepthwiseSeparableConv2d (depthwise k x k with groups=C, then pointwise 1x1) or, with
``use_dsconv=False``, a standard 3x3 conv. All E experts' parameters are stored stacked so that
the MoE core can evaluate every sample with its own expert in one gathered-weight pass, or group
the samples by expert and run each expert once with ordinary kernels (`ResidualConvExperts.prefers_grouped`
chooses by cost).

The convolution primitives (channels-last pointwise GEMMs, group sizes) are in
`moelab.diffusion.convs`; the training-time form of a depthwise-separable expert that keeps only
its GEMM outputs for backward is in `moelab.diffusion.lean_backward`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.diffusion.activations import gelu
from moelab.diffusion.convs import autocast_enabled, is_channels_last, norm_groups, pointwise_conv
from moelab.diffusion.lean_backward import lean_ds_expert
from moelab.moe import ExpertBank, Routing
from moelab.moe.dispatch import DISPATCH_MODES, Regather, broadcast_rows
from moelab.moe.gathered import gathered_conv2d, gathered_group_norm, gathered_pointwise


def _uniform(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    # PyTorch's default Conv2d init: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


#: `ResidualConvExperts.prefers_grouped` groups samples by expert (CPU only) once one expert's
#: weights (what gathered dispatch copies per sample, and back-propagates) reach this fraction of a
#: sample's activations. Measured on CPU (channels-last, fwd+bwd of one block, E=8, k=2): grouped
#: was as fast or faster at every ratio MoEFsDiC has, from 0.07 (128 ch, 64x64: 1.45 vs 1.73 s) to
#: 32 (1024 ch, 8x8: 0.89 vs 1.37 s), because the gathered depthwise conv must fold the batch into
#: channels (an NCHW copy, oneDNN's slow layout) -- so the CPU threshold is 0: always grouped.
GROUPED_WEIGHT_RATIO = 0.0


#: `ResidualConvExperts.weighted_runner` uses the lean expert for expert calls of at least this many
#: input elements (512 KiB of float32). Below it the memory it spares is negligible and its fixed
#: cost per call (a Python backward) shows: on configs/digits.yaml (8x8, 32 channels, <= 64K
#: elements per call) lean experts made the step ~10% slower (67 vs 60 ms) for 18 MB less peak
#: memory. At 1 MiB the default config's 8x8 level (1024 channels, 64K elements per sample) stayed
#: composed, keeping nine activation-sized tensors per routed sample for backward; at 512 KiB its
#: calls of two or more samples are lean: the step's live peak fell 1,279 -> 1,265 MB at 64x64.
LEAN_MIN_NUMEL = 1 << 17


class ResidualConvExperts(ExpertBank):
    """E residual conv experts on ``channels`` channels, stacked for gathered or grouped evaluation.

    Args:
        num_experts: E, the number of experts.
        channels: input = output channels of every expert.
        use_dsconv: depthwise-separable convs (True) or standard k x k convs.
        kernel_size: spatial kernel size k (odd).
        dispatch_mode: ``"auto"`` (cost-based, see `prefers_grouped`), ``"gathered"`` or ``"grouped"``;
            all three compute the same outputs.
    """

    #: residual experts keep their input's shape: lean calls add into grouped dispatch's output
    adds_into = True

    def __init__(
        self, num_experts: int, channels: int, use_dsconv: bool = True, kernel_size: int = 3, dispatch_mode: str = "auto"
    ) -> None:
        super().__init__()
        if dispatch_mode not in DISPATCH_MODES:
            raise ValueError(f"dispatch_mode={dispatch_mode!r}; use one of {DISPATCH_MODES}")
        self.dispatch_mode = dispatch_mode  # type: ignore[assignment]
        e, c, k = num_experts, channels, kernel_size
        self.num_experts, self.channels, self.use_dsconv, self.kernel_size = e, c, use_dsconv, k
        self.groups = norm_groups(c)
        #: `weighted_runner` uses `lean_ds_expert` where it applies (set by `MoEFsDiC_UNet.set_lean_backward`)
        self.lean_backward = True
        for i in (1, 2):
            if use_dsconv:
                setattr(self, f"dw{i}_weight", _uniform((e, c, 1, k, k), k * k))
                setattr(self, f"dw{i}_bias", _uniform((e, c), k * k))
                setattr(self, f"pw{i}_weight", _uniform((e, c, c), c))
                setattr(self, f"pw{i}_bias", _uniform((e, c), c))
            else:
                setattr(self, f"conv{i}_weight", _uniform((e, c, c, k, k), c * k * k))
                setattr(self, f"conv{i}_bias", _uniform((e, c), c * k * k))
            setattr(self, f"norm{i}_weight", nn.Parameter(torch.ones(e, c)))
            setattr(self, f"norm{i}_bias", nn.Parameter(torch.zeros(e, c)))

    def _conv(self, i: int, x: Tensor, idx: Tensor) -> Tensor:
        p = self.kernel_size // 2
        if self.use_dsconv:
            h = gathered_conv2d(x, getattr(self, f"dw{i}_weight"), getattr(self, f"dw{i}_bias"), idx, padding=p, depthwise=True)
            return gathered_pointwise(h, getattr(self, f"pw{i}_weight"), getattr(self, f"pw{i}_bias"), idx)
        return gathered_conv2d(x, getattr(self, f"conv{i}_weight"), getattr(self, f"conv{i}_bias"), idx, padding=p)

    def _norm(self, i: int, x: Tensor, idx: Tensor) -> Tensor:
        return gathered_group_norm(x, self.groups, getattr(self, f"norm{i}_weight"), getattr(self, f"norm{i}_bias"), idx)

    def forward_gathered(self, x: Tensor, expert_idx: Tensor) -> Tensor:
        h = gelu(self._norm(1, self._conv(1, x, expert_idx), expert_idx))
        h = self._norm(2, self._conv(2, h, expert_idx), expert_idx)
        return gelu(h + x)

    def weights_per_expert(self) -> int:
        """Parameters of one expert: what gathered dispatch copies (and back-propagates) per sample."""
        return sum(p[0].numel() for p in self.parameters())

    def prefers_grouped(self, x: Tensor, routing: Routing) -> bool:
        """Group samples by expert on CPU where one expert's weights are at least
        `GROUPED_WEIGHT_RATIO` of a sample's activations (measured: everywhere); gathered on
        accelerators, where grouping would read the expert counts back to the host every block."""
        if x.device.type != "cpu":
            return False
        return self.weights_per_expert() >= GROUPED_WEIGHT_RATIO * x[0].numel()

    def expert_forward(self, x: Tensor, e: int) -> Tensor:
        """Expert ``e`` on all of ``x`` with ordinary (non-gathered) convs: the dense reference."""
        return self._expert(x, {name: p[e] for name, p in self.named_parameters()})

    def _per_expert_params(self) -> list[dict[str, Tensor]]:
        """One dict of parameter slices per expert; every stacked parameter is split once (``unbind``)."""
        names, params = zip(*self.named_parameters(), strict=True)
        return [dict(zip(names, slices, strict=True)) for slices in zip(*(p.unbind(0) for p in params), strict=True)]

    def expert_runner(self) -> Callable[[int, Tensor], Tensor]:
        """Grouped dispatch's ``run(e, x)``."""
        per_expert = self._per_expert_params()
        return lambda e, z: self._expert(z, per_expert[e])

    def weighted_runner(self) -> Callable[[int, Tensor, Tensor, Callable[[], Tensor]], Tensor]:
        """Grouped dispatch's weighted ``run(e, rows, w, regather)``, under autograd and in
        inference: for depthwise-separable experts on channels-last CPU input of at least
        `LEAN_MIN_NUMEL` elements, `lean_ds_expert` (keeps the pointwise outputs only, recomputes
        the rest in backward; same values and gradients; on moelab's kernels, GroupNorm+GELU fused
        and the weighted output added into the layer output as it is made); otherwise the composed
        expert times ``w`` (in place in inference)."""
        per_expert = self._per_expert_params()
        pad = self.kernel_size // 2

        def run(
            e: int, rows: Tensor, w: Tensor, regather: Callable[[], Tensor], into: Callable[[], Tensor] | None = None
        ) -> Tensor | None:
            # a `Regather`: the lean expert saves its tensors for backward, not the callable
            lean = self.lean_backward and self.use_dsconv and rows.numel() >= LEAN_MIN_NUMEL and isinstance(regather, Regather)
            if lean and rows.device.type == "cpu" and is_channels_last(rows) and not autocast_enabled("cpu"):
                # adds into grouped dispatch's output (None returned); a composed call returns its output
                return lean_ds_expert(rows, w, regather, self.groups, pad, per_expert[e], into=None if into is None else into())
            out = self._expert(rows, per_expert[e])
            return out * broadcast_rows(w, out) if torch.is_grad_enabled() else out.mul_(broadcast_rows(w, out))

        return run

    def _expert(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        """One expert with parameters ``p`` (one expert's slices) on all of ``x``, ordinary kernels;
        keeps a channels-last input channels-last."""
        pad = self.kernel_size // 2

        def conv(i: int, h: Tensor) -> Tensor:
            if self.use_dsconv:
                h = F.conv2d(h, p[f"dw{i}_weight"], p[f"dw{i}_bias"], padding=pad, groups=self.channels)
                return pointwise_conv(h, p[f"pw{i}_weight"], p[f"pw{i}_bias"])
            return F.conv2d(h, p[f"conv{i}_weight"], p[f"conv{i}_bias"], padding=pad)

        def norm(i: int, h: Tensor) -> Tensor:
            return F.group_norm(h, self.groups, p[f"norm{i}_weight"], p[f"norm{i}_bias"])

        h = gelu(norm(1, conv(1, x)))
        return gelu(norm(2, conv(2, h)) + x)
