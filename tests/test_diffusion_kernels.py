"""`moelab.diffusion.kernels`: building moelab's C kernels (fused GroupNorm+GELU, depthwise-conv
backward) at first use, the cache, the fallbacks (no compiler, a failing build, no OpenMP) and the
switch. The kernels' values: tests/test_diffusion_fused_norm.py, tests/test_diffusion_depthwise.py."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from moelab.diffusion import depthwise, fused_norm, kernels
from moelab.diffusion.lean_backward import norm_act_conv

CL = torch.channels_last
NAMES = ["fused_norm", "depthwise"]
needs_compiler = pytest.mark.skipif(fused_norm._library() is None, reason="no C compiler here: the kernels fall back")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty kernel cache, nothing loaded; what was loaded before is loaded again afterwards."""
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    kernels.load.cache_clear()
    with kernels.enabled(True):
        yield tmp_path / "cache" / "kernels"
    kernels.load.cache_clear()


def test_without_a_compiler_every_kernel_warns_and_falls_back(monkeypatch, fresh, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=CL)
    with pytest.warns(UserWarning, match="no C compiler") as caught:
        assert not fused_norm.supports(x, 4)
        assert not depthwise.supports(x, torch.randn(16, 1, 3, 3), 1)
    assert len(caught) == 2  # one warning per kernel, naming it
    assert "GroupNorm+GELU" in str(caught[0].message) and "depthwise" in str(caught[1].message)
    # the composed path still computes the head
    norm, conv = torch.nn.GroupNorm(4, 16), torch.nn.Conv2d(16, 3, 3, padding=1)
    h = torch.randn(2, 16, 5, 5).contiguous(memory_format=CL).requires_grad_(True)
    norm_act_conv(h, norm, conv).sum().backward()
    assert h.grad is not None


@pytest.mark.parametrize("name", NAMES)
def test_a_failing_build_warns_and_leaves_nothing_half_written(name, monkeypatch, fresh, tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: error: this compiler always fails' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    library = {"fused_norm": fused_norm._library, "depthwise": depthwise._library}[name]
    with pytest.warns(UserWarning, match="always fails"):
        assert library() is None
    assert not list(fresh.parent.rglob("*.so"))


@needs_compiler
def test_a_compiler_without_openmp_still_builds_the_kernels(monkeypatch, fresh, tmp_path):
    real = kernels._compiler()
    fake = tmp_path / "cc"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && {{ echo "no OpenMP here" >&2; exit 1; }}; done\nexec {real} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a flag set that works is no reason to warn
        assert fused_norm._library() is not None and depthwise._library() is not None
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=CL)
    y, _, _ = fused_norm.norm_act(x, None, None, 4, 1e-5, fused_norm.NORM)
    torch.testing.assert_close(y, F.group_norm(x, 4))
    w, g = torch.randn(16, 1, 3, 3), torch.randn_like(x)
    expected = torch.ops.aten.convolution_backward(g, x, w, [16], [1, 1], [1, 1], [1, 1], False, [0, 0], 16, [True, True, True])
    for a, b in zip(depthwise.backward(g, x, w, [True, True, True]), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_kernels_are_built_once_and_then_loaded_from_the_cache(monkeypatch, fresh):
    assert fused_norm._library() is not None and depthwise._library() is not None
    built = sorted(fresh.glob("*.so"))
    assert [p.name.split("-")[0] for p in built] == ["depthwise", "fused_norm"]
    kernels.load.cache_clear()

    def no_compiler(*a, **kw):
        raise AssertionError("rebuilt a cached kernel")

    monkeypatch.setattr(kernels.subprocess, "run", no_compiler)
    assert fused_norm._library() is not None and depthwise._library() is not None
    assert sorted(fresh.glob("*.so")) == built


@needs_compiler
def test_a_changed_header_rebuilds_the_kernels(monkeypatch, fresh, tmp_path):
    """The cache key covers the shared header: a kernel built against an older header is not reused."""
    import shutil

    for f in list(kernels._HERE.glob("*.c")) + list(kernels._HERE.glob("*.h")):
        shutil.copy(f, tmp_path / f.name)
    monkeypatch.setattr(kernels, "_HERE", tmp_path)
    assert depthwise._library() is not None
    first = set(fresh.glob("depthwise-*.so"))
    kernels.load.cache_clear()
    header = tmp_path / "moelab_kernels.h"
    header.write_text(header.read_text() + "\n/* changed */\n")
    assert depthwise._library() is not None
    assert len(set(fresh.glob("depthwise-*.so")) - first) == 1


def test_a_missing_source_warns_and_falls_back(monkeypatch, fresh, tmp_path):
    monkeypatch.setattr(kernels, "_HERE", tmp_path)  # no .c files there
    with pytest.warns(UserWarning, match="source is missing"):
        assert depthwise._library() is None


def test_environment_variable_turns_the_kernels_off():
    code = "from moelab.diffusion import kernels; print(kernels.is_enabled())"
    env = {**os.environ, "MOELAB_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_takes_only_float32_channels_last_cpu_tensors_outside_autocast():
    x = torch.randn(2, 16, 4, 4)
    cl = x.contiguous(memory_format=CL)
    with kernels.enabled(True):
        assert kernels.takes(cl) and not kernels.takes(x) and not kernels.takes(cl.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not kernels.takes(cl)
    with kernels.enabled(False):
        assert not kernels.takes(cl)
