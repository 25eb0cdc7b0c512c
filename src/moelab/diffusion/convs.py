"""MoEFsDiC's convolution primitives: GroupNorm group sizes, the channels-last pointwise (1x1)
conv computed as one GEMM, its concat-free form for skip merges, and the depthwise-separable conv.

Speed on CPU comes from the memory layout: MoEFsDiC runs channels-last (``[N, H, W, C]`` in
memory), where oneDNN's depthwise convs are about twice as fast as on NCHW and a pointwise conv is
one GEMM over ``N*H*W`` rows (`pointwise_conv`) instead of PyTorch's slow 1x1-conv path, whose
backward dominated the step. The layout never changes what is computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


#: Fewest channels per GroupNorm group in MoEFsDiC. With one channel per group, GroupNorm is an
#: instance norm and erases the per-channel time/class bias the blocks add to their input. On
#: configs/digits.yaml (32 channels), 8 channels per group plus a full stem conv took the model from
#: Fréchet 7.44 / accuracy 0.993 to 4.71 / 0.999 (`moelab diffusion compare`, seed 0, guidance 2).
MIN_GROUP_SIZE = 8


def norm_groups(channels: int, max_groups: int = 32, min_size: int = MIN_GROUP_SIZE) -> int:
    """Largest group count <= max_groups dividing ``channels`` with >= ``min_size`` channels each."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0 and (channels // g >= min_size or g == 1))


def is_channels_last(x: Tensor) -> bool:
    """True when ``x`` is a 4-d tensor laid out ``[N, H, W, C]`` in memory (and not also NCHW-contiguous)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False where autocast does not exist, e.g. meta)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


#: oneDNN built into this torch (`pointwise_forward` calls its convolution op directly).
_ONEDNN = torch.backends.mkldnn.is_available()


def _onednn_applies(x: Tensor, w2: Tensor) -> bool:
    """Whether oneDNN's convolution op can take this 1x1 conv: a channels-last float32 CPU input,
    oneDNN built in, and not under ``torch.compile`` (whose fake tensors the op refuses)."""
    float32 = x.dtype == torch.float32 and w2.dtype == torch.float32
    onednn = _ONEDNN and not torch.compiler.is_compiling()
    return x.device.type == "cpu" and float32 and onednn and is_channels_last(x)


def pointwise_forward(x: Tensor, w2: Tensor, bias: Tensor | None) -> Tensor:
    """``F.conv2d(x, w2[:, :, None, None], bias)`` without autograd, on CPU always by oneDNN.

    Why: for a channels-last float32 input of few images (each expert's share of a batch), PyTorch
    sends a 1x1 convolution to its THNN kernel (``_slow_conv2d_forward``), which copies the bias
    into the output and then runs a GEMM: at 128 channels, 64x64, 1 thread, 3.4 ms for 2 images and
    10.0 ms for 8, against 1.7 and 6.9 ms for oneDNN's convolution on the same tensors
    (``aten.mkldnn_convolution``), which adds the bias in its kernel; elsewhere the two were level.
    The pointwise forwards were 15% of MoEFsDiC's 64x64 training step. Same values up to float
    summation order (bit-identical at 64 and 128 channels here). Falls back to ``F.conv2d`` where
    oneDNN is not built in, the input is not a channels-last float32 CPU tensor, or under
    ``torch.compile`` (whose fake tensors the oneDNN op refuses; inductor picks its own kernel).
    """
    w4 = w2[:, :, None, None]
    if _onednn_applies(x, w2):
        return torch.ops.aten.mkldnn_convolution(x, w4, bias, [0, 0], [1, 1], [1, 1], 1)
    return F.conv2d(x, w4, bias)


class _PointwiseRows(torch.autograd.Function):
    """Channels-last 1x1 conv on CPU: oneDNN's convolution forward, `pointwise_rows_backward` backward.

    Why both: forward, oneDNN adds the bias inside its kernel, where ``addmm`` (``F.linear``) first
    copies the broadcast bias into the whole output and then accumulates the GEMM on it -- one more
    pass over every output (with the in-place expert weighting of grouped dispatch, a MoEFsDiC
    guided sampling step at 32x32, 64 rows, 1 thread: 455-462 -> 424-435 ms). Backward, PyTorch's
    1x1-conv kernels were the slowest op of the training step, so the gradients are computed as
    ``F.linear``'s backward would, from the same saved tensors (the input and the weight): the
    weight gradient as a GEMM, the input gradient as a 1x1 convolution with the transposed weight
    (`pointwise_rows_backward`).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, w2: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w2)
        ctx.has_bias = bias is not None  # type: ignore[attr-defined]
        return pointwise_forward(x, w2, bias)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        x, w2 = ctx.saved_tensors  # type: ignore[attr-defined]
        need = ctx.needs_input_grad
        return pointwise_rows_backward(grad, x, w2, need[0], need[1], ctx.has_bias and need[2])  # type: ignore[attr-defined]


#: `pointwise_rows_backward` computes the input gradient by oneDNN's convolution where neither channel
#: count exceeds this. Measured on a 2-core AMD EPYC (AVX-512, 1 thread, torch 2.13): oneDNN's 1x1
#: convolution against MKL's ``mm`` on the same rows, the weight's transposed copy included, was
#: 15-25% faster at 128 channels, 8-17% at 256, 2-9% at 512 and 10-20% slower at 1024 (few rows,
#: where the 4 MB weight copy shows); MoEFsDiC's 64x64 training step ran 3% faster (one process,
#: toggled every step, 6 rounds: 2675 vs 2815 ms).
ONEDNN_INPUT_GRAD_MAX_CHANNELS = 512


def _onednn_input_grad(grad: Tensor, w2: Tensor) -> bool:
    return max(w2.shape) <= ONEDNN_INPUT_GRAD_MAX_CHANNELS and _onednn_applies(grad, w2)


def pointwise_rows_backward(
    grad: Tensor, x: Tensor, w2: Tensor, input_grad: bool = True, weight_grad: bool = True, bias_grad: bool = True
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of a 1x1 conv ``y = conv(x, w2[:, :, None, None], b)`` over the pixel rows:
    ``(grad_x, grad_w2, grad_b)``, each None where not asked for. ``grad_w2`` is one GEMM (views,
    no copies, when ``grad`` and ``x`` are channels-last); ``grad_x`` is oneDNN's 1x1 convolution of
    ``grad`` with the transposed weight on channels-last float32 CPU input of at most
    `ONEDNN_INPUT_GRAD_MAX_CHANNELS` channels (faster there), else a GEMM. Equal up to float
    summation order either way."""
    c_in = w2.shape[1]
    rows = grad.permute(0, 2, 3, 1).reshape(-1, w2.shape[0])  # a view when grad is channels-last
    gx = pointwise_input_grad(grad, w2) if input_grad else None
    gw = torch.mm(rows.t(), x.permute(0, 2, 3, 1).reshape(-1, c_in)) if weight_grad else None
    gb = rows.sum(0) if bias_grad else None
    return gx, gw, gb


def pointwise_input_grad(grad: Tensor, w2: Tensor) -> Tensor:
    """The input gradient of a 1x1 conv with weight ``w2`` ``[C_out, C_in]`` (`pointwise_rows_backward`'s
    first output), which needs no input: a caller that has taken the weight gradient can free the
    input first."""
    if _onednn_input_grad(grad, w2):
        # the input gradient is itself a 1x1 conv, of ``grad`` with the transposed weight
        return pointwise_forward(grad, w2.t().contiguous(), None)
    n, _, h, w = grad.shape
    rows = grad.permute(0, 2, 3, 1).reshape(-1, w2.shape[0])  # a view when grad is channels-last
    return torch.mm(rows, w2).view(n, h, w, w2.shape[1]).permute(0, 3, 1, 2)


def pointwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """1x1 conv with ``weight`` ``[C_out, C_in]`` (or ``[C_out, C_in, 1, 1]``), exactly ``F.conv2d``.

    On a channels-last input the output is channels-last too and the work is GEMMs over the
    ``N*H*W`` pixel rows (views, no copies): on CPU `_PointwiseRows` (oneDNN forward with the bias
    fused, GEMM backward), elsewhere and under autocast ``F.linear`` (one GEMM with a bias
    epilogue on GPUs). Forward+backward this is 1.3-2x faster on CPU than PyTorch's 1x1-conv path.
    On other layouts it is ``F.conv2d``.
    """
    w2 = weight.reshape(weight.shape[0], -1)
    if is_channels_last(x):
        if x.device.type == "cpu" and not autocast_enabled("cpu"):
            return _PointwiseRows.apply(x, w2, bias)
        return F.linear(x.permute(0, 2, 3, 1), w2, bias).permute(0, 3, 1, 2)
    return F.conv2d(x, w2[:, :, None, None], bias)


def pointwise_conv_concat(xs: list[Tensor], weight: Tensor, bias: Tensor | None) -> Tensor:
    """``pointwise_conv(torch.cat(xs, dim=1), weight, bias)`` without building the concatenation.

    A 1x1 conv of a channel concatenation is the sum of 1x1 convs of the parts with the matching
    column blocks of ``weight``: on channels-last inputs one GEMM per part accumulating into the
    same output (``addmm``). Why: concatenating channels-last tensors along channels is a strided
    interleave that PyTorch's CPU ``cat`` runs slowly (~100 ms for the 64x64 decoder skip at batch 8,
    9% of MoEFsDiC's training step), and its output is one more activation kept for backward.
    On the CPU (no autocast) the whole merge is one autograd Function, `_PointwiseConcatRows`
    (its backward: 2.9% of the 64x64 step). Equal to the concatenated form up to float summation
    order.
    """
    if not all(is_channels_last(x) for x in xs):
        return pointwise_conv(torch.cat(xs, dim=1), weight, bias)
    w2 = weight.reshape(weight.shape[0], -1)
    if sum(x.shape[1] for x in xs) != w2.shape[1]:
        raise ValueError(f"pointwise_conv_concat: inputs have {sum(x.shape[1] for x in xs)} channels, weight expects {w2.shape[1]}")
    n, _, h, w = xs[0].shape
    c0 = xs[0].shape[1]
    autocast = autocast_enabled(xs[0].device.type)  # autocast casts addmm's inputs, never addmm_'s
    if xs[0].device.type == "cpu" and not autocast:
        return _PointwiseConcatRows.apply(w2, bias, *xs)
    # the first part with the bias (`pointwise_conv`), the others accumulated into its output in
    # place: nothing in backward reads a GEMM's output, so autograd allows it, and it spares a copy
    # of the output per part
    out = pointwise_conv(xs[0], w2[:, :c0], bias).permute(0, 2, 3, 1).reshape(-1, w2.shape[0])  # a view
    return _add_parts(out, xs, w2, in_place=not autocast).view(n, h, w, -1).permute(0, 3, 1, 2)


def _add_parts(rows: Tensor, xs: list[Tensor] | tuple[Tensor, ...], w2: Tensor, in_place: bool = True) -> Tensor:
    """``rows`` (the first part's 1x1 conv, ``[N*H*W, C_out]``) plus every other part's GEMM with
    its column block of ``w2``: in place (``addmm_``) or, where autocast must cast the inputs, as
    new tensors (``addmm``)."""
    start = xs[0].shape[1]
    for x in xs[1:]:
        c = x.shape[1]
        part_rows = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view: channels-last memory is [N*H*W, C]
        part = w2[:, start : start + c].t()
        rows = rows.addmm_(part_rows, part) if in_place else torch.addmm(rows, part_rows, part)
        start += c
    return rows


class _PointwiseConcatRows(torch.autograd.Function):
    """`pointwise_conv_concat` of channels-last CPU parts: the first part's GEMM with the bias by
    oneDNN (`pointwise_forward`), each other part's accumulated into that output (``addmm_``);
    backward per part by `pointwise_rows_backward`, the weight gradient written block by block.

    Why a Function: composed, autograd records each ``addmm_`` as an in-place op on a view of the
    first GEMM's output, and its backward (``CopySlices``) clones the whole output gradient and
    copies it back, per part (a 16 MB clone and copy per skip merge at 64x64, batch 8); the weight
    slices' gradients come back zero-padded to the full weight and are added up.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, w2: Tensor, bias: Tensor | None, *xs: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(w2, *xs)
        ctx.has_bias = bias is not None  # type: ignore[attr-defined]
        out = pointwise_forward(xs[0], w2[:, : xs[0].shape[1]], bias)
        _add_parts(out.permute(0, 2, 3, 1).reshape(-1, w2.shape[0]), xs, w2)  # into ``out``: the rows are a view of it
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        w2, *xs = ctx.saved_tensors  # type: ignore[attr-defined]
        need = ctx.needs_input_grad
        g_w = torch.empty_like(w2) if need[0] else None
        g_xs: list[Tensor | None] = []
        start = 0
        g_b = None
        for i, x in enumerate(xs):
            c = x.shape[1]
            bias_grad = i == 0 and ctx.has_bias and need[1]  # type: ignore[attr-defined]  # once: the bias is the first part's
            g_x, g_wi, g_bi = pointwise_rows_backward(grad, x, w2[:, start : start + c], need[2 + i], need[0], bias_grad)
            if g_w is not None:
                g_w[:, start : start + c] = g_wi
            g_b = g_bi if i == 0 else g_b
            g_xs.append(g_x)
            start += c
        return (g_w, g_b, *g_xs)


class PointwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(in, out, 1)`` (same parameters, init and state-dict keys) computed by `pointwise_conv`.

    Called with several tensors, it convolves their channel concatenation without building it
    (`pointwise_conv_concat`): the U-Net's skip merges.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: Tensor, *more: Tensor) -> Tensor:
        if more:
            return pointwise_conv_concat([x, *more], self.weight, self.bias)
        return pointwise_conv(x, self.weight, self.bias)


class DepthwiseSeparableConv2d(nn.Module):
    """Depthwise k x k conv (groups=C_in) followed by a pointwise 1x1 conv: ~k^2 fewer MACs."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1) -> None:
        super().__init__()
        pad = dilation * (kernel_size - 1) // 2
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel_size, padding=pad, dilation=dilation, groups=in_channels)
        self.pointwise = PointwiseConv2d(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))
