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
caller, equals the composed ops to rounding while it runs; ``MOELAB_FUSED_NORM=0`` or
`set_enabled` (False) turns it off, and the lean backward is then bit-identical to the composed
ops, as its tests check.

The kernel is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) with
``-O3 -march=native`` (OpenMP where the compiler has it, sharing PyTorch's OpenMP runtime and
thread count) into ``$MOELAB_CACHE/kernels`` (default ``~/.cache/moelab/kernels``), keyed by the
source, the flags and this CPU's model and instruction-set flags, so that a shared home directory
never hands one machine's binary to another CPU. Written to a temporary name and renamed: ranks
that build at once never load a half-written file. Without a compiler (or on a platform other
than POSIX) everything falls back to PyTorch's kernels, with one warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from moelab.diffusion.convs import autocast_enabled

#: ``y = gn(x)``
NORM = 0
#: ``y = gelu(gn(x))``
NORM_GELU = 1
#: ``y = gelu(gn(x) + res) * rows_weight[n]`` (a residual expert's tail with its routing weight)
NORM_ADD_GELU_SCALE = 2

_SOURCE = Path(__file__).with_name("fused_norm.c")
_enabled = os.environ.get("MOELAB_FUSED_NORM", "1").strip().lower() not in ("0", "false", "no", "off")


def set_enabled(flag: bool) -> bool:
    """Turn the fused kernels on or off for this process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


@contextmanager
def enabled(flag: bool) -> Iterator[None]:
    """``with enabled(False): ...`` runs the block on PyTorch's kernels (and restores the setting)."""
    previous = set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(previous)


def is_enabled() -> bool:
    return _enabled


def _cpu_fingerprint() -> str:
    """This CPU's model name and instruction-set flags (what ``-march=native`` compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    keep = [line for line in text.splitlines() if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or (cc if Path(cc).is_file() else None)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cache_dir() -> Path:
    root = os.environ.get("MOELAB_CACHE") or Path.home() / ".cache" / "moelab"
    return Path(root) / "kernels"


def _flag_sets() -> list[list[str]]:
    """Compiler flags to try in turn: this CPU's vector instructions with OpenMP, without OpenMP
    (e.g. Apple's clang), then portable code (a compiler that knows no ``-march=native``)."""
    portable = ["-O3", "-fPIC", "-shared", "-fno-math-errno"]
    native = [*portable, "-march=native"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        native.append("-mprefer-vector-width=512")  # gcc keeps 256-bit vectors on AVX-512 unless told
    return [[*native, "-fopenmp"], [*native, "-fopenmp-simd"], [*portable, "-fopenmp-simd"], portable]


def _build(cc: str, flags: list[str], target: Path) -> str | None:
    """Compile the kernel to ``target`` (atomically); the compiler's complaint, or None when built."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, str(_SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return (proc.stderr or proc.stdout).strip().splitlines()[-1] if (proc.stderr or proc.stdout).strip() else "failed"
        os.replace(tmp, target)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or None where it cannot be built here."""
    if os.name != "posix":
        return None
    cc = _compiler()
    if cc is None:
        warnings.warn("moelab: no C compiler found (set CC); GroupNorm+GELU runs on PyTorch's slower kernels", stacklevel=3)
        return None
    try:
        source = _SOURCE.read_bytes()
    except OSError as e:
        warnings.warn(f"moelab: the fused GroupNorm+GELU kernel's source is missing ({e}); using PyTorch's kernels", stacklevel=3)
        return None
    errors = []
    for flags in _flag_sets():
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), cc.encode(), _cpu_fingerprint().encode()])).hexdigest()[:20]
        for cache in (_cache_dir(), Path(tempfile.gettempdir()) / f"moelab-kernels-{os.getuid()}"):
            target = cache / f"fused_norm-{key}.so"
            try:
                if not target.is_file():
                    err = _build(cc, flags, target)
                    if err is not None:
                        errors.append(f"{' '.join(flags)}: {err}")
                        break  # these flags fail with this compiler; the next cache dir would too
                lib = ctypes.CDLL(str(target))
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(f"{target}: {e}")
                continue
            _declare(lib)
            return lib
    warnings.warn(
        "moelab: could not build the fused GroupNorm+GELU kernel (" + "; ".join(errors)[-400:] + "); using PyTorch's kernels",
        stacklevel=3,
    )
    return None


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.moelab_gn_act_forward.argtypes = [p, p, p, i64, i64, i64, i64, f32, i32, p, p, p, p, p, i32, i32]
    lib.moelab_gn_act_forward.restype = i32
    lib.moelab_gn_act_backward.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i32, p, p, p, p, p, p, p, p, i32]
    lib.moelab_gn_act_backward.restype = i32


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _nhwc_contiguous(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def supports(x: Tensor, groups: int, *others: Tensor) -> bool:
    """Whether the fused kernels run ``x`` (and the same-shaped ``others``): enabled, float32 on the
    CPU, channels-last, channels divisible by ``groups``, no autocast, and the kernel built here."""
    if not _enabled or x.device.type != "cpu" or x.dtype != torch.float32 or not _nhwc_contiguous(x):
        return False
    if torch.compiler.is_compiling():  # a C call through ctypes cannot take fake tensors; inductor fuses its own
        return False
    if x.shape[1] % groups or autocast_enabled("cpu"):
        return False
    if any(o.shape != x.shape or o.dtype != x.dtype or o.device != x.device or not _nhwc_contiguous(o) for o in others):
        return False
    return _library() is not None


def _vector(t: Tensor | None, n: int) -> Tensor | None:
    if t is None:
        return None
    t = t.detach().reshape(-1).to(torch.float32).contiguous()
    if t.numel() != n:
        raise ValueError(f"expected {n} values, got {t.numel()}")
    return t


def norm_act(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float, mode: int,
    res: Tensor | None = None, rows_weight: Tensor | None = None, stats: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, rstd)`` for ``mode`` (`NORM`, `NORM_GELU`, `NORM_ADD_GELU_SCALE`): ``mean`` and
    ``rstd`` ``[N, groups]`` as `torch.native_group_norm` returns them. ``stats``: ``(mean, rstd)``
    of an earlier call on the same ``x``, used instead of a statistics pass (backward's
    recomputation). No autograd: the caller's Function keeps what backward needs. Only for inputs
    `supports` accepts."""
    n, c, h, w = x.shape
    if mode == NORM_ADD_GELU_SCALE and (res is None or rows_weight is None):
        raise ValueError("NORM_ADD_GELU_SCALE needs res and rows_weight")
    lib = _library()
    out = torch.empty_like(x)
    if stats is None:
        mean, rstd = x.new_empty(n, groups), x.new_empty(n, groups)
    else:
        mean, rstd = (t.contiguous() for t in stats)
    weight, bias, rows_weight = _vector(weight, c), _vector(bias, c), _vector(rows_weight, n)
    rc = lib.moelab_gn_act_forward(
        _ptr(x), _ptr(weight), _ptr(bias), n, h * w, c, groups, eps, mode,
        _ptr(res if mode == NORM_ADD_GELU_SCALE else None), _ptr(rows_weight if mode == NORM_ADD_GELU_SCALE else None),
        _ptr(out), _ptr(mean), _ptr(rstd), int(stats is not None), torch.get_num_threads(),
    )
    if rc:
        raise MemoryError("fused GroupNorm: out of memory for its per-channel buffers")
    return out, mean, rstd


def norm_act_backward(
    grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int,
    mode: int, res: Tensor | None = None, rows_weight: Tensor | None = None,
    need_weight: bool = True, need_bias: bool = True, need_dx_sum: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of `norm_act` at ``grad``: ``(dx, dweight, dbias, dres, drows_weight, dx_sum)``;
    ``dweight``/``dbias`` None where not asked for or where there is no weight/bias; ``dres`` and
    ``drows_weight`` only for `NORM_ADD_GELU_SCALE` (``dres`` is the gradient at ``gn(x) + res``,
    which is also the residual's); ``dx_sum`` (``need_dx_sum``) ``dx`` summed over samples and
    pixels, ``[C]``: the bias gradient of the 1x1 conv that produced ``x``, taken while ``dx`` is
    written instead of in another pass over it."""
    n, c, h, w = x.shape
    grad = grad.contiguous(memory_format=torch.channels_last)
    lib = _library()
    dx = torch.empty_like(x)
    dweight = x.new_empty(c) if need_weight and weight is not None else None
    dbias = x.new_empty(c) if need_bias and bias is not None else None
    tail = mode == NORM_ADD_GELU_SCALE
    dres = torch.empty_like(x) if tail else None
    drows = x.new_empty(n) if tail else None
    dx_sum = x.new_empty(c) if need_dx_sum else None
    weight, bias, rows_weight = _vector(weight, c), _vector(bias, c), _vector(rows_weight, n)
    mean, rstd = mean.contiguous(), rstd.contiguous()  # named: a temporary would be freed before the call
    rc = lib.moelab_gn_act_backward(
        _ptr(grad), _ptr(x), _ptr(mean), _ptr(rstd), _ptr(weight), _ptr(bias),
        n, h * w, c, groups, mode, _ptr(res if tail else None), _ptr(rows_weight if tail else None),
        _ptr(dx), _ptr(dweight), _ptr(dbias), _ptr(dres), _ptr(drows), _ptr(dx_sum), torch.get_num_threads(),
    )
    if rc:
        raise MemoryError("fused GroupNorm backward: out of memory for its per-channel buffers")
    return dx, dweight, dbias, dres, drows, dx_sum
