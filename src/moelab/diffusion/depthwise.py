"""Gradients of MoEFsDiC's 3x3 depthwise convolutions on channels-last CPU tensors: a C kernel.

Why: every expert runs two depthwise 3x3 convs, and on the CPU their backward was 7% of the 64x64
training step (one thread, a 2-core Xeon): oneDNN's channels-last depthwise backward makes the
weight gradient in a pass of its own and is 2-5x slower than its forward. ``depthwise.c`` makes the
input gradient and the weight and bias gradients in one pass over the output gradient and the
input, and adds a residual's gradient into the input gradient as it writes it (the expert's skip
connection: one pass over the activations less). Measured alone, one thread: 0.6-0.85x oneDNN's
time at MoEFsDiC's shapes.

Same function as ``torch.ops.aten.convolution_backward`` for ``F.conv2d(x, w, b, padding=1,
groups=C)`` to float rounding: the weight and bias sums accumulate in double across rows (closer
to a float64 reference than oneDNN's float sums), the input gradient is the same nine products
summed in another order. Built and switched like `moelab.diffusion.fused_norm`
(`moelab.diffusion.kernels`; ``MOELAB_CPU_KERNELS=0``); `supports` says where it runs, elsewhere
callers use PyTorch's kernel.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from moelab.diffusion import kernels
from moelab.diffusion.kernels import nhwc_contiguous, ptr, sample_rows

#: channels per vector in ``depthwise.c``: the channel count must be a multiple of it
CHANNEL_MULTIPLE = 16


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.moelab_dw3_backward.argtypes = [p, p, p, p, i64, i64, i64, i64, p, p, p, p, i32]
    lib.moelab_dw3_backward.restype = i32


def _library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or None where it cannot be built here."""
    return kernels.load("depthwise", "the depthwise-conv backward", _declare)


def supports(x: Tensor, weight: Tensor, padding: int | str) -> bool:
    """Whether `backward` runs for ``F.conv2d(x, weight, bias, padding=padding, groups=C)``: a 3x3
    depthwise weight ``[C, 1, 3, 3]`` with padding 1 (stride 1, no dilation, as the caller
    guarantees), ``C`` a multiple of `CHANNEL_MULTIPLE`, ``x`` as `moelab.diffusion.kernels.takes`
    requires, and the kernel built here."""
    c = x.shape[1] if x.dim() == 4 else -1
    if padding != 1 or tuple(weight.shape) != (c, 1, 3, 3) or c % CHANNEL_MULTIPLE or weight.dtype != torch.float32:
        return False
    return kernels.takes(x) and _library() is not None


def backward(
    grad: Tensor, x: Tensor, weight: Tensor, mask: tuple[bool, bool, bool] | list[bool], add: Tensor | None = None,
    into: Tensor | None = None, into_rows: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(grad_x, grad_weight, grad_bias)`` of ``F.conv2d(x, weight, bias, padding=1, groups=C)``
    at ``grad``, each None where ``mask`` does not ask for it; ``add`` (same shape as ``x``) is
    added to ``grad_x`` as it is written. ``into`` and ``into_rows``: instead of a new ``grad_x``,
    sample ``i``'s is added to ``into[into_rows[i]]`` of a contiguous ``[*, H, W, C]`` tensor
    (``into_rows`` distinct; grouped dispatch's input gradient), and ``grad_x`` is ``into``. Only
    where `supports` holds."""
    n, c, h, w = x.shape
    grad = grad.contiguous(memory_format=torch.channels_last)
    if add is not None and not (add.shape == x.shape and add.dtype == x.dtype and nhwc_contiguous(add)):
        add = add.contiguous(memory_format=torch.channels_last).to(x.dtype)
    if (into is None) != (into_rows is None):
        raise ValueError("into and into_rows go together")
    if into is not None and mask[0]:
        into_rows = sample_rows(into, into_rows, n, h, w, c)  # type: ignore[arg-type]
        gx = into
    else:
        into_rows = None
        gx = torch.empty_like(x, memory_format=torch.channels_last) if mask[0] else None
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if mask[1] else None
    gb = x.new_empty(c) if mask[2] else None
    weight = weight.detach().contiguous()  # named: a temporary would be freed before the call
    rc = _library().moelab_dw3_backward(  # type: ignore[union-attr]
        ptr(grad), ptr(x), ptr(weight), ptr(add if mask[0] else None), n, h, w, c, ptr(gx), ptr(gw), ptr(gb),
        ptr(into_rows), torch.get_num_threads(),
    )
    if rc:
        raise MemoryError("depthwise-conv backward: out of memory for its per-thread sums")
    return gx, gw, gb
