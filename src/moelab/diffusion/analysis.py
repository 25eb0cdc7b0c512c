"""Which experts serve which classes and which noise levels: routing analysis of every MoE block.

Real held-out images are noised to timesteps drawn from equal-width buckets of the training
schedule and passed through the model with their labels (and, optionally, with the null class that
guidance uses). Every MoE layer's `last_routing` is tallied per (class, expert) and per
(timestep bucket, expert) into the core's `ExpertUsage` counters; the layer's own usage counters
give the load-balance figures (max/min expert share, normalised entropy). Results: CSV tables,
heatmap PNGs and a load-balance PNG, plus a JSON-able summary with the mutual information between
expert choice and class / timestep (0 = routing ignores it, 1 = routing determined by it).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moelab.errors import ConfigError
from moelab.moe import ExpertUsage, MoELayer, moe_usage, reset_moe_stats
from moelab.moe.stats import routing_mutual_information


@torch.no_grad()
def routing_analysis(
    model: nn.Module,
    config: dict,
    images: Tensor,
    labels: Tensor,
    buckets: int = 10,
    include_null: bool = True,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Tally the routing of every MoE block by class and by timestep bucket.

    Returns ``{"blocks": {name: {"by_class", "by_timestep", "load", "class_mi", "timestep_mi"}},
    "classes": [...], "buckets": [[t_lo, t_hi], ...]}`` (counts as nested lists).
    """
    from moelab.diffusion.noise import training_scheduler

    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
    if not layers:
        raise ConfigError("the model has no MoE blocks to analyse (moe.enabled is false or it is the dense baseline)")
    num_classes = config["model"]["num_classes"]
    sched = training_scheduler(config)
    n_t = int(sched.config.num_train_timesteps)
    if not 1 <= buckets <= n_t:
        raise ConfigError(f"buckets={buckets} must be between 1 and {n_t} (timestep buckets)")
    edges = [round(i * n_t / buckets) for i in range(buckets + 1)]
    rows = num_classes + (1 if include_null else 0)
    by_class = {n: [ExpertUsage(m.num_experts) for _ in range(rows)] for n, m in layers.items()}
    by_time = {n: [ExpertUsage(m.num_experts) for _ in range(buckets)] for n, m in layers.items()}

    was_training = model.training
    model.eval()
    reset_moe_stats(model)
    gen = torch.Generator().manual_seed(seed)
    labels = labels.long()
    try:
        for b in range(buckets):
            t_all = torch.randint(edges[b], max(edges[b + 1], edges[b] + 1), (images.shape[0],), generator=gen)
            noise_all = torch.randn(images.shape, generator=gen)
            for sl in torch.arange(images.shape[0]).split(batch_size):
                x0, y, t = images[sl].float(), labels[sl], t_all[sl]
                xt = sched.add_noise(x0, noise_all[sl], t)
                passes = [y] + ([torch.full_like(y, num_classes)] if include_null else [])
                for yy in passes:
                    model(xt, t, yy)
                    for name, layer in layers.items():
                        idx = layer.last_routing.indices  # type: ignore[union-attr]
                        by_time[name][b].update(idx)
                        for c in yy.unique().tolist():
                            by_class[name][c].update(idx[yy == c])
    finally:
        model.train(was_training)

    usage = moe_usage(model)
    blocks: dict[str, Any] = {}
    for name in layers:
        cls_counts = torch.stack([u.counts for u in by_class[name]])
        t_counts = torch.stack([u.counts for u in by_time[name]])
        blocks[name] = {
            "by_class": cls_counts.tolist(),
            "by_timestep": t_counts.tolist(),
            "load": usage[name],
            "class_mi": routing_mutual_information(cls_counts[:num_classes]),
            "timestep_mi": routing_mutual_information(t_counts),
        }
    class_names = [str(c) for c in range(num_classes)] + (["null"] if include_null else [])
    return {"blocks": blocks, "classes": class_names, "buckets": [[edges[i], edges[i + 1]] for i in range(buckets)]}


def _shares(counts: list[list[int]]) -> Tensor:
    c = torch.tensor(counts, dtype=torch.double)
    return c / c.sum(1, keepdim=True).clamp_min(1)


def write_routing_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """CSV tables and PNG figures of a `routing_analysis` result; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blocks, classes = report["blocks"], report["classes"]
    bucket_names = [f"{lo}-{hi - 1}" for lo, hi in report["buckets"]]
    paths: dict[str, Path] = {}

    def table(name: str, header: list[str], rows: list[list[Any]]) -> None:
        p = out / name
        with p.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
        paths[name] = p

    for key, row_names, fname, row_label in (
        ("by_class", classes, "routing_by_class", "class"),
        ("by_timestep", bucket_names, "routing_by_timestep", "timesteps"),
    ):
        rows = []
        for bname, blk in blocks.items():
            shares = _shares(blk[key])
            for r, rname in enumerate(row_names):
                for e, cnt in enumerate(blk[key][r]):
                    rows.append([bname, rname, e, cnt, round(float(shares[r, e]), 6)])
        table(f"{fname}.csv", ["block", row_label, "expert", "count", "share"], rows)

        n = len(blocks)
        cols = min(n, 4)
        nrows = math.ceil(n / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 0.32 * len(row_names) * nrows + 1.6 * nrows), squeeze=False)
        for ax, (bname, blk) in zip(axes.flat, blocks.items(), strict=False):
            shares = _shares(blk[key]).numpy()
            im = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-9, float(shares.max())))
            ax.set_title(bname, fontsize=8)
            ax.set_xlabel("expert", fontsize=8)
            ax.set_xticks(range(shares.shape[1]))
            ax.set_yticks(range(len(row_names)))
            ax.set_yticklabels(row_names, fontsize=6)
            ax.set_ylabel(row_label, fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle(f"share of routing assignments per {'timestep bucket' if key == 'by_timestep' else 'class'}", fontsize=10)
        fig.tight_layout()
        p = out / f"{fname}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths[p.name] = p

    lb_rows = []
    for bname, blk in blocks.items():
        ld = blk["load"]
        ratio = ld["max_share"] / ld["min_share"] if ld["min_share"] > 0 else float("inf")
        lb_rows.append([bname, ld["total"], round(ld["max_share"], 6), round(ld["min_share"], 6), round(ratio, 4),
                        round(ld["entropy"], 6), round(blk["class_mi"], 6), round(blk["timestep_mi"], 6)])
    table("load_balance.csv", ["block", "assignments", "max_share", "min_share", "max_min_ratio", "entropy", "class_mi", "timestep_mi"], lb_rows)

    names = list(blocks)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names) + 2), 3.6))
    xs = range(len(names))
    wd = 0.27
    ax.bar([x - wd for x in xs], [blocks[n]["load"]["max_share"] for n in names], wd, label="max expert share")
    ax.bar(list(xs), [blocks[n]["load"]["min_share"] for n in names], wd, label="min expert share")
    ax.bar([x + wd for x in xs], [blocks[n]["load"]["entropy"] for n in names], wd, label="entropy (1 = balanced)")
    e = next(iter(blocks.values()))["load"]
    if e["counts"]:
        ax.axhline(1.0 / len(e["counts"]), color="gray", ls="--", lw=0.8, label="uniform share 1/E")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.set_title("load balance per MoE block", fontsize=10)
    fig.tight_layout()
    p = out / "load_balance.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths[p.name] = p
    return paths


def format_load_table(report: dict[str, Any]) -> str:
    """Printed summary: one line per MoE block."""
    lines = [f"{'block':<28} {'max':>6} {'min':>6} {'entropy':>8} {'MI(class)':>10} {'MI(t)':>7}"]
    for name, blk in report["blocks"].items():
        ld = blk["load"]
        lines.append(
            f"{name:<28} {ld['max_share']:>6.3f} {ld['min_share']:>6.3f} {ld['entropy']:>8.3f} {blk['class_mi']:>10.3f} {blk['timestep_mi']:>7.3f}"
        )
    return "\n".join(lines)
