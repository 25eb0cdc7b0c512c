"""moelab's compiled CPU kernels: building them at first use, caching, loading, and the switch.

MoEFsDiC's experts spend much of a CPU training step in memory-bound passes over channels-last
activations (GroupNorm with GELU, depthwise-conv gradients) where PyTorch's CPU kernels for that
layout are slow. The C sources beside this module (``fused_norm.c``, ``depthwise.c``, sharing
``moelab_kernels.h``) do those passes along the channel axis; `moelab.diffusion.fused_norm` and `moelab.diffusion.depthwise`
call them through ctypes. This module holds what they share.

Each source is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) with
``-O3 -march=native`` (OpenMP where the compiler has it, sharing PyTorch's OpenMP runtime and
thread count) into ``$MOELAB_CACHE/kernels`` (default ``~/.cache/moelab/kernels``), keyed by the
source and the headers, the flags, the compiler and this CPU's model and instruction-set flags, so that a shared
home directory never hands one machine's binary to another CPU. Written to a temporary name and
renamed: ranks that build at once never load a half-written file. Without a compiler (or on a
platform other than POSIX) every caller falls back to PyTorch's kernels, with one warning per kernel.

The kernels compute the same functions as the PyTorch ops they replace to float rounding, not to
the bit. ``MOELAB_CPU_KERNELS=0`` (or `set_enabled` / `enabled` (False)) turns all of them off;
MoEFsDiC's lean backward is then bit-identical to the composed ops, as its tests check.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from moelab.diffusion.convs import autocast_enabled

_HERE = Path(__file__).parent
_enabled = os.environ.get("MOELAB_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def set_enabled(flag: bool) -> bool:
    """Turn the compiled kernels on or off for this process; returns the previous setting."""
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


def ptr(t: Tensor | None) -> int | None:
    """A tensor's data address for a kernel argument (NULL for None)."""
    return None if t is None else t.data_ptr()


def float_vector(t: Tensor | None, n: int) -> Tensor | None:
    """``t`` as a kernel reads a per-channel or per-sample vector (float32, contiguous, detached), or
    None; its size is checked, since a kernel reads ``n`` values whatever it is given."""
    if t is None:
        return None
    t = t.detach().reshape(-1).to(torch.float32).contiguous()
    if t.numel() != n:
        raise ValueError(f"expected {n} values, got {t.numel()}")
    return t


def sample_rows(t: Tensor, rows: Tensor, n: int, h: int, w: int, c: int) -> Tensor:
    """``rows`` as a kernel reads it (int64, contiguous), after checking that ``t`` is a contiguous
    float32 CPU ``[*, H, W, C]`` tensor (grouped dispatch's units-last layout) holding a sample for
    every one of the ``n`` indices: the kernels read or add sample ``i`` of a call at ``t[rows[i]]``."""
    if tuple(t.shape[1:]) != (h, w, c) or not t.is_contiguous() or t.dtype != torch.float32 or t.device.type != "cpu":
        raise ValueError(f"expected a contiguous float32 CPU [*, {h}, {w}, {c}] tensor, got {tuple(t.shape)} {t.dtype} on {t.device}")
    rows = rows.to(torch.int64).contiguous()
    if rows.dim() != 1 or rows.numel() != n or (n and (int(rows.min()) < 0 or int(rows.max()) >= t.shape[0])):
        raise ValueError(f"expected {n} sample indices in [0, {t.shape[0]}), got {tuple(rows.shape)}")
    return rows


def nhwc_contiguous(x: Tensor) -> bool:
    """Whether a kernel can read ``x`` as ``[N][H][W][C]``: 4-d and channels-last-contiguous (also
    where that coincides with NCHW-contiguous, e.g. one channel or 1x1 images, which
    `moelab.diffusion.convs.is_channels_last` excludes on purpose)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def takes(x: Tensor) -> bool:
    """Whether a compiled kernel may run on ``x``: kernels on, a float32 CPU tensor in channels-last
    memory, no autocast (whose casts decide the dtypes), not under ``torch.compile`` (a C call
    through ctypes cannot take fake tensors; inductor fuses its own)."""
    if not _enabled or x.device.type != "cpu" or x.dtype != torch.float32 or not nhwc_contiguous(x):
        return False
    return not torch.compiler.is_compiling() and not autocast_enabled("cpu")


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


def _build(cc: str, flags: list[str], source: Path, target: Path) -> str | None:
    """Compile ``source`` to ``target`` (atomically); the compiler's complaint, or None when built."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, str(source), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return (proc.stderr or proc.stdout).strip().splitlines()[-1] if (proc.stderr or proc.stdout).strip() else "failed"
        os.replace(tmp, target)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load(name: str, what: str, declare: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL | None:
    """The kernel built from ``<name>.c`` beside this module (built on first use, then cached), its
    functions typed by ``declare``; None where it cannot be built here, after one warning that
    says ``what`` runs on PyTorch's kernels instead. ``load.cache_clear()`` forgets loaded kernels."""
    if os.name != "posix":
        return None
    cc = _compiler()
    if cc is None:
        warnings.warn(f"moelab: no C compiler found (set CC); {what} runs on PyTorch's slower kernels", stacklevel=4)
        return None
    path = _HERE / f"{name}.c"
    try:
        # the headers beside it too: a changed header must rebuild every kernel that includes it
        source = b"\0".join([path.read_bytes(), *(h.read_bytes() for h in sorted(_HERE.glob("*.h")))])
    except OSError as e:
        warnings.warn(f"moelab: the {what} kernel's source is missing ({e}); using PyTorch's kernels", stacklevel=4)
        return None
    errors = []
    for flags in _flag_sets():
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), cc.encode(), _cpu_fingerprint().encode()])).hexdigest()[:20]
        for cache in (_cache_dir(), Path(tempfile.gettempdir()) / f"moelab-kernels-{os.getuid()}"):
            target = cache / f"{name}-{key}.so"
            try:
                if not target.is_file():
                    err = _build(cc, flags, path, target)
                    if err is not None:
                        errors.append(f"{' '.join(flags)}: {err}")
                        break  # these flags fail with this compiler; the next cache dir would too
                lib = ctypes.CDLL(str(target))
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(f"{target}: {e}")
                continue
            declare(lib)
            return lib
    warnings.warn(
        f"moelab: could not build the {what} kernel (" + "; ".join(errors)[-400:] + "); using PyTorch's kernels",
        stacklevel=4,
    )
    return None
