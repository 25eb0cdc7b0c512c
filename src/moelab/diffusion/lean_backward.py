"""MoEFsDiC's ops that keep for backward only what is expensive to recompute.

The depthwise-separable residual expert, as one autograd Function (`lean_ds_expert`). Composed
from autograd ops, an expert ``gelu(gn2(ds2(gelu(gn1(ds1(x))))) + x) * w`` keeps nine
activation-sized tensors per routed sample for backward -- its gathered input rows, both depthwise
outputs, both pointwise outputs, the first norm output, the first GELU output, the pre-GELU sum and
the expert's output (for the routing weight's gradient). With k = 2 that is eighteen per sample
and block: MoEFsDiC's saved activations were 3.4x the dense U-Net's at 64x64 (1,571 vs 459 MB,
counted with saved-tensor hooks). The Function keeps only the two pointwise (GEMM) outputs and
the norms' statistics; the gathered rows are re-gathered from the block input (kept once per
block, not per expert) and the depthwise convs, norms and GELUs -- memory-bound passes -- are
recomputed in backward. The pointwise GEMMs, the step's largest cost, are never recomputed (full
checkpointing, ``train.gradient_checkpointing``, recomputes them too). 1,571 -> 731 MB at 64x64.

The upsampling conv (`upsample_ds_conv`): nearest x2, depthwise, pointwise, keeping only its
input -- not the 4x larger upsampled map nor the depthwise output (at 64x64 the latter alone was 32 MB
of the decoder's first level) -- and redoing the upsampling (a copy) and the depthwise conv in
backward; on layouts where the pointwise conv is not `moelab.diffusion.convs`' GEMM form, only the
depthwise half (`_UpsampleDepthwise`). The output head (`norm_act_conv`), ``conv(gelu(gn(h)))``: it
keeps ``h`` and the norm statistics, not the norm's and the GELU's outputs (32 MB at 64x64).

The router's global average pool (`spatial_mean`) keeps nothing and hands back its gradient as an
expanded view: autograd's mean materialises the full-size gradient (NCHW, whatever the input's
layout) and adding it to the channels-last gradient the experts return is a mixed-layout add,
~13 ms per MoE block at 64x64 (against ~1 ms for a broadcast add).

On channels-last float32 CPU tensors the expert's and the head's norm-and-GELU steps run on
`moelab.diffusion.fused_norm`'s compiled kernels (one pass for ``gelu(gn(.))``, one for the tail
``gelu(gn(.) + x) * w``, and their gradients; the first norm's output is no longer kept between
backward's recompute and its use): the 64x64 training step 7-8% shorter on a 2-core Xeon. The
3x3 depthwise convs' gradients run on `moelab.diffusion.depthwise`'s kernel (input, weight and bias
gradients in one pass; the expert's residual gradient added as the input gradient is written):
1-1.7% shorter again (Xeon VM, one and two threads). Under grouped dispatch the expert adds its
output into the layer output and its input gradient into the gather's, inside the kernels (no
per-call output or input-gradient tensor, no copy of its rows of the output gradient: 4% of the
step), and the second depthwise conv's input gradient is taken on through the first GELU and the
first norm's statistics pass as the kernel writes it (0.5%). Values and gradients are then those of the composed ops to float rounding (as
close to a float64 run as PyTorch's kernels are: the tests at the end of
``tests/test_diffusion_lean_backward.py``). With those kernels off (``MOELAB_CPU_KERNELS=0``,
`moelab.diffusion.kernels.set_enabled`, or no C compiler) they are the composed ops' to the bit: every backward is the aten kernel autograd would call
(``convolution_backward``, ``native_group_norm_backward``, ``gelu_backward``,
``upsample_nearest2d_backward`` and the pointwise GEMMs of `moelab.diffusion.convs`) on
bit-identical recomputed inputs (``tests/test_diffusion_lean_backward.py`` checks with
``torch.equal``). Their backwards are not themselves differentiable (``once_differentiable``:
double backward raises instead of silently dropping terms). ``train.lean_backward: false``
switches the expert, the upsampling conv and the head back to composed ops (the pooling, a pure
gain, stays).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from moelab.diffusion import depthwise, fused_norm
from moelab.diffusion.activations import gelu, gelu_, gelu_backward
from moelab.diffusion.convs import autocast_enabled, is_channels_last, pointwise_forward, pointwise_input_grad, pointwise_rows_backward
from moelab.moe.dispatch import Regather, broadcast_rows

_aten = torch.ops.aten
GN_EPS = 1e-5  # F.group_norm's default, what the composed expert uses


def _gn(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float = GN_EPS) -> tuple[Tensor, Tensor, Tensor]:
    n, c = x.shape[:2]
    return _aten.native_group_norm(x, weight, bias, n, c, x.numel() // max(n * c, 1), groups, eps)


def _gn_backward(
    grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, groups: int, mask: list[bool]
) -> tuple[Tensor | None, ...]:
    n, c = x.shape[:2]
    return _aten.native_group_norm_backward(grad, x, mean, rstd, weight, n, c, x.numel() // max(n * c, 1), groups, mask)


class _LeanDSExpert(torch.autograd.Function):
    """``gelu(gn2(pw2(dw2(gelu(gn1(pw1(dw1(x))))))) + x) * w`` with the recompute-in-backward above.

    ``x`` is the expert's input rows (channels-last ``[n, C, H, W]``); ``regather``
    (`moelab.moe.dispatch.Regather`) re-selects an equal tensor from the block input in backward,
    so ``x`` itself is not kept; the block input and the row indices are saved tensors, released
    once backward has used them. ``w``: ``[n]`` routing weights. Parameters: one expert's slices.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, w: Tensor, regather: Regather, groups: int, pad: int,
        dw1w: Tensor, dw1b: Tensor, pw1w: Tensor, pw1b: Tensor, n1w: Tensor, n1b: Tensor,
        dw2w: Tensor, dw2b: Tensor, pw2w: Tensor, pw2b: Tensor, n2w: Tensor, n2b: Tensor, into: Tensor | None,
    ) -> Tensor:
        # elementwise steps in place: their inputs are not kept, and every temporary activation
        # of the last full-resolution block's forward adds to the training step's memory peak
        c = x.shape[1]
        b1 = pointwise_forward(F.conv2d(x, dw1w, dw1b, padding=pad, groups=c), pw1w, pw1b)
        fused = fused_norm.supports(b1, groups, x)
        if fused:
            d1, m1, r1 = fused_norm.norm_act(b1, n1w, n1b, groups, GN_EPS, fused_norm.NORM_GELU)
        else:
            d1, m1, r1 = _gn(b1, n1w, n1b, groups)
            gelu_(d1)
        a2 = F.conv2d(d1, dw2w, dw2b, padding=pad, groups=c)
        del d1
        b2 = pointwise_forward(a2, pw2w, pw2b)
        del a2
        idx = regather.idx
        if fused:
            kw = {} if into is None else {"out": into, "out_rows": idx}  # added into grouped dispatch's output
            out, m2, r2 = fused_norm.norm_act(
                b2, n2w, n2b, groups, GN_EPS, fused_norm.NORM_ADD_GELU_SCALE, res=x, rows_weight=w, **kw
            )
        else:
            out, m2, r2 = _gn(b2, n2w, n2b, groups)
            gelu_(out.add_(x))
            out.mul_(broadcast_rows(w, out))
            if into is not None:  # what grouped dispatch's row-add would do (`_AddRows`)
                out = into.index_add_(0, idx, out.permute(0, 2, 3, 1))
        ctx.save_for_backward(
            w, b1, m1, r1, b2, m2, r2, dw1w, dw1b, pw1w, n1w, n1b, dw2w, dw2b, pw2w, n2w, n2b, regather.src, idx
        )
        ctx.back, ctx.groups, ctx.pad, ctx.fused, ctx.into = regather.back, groups, pad, fused, into is not None
        # the input rows' gradient goes to grouped dispatch's sink where the kernels add it in place
        ctx.sink = regather.sink if fused and into is not None else None
        if into is not None:
            ctx.mark_dirty(into)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        # Ordered for the fewest activation-sized tensors alive at once (the backward of the
        # first full-resolution MoE block is near the training step's memory peak): each GEMM's
        # input is freed after its weight gradient and before its input gradient is made (it
        # needs none), elementwise steps run in place.
        w, b1, m1, r1, b2, m2, r2, dw1w, dw1b, pw1w, n1w, n1b, dw2w, dw2b, pw2w, n2w, n2b, src, idx = ctx.saved_tensors
        groups, pad = ctx.groups, ctx.pad
        need = ctx.needs_input_grad
        # out = o * w, o = gelu(h2 + x): the composed graph's MulBackward, GeluBackward, AddBackward
        x = Regather.gather(src, idx, ctx.back)
        del src
        c = x.shape[1]
        fused = ctx.fused  # the kernels forward used
        g_into = grad if ctx.into else None  # the layer output's gradient passes through to what was added to
        if ctx.into and not fused:  # this call's rows of it, as `_AddRows` hands them on
            grad = grad.index_select(0, idx).permute(0, 3, 1, 2)
        elif ctx.into:  # the kernel reads this call's rows where they are
            grad = grad.contiguous()
        g_w = None
        g_pw2b = g_pw1b = None  # the pointwise biases' gradients: from the fused kernels, or below
        if fused:
            g_b2, g_n2w, g_n2b, g_s, g_rows, g_pw2b = fused_norm.norm_act_backward(
                grad, b2, m2, r2, n2w, n2b, groups, fused_norm.NORM_ADD_GELU_SCALE,
                res=x.contiguous(memory_format=torch.channels_last), rows_weight=w,
                need_weight=need[15], need_bias=need[16], need_dx_sum=need[14], grad_rows=idx if ctx.into else None,
            )
            if need[1]:
                g_w = g_rows.view(w.shape).to(w.dtype)
            del g_rows
            # pw2(dw2(d1)): recompute d1 (the first norm's output, not kept) and the depthwise output
            d1 = fused_norm.norm_act(b1, n1w, n1b, groups, GN_EPS, fused_norm.NORM_GELU, stats=(m1, r1))[0]
        else:
            s = _gn(b2, n2w, n2b, groups)[0].add_(x)
            if need[1]:
                g_w = gelu(s).mul_(grad).sum_to_size(broadcast_rows(w, grad).shape).view(w.shape).to(w.dtype)
            g_s = grad * broadcast_rows(w, grad)
            gelu_backward(g_s, s, out=g_s)
            del s
            g_b2, g_n2w, g_n2b = _gn_backward(g_s, b2, m2, r2, n2w, groups, [True, need[15], need[16]])
            # pw2(dw2(d1)): recompute d1 and the depthwise output
            h1 = _gn(b1, n1w, n1b, groups)[0]
            d1 = gelu(h1)
        a2 = F.conv2d(d1, dw2w, dw2b, padding=pad, groups=c)
        _, g_pw2w, g_b = pointwise_rows_backward(g_b2, a2, pw2w, False, need[13], need[14] and not fused)
        g_pw2b = g_pw2b if fused else g_b
        del a2
        g_a2 = pointwise_input_grad(g_b2, pw2w)
        del g_b2
        if fused and depthwise.supports(d1, dw2w, pad):
            # the GELU's and the norm's first backward pass made as the depthwise kernel writes its
            # input gradient (`depthwise.backward_through_gelu`), the norm's second pass over it
            g_h1, g_dw2w, g_dw2b, sums = depthwise.backward_through_gelu(
                g_a2, d1, dw2w, [need[11], need[12]], b1, m1, r1, n1w, n1b, groups
            )
            del d1, g_a2
            g_b1, g_n1w, g_n1b, _, _, g_pw1b = fused_norm.norm_act_backward(
                g_h1, b1, m1, r1, n1w, n1b, groups, fused_norm.NORM_GELU, need_weight=need[9], need_bias=need[10],
                need_dx_sum=need[8], sums=sums,
            )
            del g_h1
        else:
            g_d1, g_dw2w, g_dw2b = _depthwise_backward(g_a2, d1, dw2w, True, pad, [True, need[11], need[12]])
            del d1, g_a2
            if fused:
                g_b1, g_n1w, g_n1b, _, _, g_pw1b = fused_norm.norm_act_backward(
                    g_d1, b1, m1, r1, n1w, n1b, groups, fused_norm.NORM_GELU, need_weight=need[9], need_bias=need[10],
                    need_dx_sum=need[8],
                )
                del g_d1
            else:
                g_h1 = gelu_backward(g_d1, h1)
                del h1, g_d1
                g_b1, g_n1w, g_n1b = _gn_backward(g_h1, b1, m1, r1, n1w, groups, [True, need[9], need[10]])
                del g_h1
        a1 = F.conv2d(x, dw1w, dw1b, padding=pad, groups=c)
        _, g_pw1w, g_b = pointwise_rows_backward(g_b1, a1, pw1w, False, need[7], need[8] and not fused)
        g_pw1b = g_pw1b if fused else g_b
        del a1
        g_a1 = pointwise_input_grad(g_b1, pw1w)
        del g_b1
        # the residual's gradient is added to the input gradient as the kernel writes it; with a
        # sink, both are added to grouped dispatch's input gradient at this call's rows
        sink = ctx.sink if need[0] else None
        into = {} if sink is None else {"into": sink.buffer(), "into_rows": idx}
        g_x, g_dw1w, g_dw1b = _depthwise_backward(g_a1, x, dw1w, True, pad, [need[0], need[5], need[6]], add=g_s, **into)
        del x, g_a1
        if sink is not None:
            g_x = None
        return (
            g_x, g_w, None, None, None, g_dw1w, g_dw1b, g_pw1w, g_pw1b, g_n1w, g_n1b, g_dw2w, g_dw2b, g_pw2w, g_pw2b, g_n2w,
            g_n2b, g_into,
        )


def lean_ds_expert(
    x: Tensor, w: Tensor, regather: Regather, groups: int, pad: int, p: dict[str, Tensor], into: Tensor | None = None
) -> Tensor | None:
    """``gelu(gn2(ds2(gelu(gn1(ds1(x))))) + x) * w[:, None, None, None]`` for one expert with
    parameters ``p`` (``dw{i}_weight``/``_bias`` ``[C, 1, k, k]``/``[C]``, ``pw{i}_weight`` ``[C, C]``,
    ``pw{i}_bias``, ``norm{i}_weight``/``_bias``), keeping for backward only the pointwise outputs
    and norm statistics; ``regather`` (`moelab.moe.dispatch.Regather`) re-selects ``x`` from its
    block input, which is saved for backward (once per block) and released after it.

    ``into`` (grouped dispatch's output so far, units-last ``[N, H, W, C]``): the result is added to
    its rows ``regather.idx`` in place (recorded by autograd) and None returned. On the kernels the
    tail writes it there directly, backward reads the output gradient there, and the input
    gradient goes to ``regather.sink`` (`moelab.moe.dispatch.GatherGrad`): per call, no output
    tensor, no copy of the output gradient's rows, no input-gradient tensor to add in another pass."""
    out = _LeanDSExpert.apply(
        x, w, regather, groups, pad,
        p["dw1_weight"], p["dw1_bias"], p["pw1_weight"], p["pw1_bias"], p["norm1_weight"], p["norm1_bias"],
        p["dw2_weight"], p["dw2_bias"], p["pw2_weight"], p["pw2_bias"], p["norm2_weight"], p["norm2_bias"], into,
    )
    return None if into is not None else out


def _depthwise_backward(
    grad: Tensor, x: Tensor, weight: Tensor, has_bias: bool, pad: int, mask: list[bool], add: Tensor | None = None,
    into: Tensor | None = None, into_rows: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(x, weight, bias)`` of the stride-1 depthwise conv ``F.conv2d(x, weight, bias,
    padding=pad, groups=C)``, each None where ``mask`` does not ask for it, ``add`` (if given) added
    to the input gradient: `moelab.diffusion.depthwise`'s kernel where it runs (3x3, channels-last
    float32 CPU), else autograd's. ``into`` and ``into_rows``: the input gradient is added to
    ``into[into_rows]`` (a contiguous ``[*, H, W, C]`` tensor) instead, and ``into`` returned."""
    c = x.shape[1]
    mask = [mask[0], mask[1], has_bias and mask[2]]
    if depthwise.supports(x, weight, pad):
        return depthwise.backward(grad, x, weight, mask, add=add, into=into, into_rows=into_rows)
    g_x, g_w, g_b = _aten.convolution_backward(
        grad, x, weight, [c] if has_bias else None, [1, 1], [pad, pad], [1, 1], False, [0, 0], c, mask
    )
    if add is not None and g_x is not None:
        g_x.add_(add)  # a fresh tensor: added in place
    if into is not None and g_x is not None:
        g_x = into.index_add_(0, into_rows, g_x.permute(0, 2, 3, 1))  # type: ignore[arg-type]
    return g_x, g_w, g_b


def _nearest_x2_backward(grad: Tensor, x: Tensor) -> Tensor:
    """Gradient of ``x`` through ``F.interpolate(x, scale_factor=2, mode="nearest")``: autograd's kernel."""
    n, c, h, w = x.shape
    return _aten.upsample_nearest2d_backward(grad, [2 * h, 2 * w], [n, c, h, w], 2.0, 2.0)


class _UpsampleDepthwise(torch.autograd.Function):
    """``depthwise(nearest_upsample_x2(x))`` keeping only ``x`` (4x smaller than the upsampled map the
    depthwise conv would keep) for backward, where the upsampling -- a copy -- is redone."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, pad: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.pad, ctx.has_bias = pad, bias is not None
        return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=pad, groups=x.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        u = F.interpolate(x, scale_factor=2.0, mode="nearest")
        g_u, g_w, g_b = _depthwise_backward(grad, u, weight, ctx.has_bias, ctx.pad, list(need[:3]))
        del u  # the 4x larger map is not alive while the upsampling's backward runs
        return (_nearest_x2_backward(g_u, x) if need[0] else None), g_w, g_b, None


def _padding(conv: torch.nn.Conv2d) -> int | str:
    """The conv's padding as one number (its height padding; ``"same"``/``"valid"`` as given)."""
    return conv.padding[0] if isinstance(conv.padding, tuple) else conv.padding


def _lean_applies(x: Tensor) -> bool:
    """Whether the lean Functions for the resampling conv and the head apply: autograd records,
    float32, no autocast (under autocast the composed ops' casts decide what is kept)."""
    return torch.is_grad_enabled() and x.dtype == torch.float32 and not autocast_enabled(x.device.type)


class _UpsampleDSConv(torch.autograd.Function):
    """``pointwise(depthwise(nearest_upsample_x2(x)))`` on a channels-last CPU input, keeping only
    ``x`` for backward; the pointwise conv is `moelab.diffusion.convs`' channels-last GEMM form
    (oneDNN forward, `pointwise_rows_backward`), as `PointwiseConv2d` computes it there."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, dw_weight: Tensor, dw_bias: Tensor | None, pw_weight: Tensor, pw_bias: Tensor | None, pad: int
    ) -> Tensor:
        ctx.save_for_backward(x, dw_weight, dw_bias, pw_weight)
        ctx.pad, ctx.has_pw_bias = pad, pw_bias is not None
        u = F.interpolate(x, scale_factor=2.0, mode="nearest")
        a = F.conv2d(u, dw_weight, dw_bias, padding=pad, groups=x.shape[1])
        del u
        return pointwise_forward(a, pw_weight, pw_bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, dw_weight, dw_bias, pw_weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        u = F.interpolate(x, scale_factor=2.0, mode="nearest")
        a = F.conv2d(u, dw_weight, dw_bias, padding=ctx.pad, groups=x.shape[1])
        _, g_pww, g_pwb = pointwise_rows_backward(grad, a, pw_weight, False, need[3], ctx.has_pw_bias and need[4])
        del a
        g_x = g_dww = g_dwb = None
        if any(need[:3]):
            g_a = pointwise_input_grad(grad, pw_weight)
            g_u, g_dww, g_dwb = _depthwise_backward(g_a, u, dw_weight, dw_bias is not None, ctx.pad, list(need[:3]))
            del u, g_a  # neither is alive while the upsampling's backward runs
            if need[0]:
                g_x = _nearest_x2_backward(g_u, x)
        return g_x, g_dww, g_dwb, g_pww, g_pwb, None


def upsample_ds_conv(x: Tensor, depthwise: torch.nn.Conv2d, pointwise: torch.nn.Conv2d) -> Tensor:
    """``pointwise(depthwise(F.interpolate(x, scale_factor=2, mode="nearest")))`` for the
    depthwise-separable upsampling conv (``pointwise`` a `moelab.diffusion.convs.PointwiseConv2d`):
    same values and gradients; under autograd (float32, no autocast) it keeps only ``x`` for
    backward on channels-last CPU input, elsewhere ``x`` and the depthwise output."""
    if not _lean_applies(x):
        return pointwise(depthwise(F.interpolate(x, scale_factor=2.0, mode="nearest")))
    pad = _padding(depthwise)
    if x.device.type == "cpu" and is_channels_last(x) and x.shape[1] > 1:
        w2 = pointwise.weight.reshape(pointwise.weight.shape[0], -1)
        return _UpsampleDSConv.apply(x, depthwise.weight, depthwise.bias, w2, pointwise.bias, pad)
    return pointwise(_UpsampleDepthwise.apply(x, depthwise.weight, depthwise.bias, pad))


class _NormActConv(torch.autograd.Function):
    """``conv(gelu(group_norm(h)))`` keeping ``h`` and the norm's statistics for backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, h: Tensor, norm_weight: Tensor | None, norm_bias: Tensor | None, groups: int, eps: float,
        conv_weight: Tensor, conv_bias: Tensor | None, pad: int,
    ) -> Tensor:
        fused = fused_norm.supports(h, groups)
        if fused:
            d, mean, rstd = fused_norm.norm_act(h, norm_weight, norm_bias, groups, eps, fused_norm.NORM_GELU)
        else:
            z, mean, rstd = _gn(h, norm_weight, norm_bias, groups, eps)
            d = gelu(z)
            del z
        ctx.save_for_backward(h, mean, rstd, norm_weight, norm_bias, conv_weight)
        ctx.groups, ctx.eps, ctx.pad, ctx.has_conv_bias, ctx.fused = groups, eps, pad, conv_bias is not None, fused
        return F.conv2d(d, conv_weight, conv_bias, padding=pad)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        h, mean, rstd, norm_weight, norm_bias, conv_weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        if ctx.fused:
            z, d = None, fused_norm.norm_act(h, norm_weight, norm_bias, ctx.groups, ctx.eps, fused_norm.NORM_GELU, stats=(mean, rstd))[0]
        else:
            z = _gn(h, norm_weight, norm_bias, ctx.groups, ctx.eps)[0]
            d = gelu(z)
        pad, cout = ctx.pad, conv_weight.shape[0]
        g_d, g_cw, g_cb = _aten.convolution_backward(
            grad, d, conv_weight, [cout] if ctx.has_conv_bias else None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1,
            [any(need[:3]), need[5], ctx.has_conv_bias and need[6]],
        )
        del d
        g_h = g_nw = g_nb = None
        if g_d is not None and ctx.fused:
            g_h, g_nw, g_nb = fused_norm.norm_act_backward(
                g_d, h, mean, rstd, norm_weight, norm_bias, ctx.groups, fused_norm.NORM_GELU,
                need_weight=need[1], need_bias=need[2],
            )[:3]
            g_h = g_h if need[0] else None
        elif g_d is not None:
            g_z = gelu_backward(g_d, z)
            del z, g_d
            g_h, g_nw, g_nb = _gn_backward(
                g_z, h, mean, rstd, norm_weight, ctx.groups,
                [need[0], norm_weight is not None and need[1], norm_bias is not None and need[2]],
            )
        return g_h, g_nw, g_nb, None, None, g_cw, g_cb, None


def norm_act_conv(h: Tensor, norm: torch.nn.GroupNorm, conv: torch.nn.Conv2d) -> Tensor:
    """``conv(F.gelu(norm(h)))`` (the output head: GroupNorm, exact GELU, a stride-1 conv with
    ``padding = kernel // 2``): same values and gradients; under autograd (float32, no autocast) it
    keeps ``h`` and the norm statistics for backward instead of the norm's and the GELU's outputs."""
    pad = _padding(conv)
    plain = conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 or isinstance(pad, str)
    if plain or not _lean_applies(h):
        return conv(gelu(norm(h)))
    return _NormActConv.apply(h, norm.weight, norm.bias, norm.num_groups, norm.eps, conv.weight, conv.bias, pad)


class _SpatialMean(torch.autograd.Function):
    """``x.float().mean(dim=(2, 3))`` whose gradient is an expanded view of ``grad / (H*W)``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.shape, ctx.dtype = x.shape, x.dtype
        return x.float().mean(dim=(2, 3))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        h, w = ctx.shape[2:]
        # what autograd's mean does (expand, then divide by the count), dividing before expanding
        return (grad / (h * w)).to(ctx.dtype)[:, :, None, None].expand(ctx.shape)


def spatial_mean(x: Tensor) -> Tensor:
    """``x.float().mean(dim=(2, 3))`` of an ``[N, C, H, W]`` map, ``[N, C]`` float32: the same values
    and gradient, the gradient handed back as a broadcast view (no full-size tensor, no
    mixed-layout add where it meets the channels-last gradient of the same input)."""
    return _SpatialMean.apply(x)
