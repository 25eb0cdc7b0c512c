"""Training-step cost of MoEFsDiC against the dense UNet2DModel it must beat, at three scales.

For each scale the seven models are built from the same config (only the architecture differs):
  moe    : MoEFsDiC as configured
  dense  : diffusers' UNet2DModel (`moelab.diffusion.baseline`), width matched to MoEFsDiC's
           parameters *active per sample*
  no_moe : MoEFsDiC with ``moe.enabled: false`` (Dilated_Fusion_Blocks instead of MoE blocks)
  moe_full: MoEFsDiC with ``train.gradient_checkpointing: true`` (every block body recomputed)
  moe_part: MoEFsDiC with ``train.gradient_checkpointing: [0, 1]`` (only the two full-resolution
           levels recomputed: most of the activations, half of the GEMMs' recompute)
  moe_plain: MoEFsDiC with ``train.lean_backward: false`` (experts as plain autograd ops, keeping
           every intermediate for backward: what `moe` cost before `moelab.diffusion.lean_backward`)
  moe_aten: MoEFsDiC with moelab's C kernels off (`moelab.diffusion.kernels`: the fused
           GroupNorm+GELU and the depthwise-conv backward; PyTorch's kernels, as
           ``MOELAB_CPU_KERNELS=0`` runs it: what `moe` cost before them)
and measured on the same inputs (x, t, c, noise), with the same torch thread count:

* time   : forward + loss (MSE, plus the load-balance loss for MoE) + backward, gradients reset
           to None before each step; after warm-up steps, rounds alternate the models so that load
           drift on a shared machine hits all alike; the reported ratio is the median over rounds
           of the per-round ratio, next to each model's median time, and MoEFsDiC's lowest and
           highest per-round ratio are printed with it (how far one round swings here).
* memory : peak resident set size (``VmHWM`` of /proc/self/status) of a fresh
           Python process per model that imports torch, builds the model and the inputs and runs
           eight training steps -- what a training process of that model needs, parameters,
           gradients, activations and allocator slack included. The RSS of the process just
           before its first step (interpreter, torch, the model) is printed too, so the step's own
           share can be read off. The same process times its last two steps (the faster one is
           printed, with its minor page faults, as "one model per process"): unlike the timing
           process, which holds all seven models, this is the allocator state of a real training
           run, where glibc's defaults page-fault MoEFsDiC's activations in again every step.
* live memory: the same fresh processes with every block of 256 KiB or more its own ``mmap``
           (`moelab.hostmem.map_large_blocks`; ``--no-live-memory`` skips them): peak RSS then
           follows the peak of live tensors, without the freed blocks glibc's heap holds between
           live ones (fragmentation, which depends on allocation order more than on the model).
           Slow (every step faults its activations in), so it is a memory figure only.
* FLOPs  : forward FLOPs per sample counted by ``torch.utils.flop_counter.FlopCounterMode``.

Scales: ``digits`` (configs/digits.yaml, 8x8, its batch 64), ``cifar32`` (default.yaml with
model_channels 64, channel_mults [1, 2, 4], 32x32, batch 32) and ``default64``
(configs/default.yaml, 64x64, batch 8). One line per scale, then

  train_step per-round moe/dense time (<scale>, <n> rounds): <lo>-<hi>   (that worst scale's rounds)
  train_step: moe/dense time=<x.xx> mem=<y.yy>     (worst ratios over cifar32 and default64)
  sample_step: moe/dense=<x.xx>                    (one guided noise prediction, w = 1.25, cifar32,
                                                    32 images: 64 rows, eval mode, no grad)

Host memory: by default the benchmark process and its memory children run with
`moelab.hostmem.retain_freed_memory` (glibc keeps freed memory for the next step instead of
returning it to the kernel), as ``moelab diffusion train`` does, for every model alike;
``--malloc default`` measures glibc's defaults instead. The minor page faults per step (median) are
printed with the times: with the defaults they are where MoEFsDiC, which held ~3x the dense
model's activations before lean backward (``moe_plain`` still does), lost about a tenth of its step.

On a GPU (``--device cuda``; ``--precision bf16-mixed`` for autocast as Lightning's ``bf16-mixed``
runs it): every step ends with ``torch.cuda.synchronize()``, so the times are the device's; memory is
``torch.cuda.max_memory_allocated`` (peak of live tensors: parameters, gradients, activations) and
``max_memory_reserved`` (the caching allocator's) of a fresh process per model running the same
steps; there are no RSS or live-memory processes. MoE blocks take the accelerator path there
(gathered dispatch, no host read per block); lean backward is a CPU path, so ``moe`` and
``moe_plain`` run the same code. Not yet measured: no GPU was lent to this work.

``--preload LIB`` runs the benchmark and its memory processes with another allocator (TCMalloc,
jemalloc) in ``LD_PRELOAD``, for every model alike; the live-memory processes keep glibc's.

Usage: python bench/train_step.py [--quick] [--threads 1] [--reps 7] [--compile] [--malloc retain|default] [--no-live-memory] [--scales ...]
       [--device cpu|cuda] [--precision 32|bf16-mixed] [--preload LIB]
``--compile`` times ``torch.compile``-d models (inductor; C++ backend on CPU) instead of eager ones,
in the timing process and the memory processes alike. Compiled, MoEFsDiC's blocks trace their
gathered dispatch (the grouped one's routing-dependent shapes stopped inductor, torch 2.13), so
``moe`` and ``moe_plain`` are the same model there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from moelab.diffusion import kernels
from moelab.diffusion.config import load_config, parse_override
from moelab.diffusion.models import build_model, prepare_for_training
from moelab.diffusion.sample import guided_eps
from moelab.errors import ConfigError
from moelab.hostmem import malloc_provider, map_large_blocks, retain_freed_memory
from moelab.moe import model_aux_loss

SCALES: dict[str, dict[str, Any]] = {
    "digits": {"config": "digits", "overrides": {}, "batch": None, "label": "digits 8x8"},
    "cifar32": {
        "config": "default",
        "overrides": {"model.model_channels": 64, "model.channel_mults": [1, 2, 4], "model.image_size": 32},
        "batch": 32,
        "label": "32x32 mc64 [1,2,4]",
    },
    "default64": {"config": "default", "overrides": {}, "batch": 8, "label": "default 64x64"},
}
VARIANTS: dict[str, dict[str, Any]] = {
    "moe": {},
    "dense": {"model.arch": "unet2d"},
    "no_moe": {"moe.enabled": False},
    "moe_full": {"train.gradient_checkpointing": True},
    "moe_part": {"train.gradient_checkpointing": [0, 1]},
    "moe_plain": {"train.lean_backward": False},
    "moe_aten": {},
}
#: variants run with moelab's C kernels off (`moelab.diffusion.kernels`: PyTorch's kernels throughout)
KERNELS_OFF = {"moe_aten"}
GUIDANCE = 1.25
#: ``--set SECTION.KEY=VALUE`` overrides, applied to every scale and variant (e.g. moe.k_active=1)
EXTRA_OVERRIDES: dict[str, Any] = {}
#: Steps a memory process runs before timing its last two: glibc's heap keeps growing (page faults)
#: for the first 4-6 steps of a 64x64 MoEFsDiC process, so timing steps 3-4 measured that growth
#: (42-48k faults per step for one variant, 16-20k for another; ~0 from step 7 on).
ALONE_WARMUP = 6


def scale_config(scale: str, variant: str) -> Any:
    s = SCALES[scale]
    return load_config(s["config"], {**s["overrides"], **EXTRA_OVERRIDES, **VARIANTS[variant]})


def batch_size(scale: str, cfg: Any) -> int:
    return SCALES[scale]["batch"] or cfg["train"]["batch_size"]


def inputs(cfg: Any, b: int, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """The same (x, t, c, noise target) for every model of a scale: a fixed generator (on the CPU,
    then moved, so that every device sees the same values)."""
    m = cfg["model"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, m["in_channels"], m["image_size"], m["image_size"], generator=g)
    t = torch.randint(0, cfg["diffusion"]["num_train_timesteps"], (b,), generator=g)
    c = torch.randint(0, m["num_classes"] + 1, (b,), generator=g)
    return tuple(v.to(device) for v in (x, t, c, torch.randn(x.shape, generator=g)))


def synchronizer(device: str) -> Callable[[], None]:
    """What ends a timed call on ``device``: wait for its queued kernels (nothing on the CPU)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def autocast(device: str, precision: str) -> Any:
    """The autocast context of a Lightning ``precision`` setting ("32": none)."""
    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def make_step(
    scale: str, variant: str, compile_model: bool = False, device: str = "cpu", precision: str = "32"
) -> tuple[Callable[[], None], torch.nn.Module, tuple]:
    cfg = scale_config(scale, variant)
    torch.manual_seed(0)
    model = prepare_for_training(build_model(cfg).train().to(device), cfg.train)  # as the trainer does
    data = inputs(cfg, batch_size(scale, cfg), device)
    x, t, c, noise = data
    lam = cfg["train"]["lambda_load"]
    fwd = torch.compile(model) if compile_model else model
    sync = synchronizer(device)

    def step() -> None:
        for p in model.parameters():
            p.grad = None
        with kernels.enabled(kernels.is_enabled() and variant not in KERNELS_OFF), autocast(device, precision):
            pred, logits = fwd(x, t, c)
            loss = F.mse_loss(pred.float(), noise)
            if logits:
                loss = loss + lam * model_aux_loss(model)
        loss.backward()
        sync()

    return step, model, data


def flops_per_sample(model: torch.nn.Module, data: tuple) -> float:
    from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

    def onednn_conv(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
        return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)

    # `moelab.diffusion.convs.pointwise_forward` calls oneDNN's convolution op directly, which torch's
    # counter has no formula for: count it as the convolution it is
    mapping = {torch.ops.aten.mkldnn_convolution: onednn_conv} if hasattr(torch.ops.aten, "mkldnn_convolution") else {}
    x, t, c, _ = data
    with FlopCounterMode(display=False, custom_mapping=mapping) as fc, torch.no_grad():
        model(x, t, c)
    return fc.get_total_flops() / x.shape[0]


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(
    fns: dict[str, Callable[[], None]], reps: int, warmup: int, faults: dict[str, list[int]] | None = None
) -> dict[str, list[float]]:
    """Seconds per call of every function, rounds alternating the functions (after ``warmup``);
    ``faults`` (when given) collects the minor page faults of every timed call.

    Every other round runs the functions in reverse order. Why: on the 2-core VMs a step's time
    depends on what ran just before it (caches, the allocator's state): MoEFsDiC against the dense
    model at 64x64 measured 1.28 with MoEFsDiC first in each pair and 1.30 with the dense model first
    (8 rounds each), and toggling a flag between steps of one model made whichever ran second ~3%
    slower. With a fixed order such a bias would sit in every per-round ratio; reversed, it cancels.
    (Two 64x64 runs back to back gave 1.23 with the fixed order and 1.24 with this one: the bias is
    smaller than the run-to-run noise there, but nothing makes it zero on another machine.)"""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns.items())
    for r in range(reps):
        for name, f in order if r % 2 == 0 else order[::-1]:
            f0 = minor_faults()
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
            if faults is not None:
                faults.setdefault(name, []).append(minor_faults() - f0)
    return times


def per_round(a: list[float], b: list[float]) -> list[float]:
    """a/b of every round, the two timed back to back."""
    return [x / y for x, y in zip(a, b, strict=True)]


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a/b, each round timed back to back: robust to load drift."""
    return statistics.median(per_round(a, b))


def ratio_range(a: list[float], b: list[float]) -> tuple[float, float]:
    """Smallest and largest per-round a/b: how far one round's ratio swings on this machine, so
    that a median at a goal's line can be read as "at the line", not as a margin."""
    ratios = per_round(a, b)
    return min(ratios), max(ratios)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_child(scale: str, variant: str, device: str = "cpu", precision: str = "32", compile_model: bool = False) -> None:
    """In a fresh process, as a training run has it (one model): memory before the first step, peak
    memory over the steps, and the time and minor page faults of the last two steps, as JSON. CPU:
    resident set sizes; CUDA: the allocator's peak of live tensors (``peak_mb``, what the ratio
    uses) and of reserved memory (``reserved_mb``)."""
    cuda = torch.device(device).type == "cuda"
    step, _, _ = make_step(scale, variant, compile_model, device, precision)
    before = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mb()
    for _ in range(ALONE_WARMUP):
        step()
    times, faults = [], []
    for _ in range(2):
        f0, t0 = minor_faults(), time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        faults.append(minor_faults() - f0)
    peak = {"peak_mb": peak_rss_mb()}
    if cuda:
        peak = {"peak_mb": torch.cuda.max_memory_allocated() / 2**20, "reserved_mb": torch.cuda.max_memory_reserved() / 2**20}
    print(json.dumps({"before_mb": before, **peak, "alone_ms": 1e3 * min(times), "alone_faults": min(faults)}))


def peak_rss_mb() -> float:
    """High-water RSS of this process's own address space (``VmHWM``; unlike ``ru_maxrss``, which
    survives ``exec``, it cannot inherit the parent's size through fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB on most systems


def measure_memory(
    scale: str, variant: str, threads: int, malloc: str, device: str = "cpu", precision: str = "32", compile_model: bool = False
) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    preloaded = os.environ.get(PRELOAD_MARK)
    if malloc == "mmap" and preloaded:  # live memory is measured through glibc's mmap threshold: drop --preload's library
        env["LD_PRELOAD"] = ":".join(p for p in env.get("LD_PRELOAD", "").split(":") if p and p != preloaded)
    cmd = [sys.executable, __file__, "--threads", str(threads), "--malloc", malloc, "--device", device, "--precision", precision,
           *(["--compile"] if compile_model else []), *(a for k, v in EXTRA_OVERRIDES.items() for a in ("--set", f"{k}={json.dumps(v)}")),
           "--memory-child", scale, variant]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_scale(
    scale: str, reps: int, warmup: int, threads: int, compile_model: bool, malloc: str, live_memory: bool = True,
    device: str = "cpu", precision: str = "32",
) -> dict[str, Any]:
    steps, info = {}, {}
    for v in VARIANTS:
        step, model, data = make_step(scale, v, compile_model, device, precision)
        steps[v] = step
        counts = model.parameter_counts()
        info[v] = {"active": counts["active_per_sample"], "total": counts["total"], "gflops": flops_per_sample(model, data) / 1e9}
    faults: dict[str, list[int]] = {}
    times = interleaved(steps, reps, warmup, faults)
    mem = {v: measure_memory(scale, v, threads, malloc, device, precision, compile_model) for v in VARIANTS}
    live = {v: measure_memory(scale, v, threads, "mmap", compile_model=compile_model) for v in VARIANTS} if live_memory and device == "cpu" else {}
    return {
        "ms": {v: 1e3 * statistics.median(ts) for v, ts in times.items()},
        "faults": {v: statistics.median(f) for v, f in faults.items()},
        "ratio": {v: paired_ratio(times[v], times["dense"]) for v in VARIANTS},
        "ratio_range": {v: ratio_range(times[v], times["dense"]) for v in VARIANTS},
        "fused_gain": paired_ratio(times["moe"], times["moe_aten"]),
        "mem": mem,
        "live": live,
        "info": info,
        "batch": batch_size(scale, scale_config(scale, "moe")),
    }


def sample_step_ratio(
    reps: int, warmup: int, device: str = "cpu", precision: str = "32"
) -> tuple[float, dict[str, float], tuple[float, float]]:
    fns = {}
    sync = synchronizer(device)
    for v in ("moe", "dense"):
        cfg = scale_config("cifar32", v)
        torch.manual_seed(0)
        model = build_model(cfg).eval().to(device)
        x, t, c, _ = inputs(cfg, 32, device)
        labels = c.clamp(max=cfg["model"]["num_classes"] - 1)
        null = cfg["model"]["num_classes"]

        def f(model=model, x=x, t=t, labels=labels, null=null) -> None:
            with torch.no_grad(), autocast(device, precision):
                guided_eps(model, x, t, labels, GUIDANCE, null)
            sync()

        fns[v] = f
    times = interleaved(fns, reps, warmup)
    ms = {v: 1e3 * statistics.median(ts) for v, ts in times.items()}
    return paired_ratio(times["moe"], times["dense"]), ms, ratio_range(times["moe"], times["dense"])


#: Set (to the library) in the process `preload_allocator` re-executes, so that it is done once.
PRELOAD_MARK = "MOELAB_BENCH_PRELOAD"


def preload_allocator(library: str) -> None:
    """Re-execute this benchmark with ``library`` (a malloc replacement: TCMalloc, jemalloc) in
    ``LD_PRELOAD`` unless it already provides ``malloc`` here; the memory processes inherit it."""
    lib = os.path.realpath(library)
    if not os.path.isfile(lib):
        fail(
            f"--preload {library}: no such file; give the path of a malloc library, e.g. "
            "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 (Debian/Ubuntu: apt-get install libtcmalloc-minimal4) "
            "or /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 (libjemalloc2)"
        )
    provider = malloc_provider()
    if provider is not None and os.path.realpath(provider) == lib:
        return
    if os.environ.get(PRELOAD_MARK) == lib:
        fail(f"--preload {library}: malloc still comes from {provider} with it preloaded; is it a malloc library (TCMalloc, jemalloc)?")
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join([lib, *(p for p in env.get("LD_PRELOAD", "").split(":") if p)])
    env[PRELOAD_MARK] = lib
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def fail(message: str) -> None:
    """One ``error: ...`` line and exit status 2, as every moelab command does."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def fmt(values: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up step (a smoke run; noisier ratios)")
    ap.add_argument("--reps", type=int, default=7, help="timed rounds (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    ap.add_argument("--scales", nargs="+", default=list(SCALES), choices=list(SCALES))
    ap.add_argument("--compile", action="store_true", help="time torch.compile-d models")
    ap.add_argument(
        "--malloc", choices=("retain", "default", "mmap"), default="retain",
        help="retain: glibc keeps freed memory for the next step (moelab.hostmem, as moelab diffusion train runs); default: glibc's defaults; "
        "mmap: every block >= 256 KiB its own mmap (moelab.hostmem.map_large_blocks; memory only, slow)",
    )
    ap.add_argument(
        "--no-live-memory", action="store_true",
        help="skip the live-memory processes (every block >= 256 KiB its own mmap: peak RSS follows the live tensors; slow)",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (timed with synchronisation; memory from the CUDA allocator)")
    ap.add_argument("--precision", choices=("32", "bf16-mixed"), default="32", help="32: float32; bf16-mixed: bfloat16 autocast, as Lightning's")
    ap.add_argument(
        "--preload", metavar="LIB",
        help="run the timing and memory processes with this malloc library preloaded (LD_PRELOAD), e.g. TCMalloc's "
        "libtcmalloc_minimal.so.4 or libjemalloc.so.2, as PyTorch's CPU performance guide recommends (every model alike; "
        "--malloc then changes nothing); the live-memory processes keep glibc's malloc",
    )
    ap.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="config override for every scale and model, e.g. --set moe.k_active=1 (the dense model is matched to the "
        "resulting active parameters)",
    )
    ap.add_argument("--memory-child", nargs=2, metavar=("SCALE", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        EXTRA_OVERRIDES.update(parse_override(item) for item in args.set)
        for scale in args.scales:
            scale_config(scale, "moe")
    except ConfigError as e:
        fail(str(e))
    if args.preload and not args.memory_child:
        preload_allocator(args.preload)
    torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        fail(f"--device {args.device!r} is not a device; use cpu or cuda[:N]")
    if device.type not in ("cpu", "cuda"):
        fail(f"--device {args.device}: this benchmark runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; run on a GPU machine or use --device cpu")
    retained = retain_freed_memory() if args.malloc == "retain" else False
    if args.memory_child:
        if args.malloc == "mmap" and not map_large_blocks():
            fail(f"--malloc mmap needs glibc's malloc and mallopt (malloc here comes from {malloc_provider()})")
        memory_child(*args.memory_child, device=args.device, precision=args.precision, compile_model=args.compile)
        return
    reps, warmup = (3, 1) if args.quick else (max(3, args.reps), 2)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device={args.device} ({where}) precision={args.precision} threads={args.threads} reps={reps} warmup={warmup} "
        f"compile={args.compile} malloc={args.malloc} (retained={retained}, malloc from {malloc_provider()}) torch={torch.__version__}"
    )
    if args.malloc == "mmap":
        fail("--malloc mmap is for the memory processes only (the live-memory figures); time with retain or default")
    settings = ("moe_full", "moe_part", "moe_plain")  # MoEFsDiC with one train.* setting changed (VARIANTS)
    worst: dict[str, list[float]] = {v: [0.0, 0.0, 0.0] for v in ("moe", *settings, "moe_aten")}  # time, memory, live-memory ratios
    fused_gain: dict[str, float] = {}  # moe / moe_aten time per scale
    worst_range: tuple[str, float, float] = ("", 0.0, 0.0)  # the headline scale's per-round moe/dense time, lowest and highest
    for scale in args.scales:
        r = run_scale(scale, reps, warmup, args.threads, args.compile, args.malloc, not args.no_live_memory, args.device, args.precision)
        ms, ratio, mem, info = r["ms"], r["ratio"], r["mem"], r["info"]
        mem_ratios = {v: mem[v]["peak_mb"] / mem["dense"]["peak_mb"] for v in VARIANTS}
        peak = fmt({v: "%.0f" % mem[v]["peak_mb"] for v in VARIANTS})
        mem_label = "peak RSS MB"
        if device.type == "cuda":
            mem_label = f"peak CUDA allocated MB (reserved {'/'.join('%.0f' % mem[v]['reserved_mb'] for v in VARIANTS)})"
        before = "/".join("%.0f" % mem[v]["before_mb"] for v in VARIANTS)
        alone = fmt({v: "%.0f" % mem[v]["alone_ms"] for v in VARIANTS})
        alone_faults = "/".join("%.0f" % mem[v]["alone_faults"] for v in VARIANTS)
        alone_ratio = mem["moe"]["alone_ms"] / mem["dense"]["alone_ms"]
        gflops = fmt({v: "%.3f" % info[v]["gflops"] for v in VARIANTS})
        active = fmt({v: "{:,}".format(info[v]["active"]) for v in VARIANTS})
        # float32 parameters + their gradients: what no activation recomputation can remove
        weights = fmt({v: "%.0f" % (8 * info[v]["total"] / 2**20) for v in ("moe", "dense")})
        print(
            f"{scale} ({SCALES[scale]['label']}, batch {r['batch']}): "
            f"step ms {fmt({v: '%.0f' % ms[v] for v in VARIANTS})} "
            f"(minor faults/step {fmt({v: '%.0f' % r['faults'][v] for v in VARIANTS})}) "
            f"ratio to dense {fmt({v: '%.2f' % ratio[v] for v in VARIANTS if v != 'dense'})} "
            f"(moe per round {r['ratio_range']['moe'][0]:.2f}-{r['ratio_range']['moe'][1]:.2f}) | "
            f"{mem_label} {peak} (before step {before}) ratio to dense {fmt({v: '%.2f' % mem_ratios[v] for v in VARIANTS if v != 'dense'})} | "
            f"params+grads MB {weights} | fwd GFLOPs/sample {gflops} | active params {active} | "
            f"one model per process: step ms {alone} (minor faults/step {alone_faults}) moe/dense={alone_ratio:.2f}",
            flush=True,
        )
        fused_gain[scale] = r["fused_gain"]
        live = r["live"]
        live_ratios = {v: live[v]["peak_mb"] / live["dense"]["peak_mb"] for v in live}
        if live:
            print(
                f"{scale} live memory (blocks >= 256 KiB mmapped, no heap fragmentation): peak RSS MB "
                f"{fmt({v: '%.0f' % live[v]['peak_mb'] for v in VARIANTS})} ratio to dense "
                f"{fmt({v: '%.2f' % live_ratios[v] for v in VARIANTS if v != 'dense'})}",
                flush=True,
            )
        if scale != "digits":
            if ratio["moe"] >= worst["moe"][0]:
                worst_range = (scale, *r["ratio_range"]["moe"])
            for v, w in worst.items():
                w[0], w[1] = max(w[0], ratio[v]), max(w[1], mem_ratios[v])
                w[2] = max(w[2], live_ratios.get(v, 0.0))
    if worst["moe"][0]:
        for v in settings:
            (key, value), = VARIANTS[v].items()
            print(f"{v} ({key}: {value}): {v}/dense time={worst[v][0]:.2f} mem={worst[v][1]:.2f}")
        gains = " ".join(f"{k}={v:.3f}" for k, v in fused_gain.items())
        print(
            f"moe_aten (moelab's C kernels off): moe_aten/dense time={worst['moe_aten'][0]:.2f} mem={worst['moe_aten'][1]:.2f}; "
            f"moe/moe_aten time {gains}"
        )
        if worst["moe"][2]:
            print(
                f"live memory (no heap fragmentation): moe/dense={worst['moe'][2]:.2f} moe_full/dense={worst['moe_full'][2]:.2f} "
                f"moe_plain/dense={worst['moe_plain'][2]:.2f}"
            )
        print(f"train_step per-round moe/dense time ({worst_range[0]}, {reps} rounds): {worst_range[1]:.2f}-{worst_range[2]:.2f}")
        print(f"train_step: moe/dense time={worst['moe'][0]:.2f} mem={worst['moe'][1]:.2f}")
    ratio, ms, (lo, hi) = sample_step_ratio(reps, warmup, args.device, args.precision)
    print(f"sample step ms (cifar32, 32 images, w={GUIDANCE}): moe={ms['moe']:.0f} dense={ms['dense']:.0f} (per round {lo:.2f}-{hi:.2f})")
    print(f"sample_step: moe/dense={ratio:.2f}")


if __name__ == "__main__":
    main()
