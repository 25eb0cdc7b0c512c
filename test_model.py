#!/usr/bin/env python
"""Quick-start model check: build every ablation config, run forward + backward, print sizes.

Each config is run at a small size (image 32, model_channels 32, batch 2) so this takes seconds
on a CPU; the parameter counts printed are those of the full-size configs. Exits non-zero on
any failure.
"""

import sys
import time
from pathlib import Path

try:
    import moelab  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

ROOT = Path(__file__).resolve().parent
CONFIGS = ["default", "no_moe", "no_freq", "no_dsconv", "moe_variants", "minimal"]
SMALL = {"model.image_size": 32, "model.model_channels": 32}


def check(name: str) -> None:
    import torch

    from moelab import MoEFsDiC_UNet, MoELoss
    from moelab.diffusion.config import load_config

    path = ROOT / "configs" / f"{name}.yaml"
    with torch.device("meta"):  # full-size counts without allocating the weights
        counts = MoEFsDiC_UNet(load_config(path)).parameter_counts()
    cfg = load_config(path, SMALL)
    torch.manual_seed(0)
    model = MoEFsDiC_UNet(cfg)
    m = cfg["model"]
    b = 2
    x = torch.randn(b, m["in_channels"], m["image_size"], m["image_size"])
    t = torch.randint(0, cfg["diffusion"]["num_train_timesteps"], (b,))
    c = torch.randint(0, m["num_classes"] + 1, (b,))
    t0 = time.perf_counter()
    noise_pred, moe_logits = model(x, t, c)
    if noise_pred.shape != x.shape:
        raise AssertionError(f"{name}: noise_pred shape {tuple(noise_pred.shape)} != input {tuple(x.shape)}")
    expected_blocks = counts["moe_blocks"]
    if len(moe_logits) != expected_blocks:
        raise AssertionError(f"{name}: {len(moe_logits)} moe_logits for {expected_blocks} MoE blocks")
    if any(lg.shape != (b, cfg["moe"]["num_experts"]) for lg in moe_logits):
        raise AssertionError(f"{name}: moe_logits shapes {[tuple(lg.shape) for lg in moe_logits]}")
    loss, dm_loss, load_loss = MoELoss.from_config(cfg)(noise_pred, torch.randn_like(x), moe_logits)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    if missing:
        raise AssertionError(f"{name}: no gradient for {missing[:3]}")
    if not torch.isfinite(loss):
        raise AssertionError(f"{name}: loss {loss}")
    dt = time.perf_counter() - t0
    print(
        f"{name:13s} OK  params {counts['total']:>12,}  active/sample {counts['active_per_sample']:>12,}  "
        f"MoE blocks {counts['moe_blocks']:2d}  | small run: loss {loss.item():.4f} (dm {dm_loss.item():.4f}, "
        f"load {load_loss.item():.4f}), fwd+bwd {dt:.2f}s"
    )


def main() -> int:
    failures = 0
    for name in CONFIGS:
        try:
            check(name)
        except Exception as e:  # report every config, then fail
            failures += 1
            print(f"{name:13s} FAILED: {type(e).__name__}: {e}")
    print("all configs passed" if not failures else f"{failures} config(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    from moelab.guard import run_guarded

    sys.exit(run_guarded(main))
