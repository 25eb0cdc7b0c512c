"""Gradients of MoEFsDiC's 3x3 depthwise convolutions on channels-last CPU tensors: a C kernel.

Why: every expert runs two depthwise 3x3 convs, and on the CPU their backward was 7% of the 64x64
training step (one thread, a 2-core Xeon): oneDNN's channels-last depthwise backward makes the
weight gradient in a pass of its own and is 2-5x slower than its forward. ``depthwise.c`` makes the
input gradient and the weight and bias gradients in one pass over the output gradient and the
input, and adds a residual's gradient into the input gradient as it writes it (the expert's skip
connection: one pass over the activations less). Measured alone, one thread: 0.6-0.85x oneDNN's
time at MoEFsDiC's shapes. It can also add each sample's input gradient into a row of grouped
dispatch's input gradient (``into``), and take the gradient on through the GELU(GroupNorm) that made
its input (`backward_through_gelu`: the first pass of that backward, made as the rows are written).

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
from moelab.diffusion.kernels import float_vector, nhwc_contiguous, ptr, sample_rows

#: channels per vector in ``depthwise.c``: the channel count must be a multiple of it
CHANNEL_MULTIPLE = 16


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.moelab_dw3_backward.argtypes = [p, p, p, p, i64, i64, i64, i64, p, p, p, p, p, p, p, p, p, i64, p, i32]
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
    _call(grad, x, weight, add if mask[0] else None, gx, gw, gb, into_rows)
    return gx, gw, gb


def _call(grad: Tensor, x: Tensor, weight: Tensor, add: Tensor | None, gx: Tensor | None, gw: Tensor | None,
          gb: Tensor | None, into_rows: Tensor | None, act: tuple | None = None) -> None:
    """The kernel call; ``act``: ``(act_x, mean, rstd, gamma, beta, groups, sums)`` (`backward_through_gelu`)."""
    n, c, h, w = x.shape
    weight = weight.detach().contiguous()  # named: a temporary would be freed before the call
    act_x, mean, rstd, gamma, beta, groups, sums = act if act is not None else (None,) * 5 + (0, None)
    rc = _library().moelab_dw3_backward(  # type: ignore[union-attr]
        ptr(grad), ptr(x), ptr(weight), ptr(add), n, h, w, c, ptr(gx), ptr(gw), ptr(gb),
        ptr(into_rows), ptr(act_x), ptr(mean), ptr(rstd), ptr(gamma), ptr(beta), groups, ptr(sums),
        torch.get_num_threads(),
    )
    if rc == 2:
        raise MemoryError("depthwise-conv backward: out of memory for its per-thread sums")
    if rc:
        raise RuntimeError(f"depthwise-conv backward: the kernel refused its arguments (code {rc})")


def backward_through_gelu(
    grad: Tensor, x: Tensor, weight: Tensor, mask: tuple[bool, bool] | list[bool], act_x: Tensor,
    mean: Tensor, rstd: Tensor, gamma: Tensor | None, beta: Tensor | None, groups: int,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """`backward` of a depthwise conv whose input ``x`` is ``gelu(group_norm(act_x))`` (``groups``
    groups, statistics ``mean``/``rstd`` ``[N, groups]`` as `moelab.diffusion.fused_norm.norm_act`
    returns them, affine ``gamma``/``beta`` or None), taken on through the GELU: ``(grad_act,
    grad_weight, grad_bias, sums)``, ``grad_act`` = input gradient x gelu'(.), and ``sums``
    ``[N, 2, C]`` (float64) its per-sample channel sums and those of it times ``act_x`` -- the first
    pass of the GroupNorm+GELU backward, made as the input gradient is written
    (`moelab.diffusion.fused_norm.norm_act_backward` takes them as ``sums``; the norm's affine form
    is the one its kernels compute). ``mask``: the weight and bias gradients wanted. Why: one read
    of the input gradient and one of ``act_x`` less, and no write of the gradient between the two.
    Only where `supports` holds, ``act_x`` like ``x``."""
    n, c, h, w = x.shape
    if act_x.shape != x.shape or act_x.dtype != x.dtype or not nhwc_contiguous(act_x):
        raise ValueError(f"act_x: expected a channels-last {x.dtype} tensor shaped {tuple(x.shape)}")
    if groups < 1 or c % groups or mean.shape != (n, groups) or rstd.shape != (n, groups):
        raise ValueError(f"mean and rstd: expected [{n}, groups] with groups dividing {c}, got {tuple(mean.shape)} and {tuple(rstd.shape)}")
    grad = grad.contiguous(memory_format=torch.channels_last)
    mean, rstd = (t.detach().to(torch.float32).contiguous() for t in (mean, rstd))
    gamma, beta = float_vector(gamma, c), float_vector(beta, c)
    gx = torch.empty_like(x, memory_format=torch.channels_last)
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if mask[0] else None
    gb = x.new_empty(c) if mask[1] else None
    sums = torch.empty(n, 2, c, dtype=torch.float64)
    _call(grad, x, weight, None, gx, gw, gb, None, (act_x, mean, rstd, gamma, beta, groups, sums))
    return gx, gw, gb, sums
