"""Keep freed host memory in the process instead of handing it back to the OS every training step.

Why: a CPU training step allocates its activations in forward and frees them in backward. With
glibc's default malloc, a freed block at the top of the heap larger than the (dynamic) trim
threshold is returned to the kernel, and every block of 32 MB or more (the largest dynamic mmap
threshold) is its own ``mmap``. The next step then page-faults all of that memory in again, and
the kernel zero-fills each page. Measured on the 2-core build machine (64x64 default config,
batch 8, 1 thread): MoEFsDiC took 110k-160k minor page faults per training step, 0.15-0.35 s of
system time (about 10 % of the step); the dense UNet2DModel, with a third of the activation
memory, took 18k-36k. With the settings below both take almost none: in an A/B of fresh
processes MoEFsDiC's step got 8-9 % faster (64x64 and 32x32), the dense model's 1-6 %.

`retain_freed_memory` sets, through ``mallopt``, what the environment variables
``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_`` would set at process start: freed memory
stays in the heap for the next step's allocations, and blocks below 32 MB come from the heap, not
from fresh ``mmap`` s. The peak resident memory of a training process moves by a few percent at
most (the next step needs the same memory again; measured 64x64: MoEFsDiC 2361-2387 MB with it,
2292-2346 MB without); what changes is that its RSS no longer drops between steps. It is
what PyTorch's CPU performance guide gets from replacing the allocator (jemalloc/TCMalloc via
``LD_PRELOAD``), done in-process so that a plain ``moelab diffusion train`` benefits.

Where such an allocator is preloaded, glibc's settings govern nothing and these functions return
False (`malloc_provider` names the library in use). Measured with Debian's TCMalloc
(``libtcmalloc_minimal.so.4``) on the same machine, 64x64, fresh one-model processes: peak RSS
MoEFsDiC 1363-1377 MB against the dense model's 964-971 MB (1.42x; glibc with these settings:
1754-1768 vs 1066-1089 MB, 1.63x), at the same step times; its allocator packs the freed blocks
between live ones that glibc's heap keeps resident.

Only a process that trains calls it (the training CLIs, and the benchmarks for every model alike);
library code never changes the allocator behind a user's back. It is a no-op (returning False)
where the C library is not glibc (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

#: glibc's ``mallopt`` parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Largest mmap threshold glibc accepts on 64-bit (``HEAP_MAX_SIZE / 2``): blocks below this come
#: from the heap, where freed memory is reused.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
#: ``M_TRIM_THRESHOLD`` -1: never trim the heap (mallopt(3): "-1 disables trimming completely").
TRIM_DISABLED = -1
#: `map_large_blocks`' default: blocks of 256 KiB or more (every activation of a real model) get
#: their own ``mmap``.
LARGE_BLOCK_BYTES = 256 * 1024

_applied: bool | None = None


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p), ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc itself, or None where the C library is another one (looked up once: `_glibc`,
    `malloc_provider` and `glibc_malloc_in_use` all need it, and it cannot change in a process)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def _address(fn: object) -> int | None:
    return ctypes.cast(fn, ctypes.c_void_p).value


def malloc_provider() -> str | None:
    """File name of the shared object whose ``malloc`` this process calls, or None where that
    cannot be told (not glibc's dynamic loader).

    Why: PyTorch's CPU performance guide recommends replacing the allocator with jemalloc or
    TCMalloc through ``LD_PRELOAD``; then glibc's ``mallopt`` still answers but no longer governs
    the process's memory, and `retain_freed_memory` / `map_large_blocks` must say so instead of
    reporting settings that do nothing.
    """
    libc = _libc()
    if libc is None:
        return None
    try:
        dladdr = libc.dladdr
        dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        dladdr.restype = ctypes.c_int
        info = _DlInfo()
        if not dladdr(_address(ctypes.CDLL(None).malloc), ctypes.byref(info)) or not info.dli_fname:
            return None
    except (OSError, AttributeError):
        return None
    return info.dli_fname.decode(errors="replace")


def glibc_malloc_in_use() -> bool:
    """True when this process allocates with glibc's malloc (no jemalloc/TCMalloc preloaded)."""
    libc = _libc()
    if libc is None:
        return False
    try:
        return _address(ctypes.CDLL(None).malloc) == _address(libc.malloc)
    except (OSError, AttributeError):
        return False


def _glibc() -> ctypes.CDLL | None:
    """glibc, where its malloc is the one in use (its ``mallopt`` then governs the process's memory)."""
    return _libc() if glibc_malloc_in_use() else None


def retain_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (see the module docstring for why).

    Idempotent; returns True when the settings are in force, False where they cannot be applied
    (not glibc, another allocator preloaded -- jemalloc and TCMalloc keep freed memory themselves --
    or ``mallopt`` refused a value).
    """
    global _applied
    if _applied is None:
        libc = _glibc()
        if libc is None:
            _applied = False
        else:
            # mallopt returns 1 on success, 0 on error; the mmap threshold is set first because
            # setting it fixes (stops the dynamic adjustment of) both thresholds.
            _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
                libc.mallopt(M_TRIM_THRESHOLD, TRIM_DISABLED)
            )
        log.debug("retain_freed_memory: %s (malloc from %s)", "in force" if _applied else "not applied", malloc_provider())
    return _applied


def map_large_blocks(threshold_bytes: int = LARGE_BLOCK_BYTES) -> bool:
    """For measuring memory, never for training: every block of ``threshold_bytes`` or more gets
    its own ``mmap`` and goes back to the kernel when freed.

    Why: with the heap (`retain_freed_memory`, or glibc's defaults) a process's peak RSS is the
    heap's high-water mark, which holds freed blocks between live ones (fragmentation) as well as
    the live tensors; how much depends on the order of a model's allocations, not on what it needs.
    With large blocks mapped one by one, peak RSS follows the peak of live tensor memory (plus the
    interpreter and libraries), so two models' peaks compare what their tensors need. It is slow:
    every step page-faults all of its activations in again. Returns False where it cannot be
    applied (not glibc, another allocator preloaded, or ``mallopt`` refused a value). Not combinable with `retain_freed_memory`
    in one process (whichever runs last sets the mmap threshold).
    """
    libc = _glibc()
    if libc is None:
        return False
    # a fixed mmap threshold also stops glibc from raising it after each free (its dynamic threshold)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes))
