"""moelab.hostmem: with `retain_freed_memory`, memory a step frees stays in the process for the next
step instead of going back to the kernel (and being page-faulted in again). Each case runs in its
own process: malloc settings are process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moelab.hostmem import _glibc, _libc

#: glibc's malloc governs this process (no other allocator preloaded): its mallopt settings apply
needs_glibc_malloc = pytest.mark.skipif(_glibc() is None, reason="mallopt tuning applies to glibc's malloc only")
needs_glibc = pytest.mark.skipif(_libc() is None, reason="the C library is not glibc")

# 16 blocks of 4 MiB (the size of activations) made and freed, as forward and backward do; prints
# how much the resident set grew and how much of that it still holds after the free.
STEP = """
import json, os, sys
import torch
if sys.argv[1] == "retain":
    from moelab.hostmem import retain_freed_memory
    assert retain_freed_memory() is True
    assert retain_freed_memory() is True  # idempotent
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
r0 = rss()
blocks = [torch.ones(2**20) for _ in range(16)]
r1 = rss()
del blocks
print(json.dumps({"grew": r1 - r0, "kept": rss() - r0}))
"""


def _run(mode: str) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's own defaults
    out = subprocess.run([sys.executable, "-c", STEP, mode], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_glibc_malloc
def test_freed_memory_stays_for_the_next_step():
    size = 16 * 4 * 2**20
    default, retained = _run("default"), _run("retain")
    assert default["grew"] >= size and retained["grew"] >= size
    # glibc's defaults hand the 64 MiB back to the kernel (the next step faults it in again) ...
    assert default["kept"] < size // 10, default
    # ... retain_freed_memory keeps it for reuse.
    assert retained["kept"] >= size, retained


# 16 blocks of 1 MiB, every other one freed while its neighbours stay alive (fragmentation), after a
# 4 MiB block was made and freed (glibc then raises its dynamic mmap threshold above 1 MiB, so
# with its defaults the 1 MiB blocks come from the heap); prints how much the resident set grew.
FRAGMENT = """
import json, os, sys
import torch
if sys.argv[1] == "map":
    from moelab.hostmem import map_large_blocks
    assert map_large_blocks() is True
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
warm = torch.ones(2**20)
del warm
r0 = rss()
blocks = [torch.ones(2**18) for _ in range(16)]
r1 = rss()
del blocks[::2]
print(json.dumps({"grew": r1 - r0, "kept": rss() - r0}))
"""


@needs_glibc_malloc
def test_map_large_blocks_makes_rss_follow_live_tensors():
    """With `map_large_blocks`, freeing blocks between live ones gives their memory back (peak RSS
    measures what is alive); from glibc's heap it stays resident."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def run(mode: str) -> dict[str, int]:
        out = subprocess.run([sys.executable, "-c", FRAGMENT, mode], env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    mib = 2**20
    heap, mapped = run("default"), run("map")
    assert heap["grew"] >= 15 * mib and mapped["grew"] >= 15 * mib  # (a few pages may be resident already)
    assert heap["kept"] >= 15 * mib, heap  # the 8 freed blocks sit between live ones in the heap
    assert 7 * mib <= mapped["kept"] < 10 * mib, mapped  # only the 8 live blocks stay resident


@needs_glibc_malloc
def test_malloc_provider_names_glibc_here():
    """Without a preloaded allocator malloc is glibc's, and the mallopt settings apply."""
    from moelab.hostmem import glibc_malloc_in_use, malloc_provider

    assert glibc_malloc_in_use() is True
    assert "libc.so" in os.path.basename(malloc_provider() or "")


# the mallopt settings report themselves not applied where another allocator provides malloc
PRELOADED = """
import json
from moelab.hostmem import glibc_malloc_in_use, malloc_provider, map_large_blocks, retain_freed_memory
print(json.dumps({"provider": malloc_provider(), "glibc": glibc_malloc_in_use(), "retain": retain_freed_memory(),
                  "map": map_large_blocks()}))
"""


def _preloadable_allocator() -> str | None:
    import ctypes.util

    for name in ("tcmalloc_minimal", "tcmalloc", "jemalloc"):
        found = ctypes.util.find_library(name)
        if found:
            for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib"):
                path = os.path.join(folder, found)
                if os.path.isfile(path):
                    return path
    return None


@needs_glibc
def test_preloaded_allocator_is_named_and_mallopt_settings_are_not_claimed():
    lib = _preloadable_allocator()
    if lib is None:
        pytest.skip("no TCMalloc or jemalloc installed (apt-get install libtcmalloc-minimal4 libjemalloc2)")
    env = {**os.environ, "LD_PRELOAD": lib}
    out = subprocess.run([sys.executable, "-c", PRELOADED], env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert os.path.realpath(got["provider"]) == os.path.realpath(lib), got
    assert got["glibc"] is False and got["retain"] is False and got["map"] is False, got


def test_train_step_benchmark_names_a_missing_preload_library():
    """`bench/train_step.py --preload` with a path that is not there: one clear error, no traceback."""
    bench = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "train_step.py")
    out = subprocess.run([sys.executable, bench, "--preload", "/no/such/libtcmalloc.so"], capture_output=True, text=True)
    assert out.returncode != 0
    assert "--preload /no/such/libtcmalloc.so: no such file" in out.stderr + out.stdout
    assert "Traceback" not in out.stderr
