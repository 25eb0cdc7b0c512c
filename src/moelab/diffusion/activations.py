"""Exact GELU on channels-last activations, run on their contiguous ``[N, H, W, C]`` view.

Why: PyTorch's CPU ``gelu`` and ``gelu_backward`` hand a float tensor to oneDNN's vectorised
kernel only when it is contiguous in the default format; a channels-last tensor -- what every
MoEFsDiC block computes on -- falls through to ATen's own kernel: on the AVX-512 CPU measured
here (one thread) 2.0x slower forward at 2x128x64x64 (1.08 vs 0.54 ms) and 1.3x backward (1.18 vs
0.90 ms), with ATen's AVX2 kernels 3.3x and 2.4x (2x256x32x32). In a whole training step, where
the activations come from memory rather than cache, the gain is smaller: GELU's share of the 64x64
step fell from ~190 to ~150 ms. Channels-last memory *is* a contiguous
``[N, H, W, C]`` tensor, so these functions permute to that view (no copy), run the op there and
permute back. Same function (the exact, erf-based GELU), the values PyTorch gives the same
activations stored NCHW; oneDNN's and ATen's kernels round differently in the last bits, so the
model's values move by float rounding against the earlier ATen path, and every path of the model
(lean backward, the composed experts, the gathered dispatch, the head, dilated fusion) uses these functions so
that they stay equal to one another to the bit -- except that in training the lean backward's
norm-and-GELU steps run on `moelab.diffusion.fused_norm`'s kernels where they apply, equal to these
to float rounding (``MOELAB_CPU_KERNELS=0`` restores bit-equality).

Other layouts, and tensors that are both NCHW- and channels-last-contiguous, go to PyTorch as
they are. Under autograd `gelu` is differentiable (its backward is PyTorch's on the same view).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.diffusion.convs import is_channels_last

_aten = torch.ops.aten


def _nhwc(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 1)  # a contiguous view of a channels-last tensor


def _nchw(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2)


def gelu(x: Tensor) -> Tensor:
    """``F.gelu(x)`` (exact), computed on the contiguous view of a channels-last ``x``."""
    if is_channels_last(x):
        return _nchw(F.gelu(_nhwc(x)))
    return F.gelu(x)


def gelu_(x: Tensor) -> Tensor:
    """``x`` replaced by ``gelu(x)`` in place (no autograd); returns ``x``."""
    _aten.gelu_(_nhwc(x) if is_channels_last(x) else x)
    return x


def gelu_backward(grad: Tensor, x: Tensor, out: Tensor | None = None) -> Tensor:
    """``aten.gelu_backward(grad, x)``: the gradient of exact GELU at ``x``; into ``out`` when given
    (``out`` may be ``grad`` itself). Channels-last tensors run on their contiguous views when all
    of them are channels-last."""
    if is_channels_last(x) and is_channels_last(grad) and (out is None or is_channels_last(out)):
        if out is None:
            return _nchw(_aten.gelu_backward(_nhwc(grad), _nhwc(x)))
        _aten.gelu_backward.grad_input(_nhwc(grad), _nhwc(x), grad_input=_nhwc(out))
        return out
    if out is None:
        return _aten.gelu_backward(grad, x)
    return _aten.gelu_backward.grad_input(grad, x, grad_input=out)


class GELU(nn.GELU):
    """``nn.GELU()`` (exact) by `gelu`: the same module, no parameters, no state-dict keys. It takes
    no ``approximate`` argument: `gelu` is the exact form only."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return gelu(x)
