"""GroupNorm fused with exact GELU on channels-last CPU tensors: a C kernel built at first use.

Why: MoEFsDiC's experts run ``gelu(gn(.))`` and ``gelu(gn(.) + x) * w`` on channels-last
activations, and on the CPU those ops are memory-bound passes that k = 2 runs twice per sample.
PyTorch's channels-last GroupNorm backward is 2-4x slower than its NCHW kernel (1.5 vs 0.8 ms at
2x128x64x64, 3.4 vs 0.8 ms at 4x256x32x32 on a 2-core Xeon, one thread), and the norm, the GELU,
the residual add and the routing weight each take their own pass. ``fused_norm.c`` does each
norm-and-activation in two passes along the channel axis (statistics, then output; in backward:
gradient sums, then input gradient), with GELU's derivative, the residual's gradient and the
routing weight's gradient folded in: 1.6x faster forward and 2-6x faster backward than the
PyTorch ops it replaces, measured alone.

It computes the same function as ``gelu(F.group_norm(...))`` to float rounding, not to the bit:
statistics and sums accumulate in double (error against a float64 reference below PyTorch's own
float32 kernels), erf is Abramowitz & Stegun's 7.1.26 (|error| < 1.5e-7, the formula PyTorch's
vectorised CPU erf uses). So the lean backward (`moelab.diffusion.lean_backward`), its only
caller, equals the composed ops to rounding while it runs.

It is compiled at first use and cached by `moelab.diffusion.kernels`, which also holds the switch
(``MOELAB_CPU_KERNELS=0`` or `moelab.diffusion.kernels.set_enabled` (False) turns it off, and the
lean backward is then bit-identical to the composed ops, as its tests check). Without a C
compiler everything falls back to PyTorch's kernels, with one warning.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from moelab.diffusion import kernels
from moelab.diffusion.kernels import float_vector, nhwc_contiguous, ptr, sample_rows

#: ``y = gn(x)``
NORM = 0
#: ``y = gelu(gn(x))``
NORM_GELU = 1
#: ``y = gelu(gn(x) + res) * rows_weight[n]`` (a residual expert's tail with its routing weight)
NORM_ADD_GELU_SCALE = 2


def _library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or None where it cannot be built here."""
    return kernels.load("fused_norm", "GroupNorm+GELU", _declare)


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.moelab_gn_act_forward.argtypes = [p, p, p, i64, i64, i64, i64, f32, i32, p, p, p, p, p, i32, p, i32]
    lib.moelab_gn_act_forward.restype = i32
    lib.moelab_gn_act_backward.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i32, p, p, p, p, p, p, p, p, p, p, i32]
    lib.moelab_gn_act_backward.restype = i32


def supports(x: Tensor, groups: int, *others: Tensor) -> bool:
    """Whether the fused kernels run ``x`` (and the same-shaped ``others``): enabled, float32 on the
    CPU, channels-last, channels divisible by ``groups``, no autocast, and the kernel built here."""
    if not kernels.takes(x) or x.shape[1] % groups:
        return False
    if any(o.shape != x.shape or o.dtype != x.dtype or o.device != x.device or not nhwc_contiguous(o) for o in others):
        return False
    return _library() is not None


def norm_act(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float, mode: int,
    res: Tensor | None = None, rows_weight: Tensor | None = None, stats: tuple[Tensor, Tensor] | None = None,
    out: Tensor | None = None, out_rows: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, rstd)`` for ``mode`` (`NORM`, `NORM_GELU`, `NORM_ADD_GELU_SCALE`): ``mean`` and
    ``rstd`` ``[N, groups]`` as `torch.native_group_norm` returns them. ``stats``: ``(mean, rstd)``
    of an earlier call on the same ``x``, used instead of a statistics pass (backward's
    recomputation). ``out`` and ``out_rows`` (`NORM_ADD_GELU_SCALE` only): add sample ``i``'s result
    to ``out[out_rows[i]]`` of a contiguous ``[*, H, W, C]`` tensor (grouped dispatch's sum over
    experts), which is then ``y``. No autograd: the caller's Function keeps what backward needs. Only
    for inputs `supports` accepts."""
    n, c, h, w = x.shape
    if mode == NORM_ADD_GELU_SCALE and (res is None or rows_weight is None):
        raise ValueError("NORM_ADD_GELU_SCALE needs res and rows_weight")
    if (out is None) != (out_rows is None) or (out is not None and mode != NORM_ADD_GELU_SCALE):
        raise ValueError("out and out_rows go together, and only with NORM_ADD_GELU_SCALE")
    lib = _library()
    if out_rows is not None:
        out_rows = sample_rows(out, out_rows, n, h, w, c)
    else:
        out = torch.empty_like(x)
    if stats is None:
        mean, rstd = x.new_empty(n, groups), x.new_empty(n, groups)
    else:
        mean, rstd = (t.contiguous() for t in stats)
    weight, bias, rows_weight = float_vector(weight, c), float_vector(bias, c), float_vector(rows_weight, n)
    rc = lib.moelab_gn_act_forward(
        ptr(x), ptr(weight), ptr(bias), n, h * w, c, groups, eps, mode,
        ptr(res if mode == NORM_ADD_GELU_SCALE else None), ptr(rows_weight if mode == NORM_ADD_GELU_SCALE else None),
        ptr(out), ptr(mean), ptr(rstd), int(stats is not None), ptr(out_rows), torch.get_num_threads(),
    )
    if rc:
        raise MemoryError("fused GroupNorm: out of memory for its per-channel buffers")
    return out, mean, rstd


def norm_act_backward(
    grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int,
    mode: int, res: Tensor | None = None, rows_weight: Tensor | None = None,
    need_weight: bool = True, need_bias: bool = True, need_dx_sum: bool = False, grad_rows: Tensor | None = None,
    sums: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of `norm_act` at ``grad``: ``(dx, dweight, dbias, dres, drows_weight, dx_sum)``;
    ``dweight``/``dbias`` None where not asked for or where there is no weight/bias; ``dres`` and
    ``drows_weight`` only for `NORM_ADD_GELU_SCALE` (``dres`` is the gradient at ``gn(x) + res``,
    which is also the residual's); ``dx_sum`` (``need_dx_sum``) ``dx`` summed over samples and
    pixels, ``[C]``: the bias gradient of the 1x1 conv that produced ``x``, taken while ``dx`` is
    written instead of in another pass over it. ``grad_rows``: ``grad`` is a contiguous ``[*, H, W, C]``
    tensor and sample ``i``'s gradient is ``grad[grad_rows[i]]`` (`norm_act`'s ``out_rows``).
    ``sums`` (`NORM_GELU` only): ``grad`` was already taken through the GELU, with these per-sample
    sums ``[N, 2, C]`` (float64: of it, and of it times ``x``), by
    `moelab.diffusion.depthwise.backward_through_gelu`; ``dx`` is then written over ``grad``."""
    n, c, h, w = x.shape
    if grad_rows is not None:
        grad_rows = sample_rows(grad, grad_rows, n, h, w, c)
    else:
        grad = grad.contiguous(memory_format=torch.channels_last)
    lib = _library()
    if sums is not None:
        if mode != NORM_GELU or tuple(sums.shape) != (n, 2, c) or sums.dtype != torch.float64 or not sums.is_contiguous():
            raise ValueError(f"sums: NORM_GELU only, a contiguous float64 [{n}, 2, {c}] tensor")
        if grad.shape != x.shape or grad.dtype != x.dtype or not nhwc_contiguous(grad):
            raise ValueError("with sums, grad must be a channels-last float32 tensor shaped like x (dx is written over it)")
        dx = grad
    else:
        dx = torch.empty_like(x)
    dweight = x.new_empty(c) if need_weight and weight is not None else None
    dbias = x.new_empty(c) if need_bias and bias is not None else None
    tail = mode == NORM_ADD_GELU_SCALE
    dres = torch.empty_like(x) if tail else None
    drows = x.new_empty(n) if tail else None
    dx_sum = x.new_empty(c) if need_dx_sum else None
    weight, bias, rows_weight = float_vector(weight, c), float_vector(bias, c), float_vector(rows_weight, n)
    mean, rstd = mean.contiguous(), rstd.contiguous()  # named: a temporary would be freed before the call
    rc = lib.moelab_gn_act_backward(
        ptr(grad), ptr(x), ptr(mean), ptr(rstd), ptr(weight), ptr(bias),
        n, h * w, c, groups, mode, ptr(res if tail else None), ptr(rows_weight if tail else None),
        ptr(dx), ptr(dweight), ptr(dbias), ptr(dres), ptr(drows), ptr(dx_sum), ptr(grad_rows), ptr(sums),
        torch.get_num_threads(),
    )
    if rc:
        raise MemoryError("fused GroupNorm backward: out of memory for its per-channel buffers")
    return dx, dweight, dbias, dres, drows, dx_sum
