"""Inference cost of SeisMoE's sparse FFNs: SeisMoE (E=4, k=2) vs SeisBench's EQTransformer.

Same batch of 64 windows of 3 x 6000 samples, CPU with 2 threads, eval mode, no_grad; the two
models are timed alternately (so machine load hits both alike) and the medians of the repetitions
after warm-up are compared. SeisMoE is upcycled from the EQTransformer, so both compute the same
function and differ only in the MoE routing/dispatch. Last line: ``seismoe: moe/eqt=<ratio>``.
Usage: ``python bench/seismoe.py [--reps 7] [--batch 64]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from seisbench.models import EQTransformer

from moelab.validation import at_least_one
from moelab.seismic.model import SeisMoE


def _time(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(wall, process CPU) seconds of one forward; CPU time is less disturbed by other processes."""
    w0, c0 = time.perf_counter(), time.process_time()
    model(x)
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per model (>= 5)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    at_least_one(("--threads", args.threads), ("--batch", args.batch))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    eqt = EQTransformer().eval()
    moe = SeisMoE.from_eqtransformer(eqt, num_experts=4, num_experts_per_token=2).eval()
    x = torch.randn(args.batch, 3, 6000)
    times: dict[str, list[float]] = {"eqt": [], "moe": []}
    cpu: dict[str, list[float]] = {"eqt": [], "moe": []}
    with torch.no_grad():
        diff = max(float((a - b).abs().max()) for a, b in zip(eqt(x), moe(x), strict=True))  # warm-up + equivalence
        _time(eqt, x), _time(moe, x)
        for _ in range(max(5, args.reps)):
            for key, model in (("eqt", eqt), ("moe", moe)):
                wall, proc = _time(model, x)
                times[key].append(wall)
                cpu[key].append(proc)
        # the replaced layer alone, on the token tensor it sees in the model ([B, 16, 47])
        h = torch.randn(args.batch, 16, 47)
        ffn = {"eqt": eqt.transformer_d0.ff, "moe": moe.transformer_d0.ff}
        layer = {k: min(_time(m, h)[0] for _ in range(50)) for k, m in ffn.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(m / e for m, e in zip(times["moe"], times["eqt"], strict=True))
    cpu_ratio = statistics.median(cpu["moe"]) / statistics.median(cpu["eqt"])
    print(f"batch {args.batch} x 3 x 6000, {torch.get_num_threads()} threads, {len(times['eqt'])} reps, max |moe - eqt| = {diff:.1e}")
    for k, label in (("eqt", "EQTransformer"), ("moe", "SeisMoE E=4 k=2")):
        print(f"{label:<18} median {med[k] * 1000:8.1f} ms  (min {min(times[k]) * 1000:.1f}, max {max(times[k]) * 1000:.1f})")
    print(f"one FFN layer on [{args.batch}, 16, 47] tokens (best of 50): dense {layer['eqt'] * 1e3:.2f} ms, MoE {layer['moe'] * 1e3:.2f} ms "
          f"(two such layers add {200 * (layer['moe'] - layer['eqt']) / min(times['eqt']):.2f}% to the fastest EQTransformer forward)")
    print(f"median of paired (back-to-back) ratios {paired:.3f}; ratio of minima {min(times['moe']) / min(times['eqt']):.3f}; "
          f"process-CPU-time ratio {cpu_ratio:.3f} (on a busy machine trust the minima)")
    print(f"seismoe: moe/eqt={med['moe'] / med['eqt']:.2f}")


if __name__ == "__main__":
    from moelab.guard import run_guarded

    raise SystemExit(run_guarded(main))  # a bad flag: one "error: ..." line, exit status 2
