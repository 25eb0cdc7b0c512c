"""Which experts serve which traces: SeisMoE's per-token routing, tallied by a metadata column.

A mixture of experts is expected to pay where the data are heterogeneous -- traces pooled from
several networks, distance ranges, noise types, sampling rates -- by sending each kind of trace to
experts of its own. This module measures whether a trained model does: it runs the model over the
evaluation windows of one split (pick-benchmark's task 1 or task 2/3 windows, the ones the metrics
are computed on), one group of traces at a time -- a metadata column such as ``trace_domain`` of a
generated mixture (`moelab.seismic.synth.MIXTURES`), ``station_network_code`` or
``trace_category`` -- and reads every MoE layer's usage counters (`moelab.moe.ExpertUsage`) after
each group. Per layer it reports the share of the group's token assignments each expert received
and the normalised mutual information between group and expert
(`moelab.moe.stats.routing_mutual_information`: 0 = the routing ignores the group, 1 = the group
determines the expert), the counterpart of MoEFsDiC's class and timestep analysis
(`moelab.diffusion.analysis`).

``moelab seismic routing --model_path CKPT --config CFG --by trace_domain`` prints the table.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from moelab.errors import ConfigError, DataError
from moelab.moe import MoELayer, reset_moe_stats
from moelab.moe.stats import routing_mutual_information

#: Evaluation windows the routing is tallied over: task 2/3 (10 s around one P or S onset) or task 1
#: (30 s, earthquakes and noise).
TASKS: tuple[str, ...] = ("task23", "task1")


def trace_groups(metadata: pd.DataFrame, column: str) -> dict[str, str]:
    """``trace_name`` -> the value of ``column`` (as text), for every trace of ``metadata``."""
    if column not in metadata.columns:
        cols = ", ".join(c for c in metadata.columns if not c.startswith("trace_p") and not c.startswith("trace_s_"))
        raise ConfigError(f"the data set's metadata has no column '{column}'; group by one of: {cols}")
    values = metadata[column]
    if values.isna().any():
        raise DataError(f"{int(values.isna().sum())} traces have no '{column}' value; group by a column every trace has")
    return dict(zip(metadata["trace_name"], values.astype(str), strict=True))


@torch.no_grad()
def usage_by_group(
    module, split_ds, windows: pd.DataFrame, groups: Mapping[str, str], batch_size: int = 64, accelerator: str = "cpu"
) -> dict[str, dict[str, np.ndarray]]:
    """Token assignments per expert, per MoE layer and group: ``counts[layer][group]`` is ``[E]``.

    Args:
        module: a trained SeisMoE Lightning module (``module.model`` holds the MoE layers).
        split_ds: the SeisBench data set (one split) the windows are cut from.
        windows: evaluation windows of that split (a task 1 or task 2/3 targets frame).
        groups: ``trace_name`` -> group (`trace_groups`).
        batch_size / accelerator: as in evaluation.

    The model runs once over each group's windows, its usage counters cleared before each; they are
    cleared again at the end.
    """
    from moelab.seismic.evaluate import predict

    layers = {name: m for name, m in module.model.named_modules() if isinstance(m, MoELayer)}
    if not layers:
        raise ConfigError(f"{type(module.model).__name__} has no MoE layers: routing is only defined for SeisMoE checkpoints")
    missing = sorted(set(windows["trace_name"]) - set(groups))
    if missing:
        raise DataError(f"{len(missing)} windows name traces without a group (e.g. '{missing[0]}'): the windows and the metadata are of different data sets")
    labelled = windows.assign(_group=windows["trace_name"].map(groups))
    counts: dict[str, dict[str, np.ndarray]] = {name: {} for name in layers}
    module.eval()
    try:
        for group, sub in labelled.groupby("_group", sort=True):
            reset_moe_stats(module.model)
            predict(module, split_ds, sub.drop(columns="_group"), batch_size=batch_size, accelerator=accelerator)
            for name, layer in layers.items():
                counts[name][str(group)] = layer.usage.counts.cpu().numpy().copy()
    finally:
        reset_moe_stats(module.model)
    return counts


def routing_report(counts: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Per layer: groups, token assignments per group, expert shares per group (rows sum to 1) and
    overall, and the normalised mutual information between group and expert. JSON-able."""
    report = {}
    for layer, by_group in counts.items():
        groups = list(by_group)
        table = np.stack([np.asarray(by_group[g], dtype=np.int64) for g in groups])
        totals = table.sum(axis=1)
        shares = table / np.maximum(totals[:, None], 1)
        overall = table.sum(axis=0) / max(int(table.sum()), 1)
        report[layer] = {
            "groups": groups,
            "assignments": totals.tolist(),
            "shares": shares.round(4).tolist(),
            "overall": overall.round(4).tolist(),
            "mutual_information": routing_mutual_information(torch.as_tensor(table)),
        }
    return report


def format_routing_report(report: Mapping[str, Mapping[str, Any]], column: str) -> str:
    """One table per MoE layer: a row per group with its experts' shares, then the overall shares."""
    lines = []
    for layer, r in report.items():
        e = len(r["overall"])
        width = max([len(column), 7, *(len(g) for g in r["groups"])])
        lines.append(f"{layer}: expert shares of token assignments by {column} (normalised mutual information {r['mutual_information']:.3f})")
        lines.append(f"  {column:<{width}}  " + " ".join(f"{'e' + str(i):>6}" for i in range(e)) + "  assignments")
        for g, share, n in zip(r["groups"], r["shares"], r["assignments"], strict=True):
            lines.append(f"  {g:<{width}}  " + " ".join(f"{s:6.3f}" for s in share) + f"  {n}")
        lines.append(f"  {'overall':<{width}}  " + " ".join(f"{s:6.3f}" for s in r["overall"]))
    return "\n".join(lines)


def routing(
    cfg,
    model_path: str | Path,
    by: str = "trace_domain",
    split: str = "test",
    task: str = "task23",
    data_root: str | Path | None = None,
    targets: str | Path | None = None,
    batch_size: int | None = None,
    device: str | None = None,
) -> dict[str, dict[str, Any]]:
    """`routing_report` of a checkpoint over one split's evaluation windows of the config's data
    set, grouped by the metadata column ``by`` (the windows are those ``benchmark/eval.py`` scores:
    the same targets folder, generated when absent)."""
    from moelab.seismic.config import check_accelerator
    from moelab.seismic.data import open_dataset
    from moelab.seismic.harness import default_targets_dir, ensure_targets, load_for_eval, preflight

    check_accelerator(device)
    if task not in TASKS:
        raise ConfigError(f"task '{task}': use one of {', '.join(TASKS)}")
    if split not in ("train", "dev", "test"):
        raise ConfigError(f"split '{split}': use train, dev or test")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    module = load_for_eval(cfg, model_path)
    source = preflight(cfg, data_root, check_weights=False)
    ds = open_dataset(source, sampling_rate=cfg.sampling_rate)
    groups = trace_groups(ds.metadata, by)
    tg = ensure_targets(ds, Path(targets) if targets else default_targets_dir(cfg, source), seed=cfg.seed, in_samples=module.in_samples)
    windows = tg[task][tg[task]["trace_split"] == split]
    if len(windows) == 0:
        raise DataError(f"no {task} windows in the '{split}' split of {source.label}; pick another --split or --task")
    accelerator = "gpu" if device in ("gpu", "cuda") else "cpu"
    counts = usage_by_group(module, ds.get_split(split), windows, groups, batch_size=batch_size or cfg.batch_size, accelerator=accelerator)
    return routing_report(counts)
