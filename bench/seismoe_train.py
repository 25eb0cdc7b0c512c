"""Training-step cost of SeisMoE (E=4, k=2) vs SeisBench's EQTransformer, same batch, same threads.

One step = forward with logits, the harness's loss (detection/P/S binary cross-entropy, plus the
load-balance loss times ``moe_loss_coef`` for SeisMoE), backward and an Adam step — what
`moelab.seismic.lit` does per batch, without the data loader. The two models are stepped
alternately after warm-up (so machine load hits both alike); the median of the per-round ratios is
reported with the medians of each. Last line: ``seismoe_train: moe/eqt=<ratio>`` (goal <= 1.10).
Usage: ``python bench/seismoe_train.py [--rounds 15] [--batch 16] [--in-samples 6000] [--threads 1]
[--moe-args JSON]``; ``--moe-args`` gives SeisMoE's model_args (default
``{"num_experts": 4, "num_experts_per_token": 2, "moe_loss_coef": 0.01}``), e.g. to time a lever of
bench/seismoe_quality.py such as ``"expert_hidden": 512``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from moelab.validation import at_least_one
from moelab.seismic.lit import EQTransformerLit, SeisMoELit


DEFAULT_MOE_ARGS = {"num_experts": 4, "num_experts_per_token": 2, "moe_loss_coef": 0.01}


def step(module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    t0 = time.perf_counter()
    det, p, s = module.model(batch["X"], logits=True)
    loss = (
        F.binary_cross_entropy_with_logits(det, batch["det"])
        + F.binary_cross_entropy_with_logits(p, batch["p"])
        + F.binary_cross_entropy_with_logits(s, batch["s"])
        + module.moe_loss_coef_value() * module.moe_loss()
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed alternating rounds (>= 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--in-samples", type=int, default=6000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--moe-args", type=json.loads, default=dict(DEFAULT_MOE_ARGS), help="SeisMoE model_args as JSON")
    args = parser.parse_args()
    at_least_one(("--threads", args.threads))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    modules = {
        "eqt": EQTransformerLit(in_samples=args.in_samples),
        "moe": SeisMoELit(in_samples=args.in_samples, **args.moe_args),
    }
    optims = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in modules.items()}
    n = args.in_samples
    batch = {
        "X": torch.randn(args.batch, 3, n),
        "det": torch.rand(args.batch, n),
        "p": torch.rand(args.batch, n),
        "s": torch.rand(args.batch, n),
    }
    for m in modules.values():
        m.train()
    for _ in range(args.warmup):
        for k in modules:
            step(modules[k], optims[k], batch)
    times: dict[str, list[float]] = {"eqt": [], "moe": []}
    for _ in range(max(5, args.rounds)):
        for k in ("eqt", "moe"):
            times[k].append(step(modules[k], optims[k], batch))
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(m / e for m, e in zip(times["moe"], times["eqt"], strict=True))
    params = {k: sum(p.numel() for p in m.model.parameters()) for k, m in modules.items()}
    print(f"batch {args.batch} x 3 x {n}, {torch.get_num_threads()} thread(s), {len(times['eqt'])} alternating rounds after {args.warmup} warm-up")
    moe_label = f"SeisMoE E={modules['moe'].model.num_experts} k={modules['moe'].model.num_experts_per_token}"
    print(f"SeisMoE model_args: {json.dumps(args.moe_args)}")
    for k, label in (("eqt", "EQTransformer"), ("moe", moe_label)):
        print(f"{label:<16} {params[k]:>9,} params  median step {med[k] * 1000:8.1f} ms  ({1 / med[k]:.2f} steps/s; min {min(times[k]) * 1000:.1f} ms)")
    print(f"ratio of medians {med['moe'] / med['eqt']:.3f}; ratio of minima {min(times['moe']) / min(times['eqt']):.3f}")
    print(f"seismoe_train: moe/eqt={paired:.2f}")


if __name__ == "__main__":
    from moelab.guard import run_guarded

    raise SystemExit(run_guarded(main))  # a bad flag: one "error: ..." line, exit status 2
