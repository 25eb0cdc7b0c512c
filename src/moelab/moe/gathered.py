"""Gathered-weight kernels: every unit is computed with its own expert's weights in one call.

Expert parameters are stored stacked (``[E, ...]``); for a vector of expert ids ``idx`` (one per
unit) the weights are gathered (cheap: weights are small next to activations) and the whole batch
runs through a single grouped convolution / batched matmul. This is what makes per-sample routing
of conv experts cost about as much as running k experts densely: no sorting of activations, no
per-expert small batches, no Python loop over samples or experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gathered_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    idx: Tensor,
    padding: int = 0,
    dilation: int = 1,
    depthwise: bool = False,
) -> Tensor:
    """Conv2d where unit n uses ``weight[idx[n]]``.

    ``weight``: ``[E, C_out, C_in/groups, kh, kw]`` (``depthwise``: ``[E, C, 1, kh, kw]``);
    ``bias``: ``[E, C_out]`` or None. Implemented as one grouped conv over the batch folded into
    channels.
    """
    n, c, h, w = x.shape
    wg = weight.index_select(0, idx)
    c_out = wg.shape[1]
    wg = wg.reshape(n * c_out, *wg.shape[2:])
    bg = None if bias is None else bias.index_select(0, idx).reshape(n * c_out)
    groups = n * c if depthwise else n
    y = F.conv2d(x.reshape(1, n * c, h, w), wg, bg, padding=padding, dilation=dilation, groups=groups)
    return y.view(n, c_out, y.shape[-2], y.shape[-1])


def gathered_pointwise(x: Tensor, weight: Tensor, bias: Tensor | None, idx: Tensor) -> Tensor:
    """1x1 conv where unit n uses ``weight[idx[n]]`` (``[E, C_out, C_in]``), as one batched matmul."""
    n, c, h, w = x.shape
    wg = weight.index_select(0, idx)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        # channels-last: [N, H*W, C] rows are a view; the output stays channels-last
        rows = x.permute(0, 2, 3, 1).reshape(n, h * w, c)
        if bias is None:
            yr = torch.bmm(rows, wg.transpose(1, 2))
        else:
            yr = torch.baddbmm(bias.index_select(0, idx).unsqueeze(1), rows, wg.transpose(1, 2))
        return yr.view(n, h, w, wg.shape[1]).permute(0, 3, 1, 2)
    flat = x.reshape(n, c, h * w)
    if bias is None:
        y = torch.bmm(wg, flat)
    else:
        y = torch.baddbmm(bias.index_select(0, idx).unsqueeze(-1), wg, flat)
    return y.view(n, wg.shape[1], h, w)


def gathered_group_norm(x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, idx: Tensor, eps: float = 1e-5) -> Tensor:
    """GroupNorm with per-expert affine parameters (``[E, C]``); statistics are per unit as usual."""
    n, c = x.shape[:2]
    y = F.group_norm(
        x.reshape(1, n * c, *x.shape[2:]),
        n * num_groups,
        weight.index_select(0, idx).reshape(n * c),
        bias.index_select(0, idx).reshape(n * c),
        eps,
    )
    return y.view_as(x)


def gathered_linear(x: Tensor, weight: Tensor, bias: Tensor | None, idx: Tensor) -> Tensor:
    """Linear where row n uses ``weight[idx[n]]`` (``[E, out, in]``)."""
    wg = weight.index_select(0, idx)
    y = torch.bmm(wg, x.unsqueeze(-1)).squeeze(-1)
    return y if bias is None else y + bias.index_select(0, idx)
