"""A finished `moelab.seismic.quality` run, broken down by a metadata column of its fine-tuning set.

Fine-tuned on data pooled from several sources -- a generated mixture (`moelab.seismic.synth.MIXTURES`),
or several networks -- SeisMoE could gain on some kinds of trace and lose on others while the pooled
figures stay level, and its experts could, or could not, specialise by source. This module answers
both from what the run left on disk, training nothing: per group of test traces, the fine-tuned
EQTransformer's and the headline SeisMoE's metrics at the thresholds tuned on the whole dev split
(`moelab.seismic.evaluate.metrics_by_group`), their paired differences over seeds with spread and 95%
interval (as the quality tables), and per SeisMoE seed the routing by group over the test windows
(`moelab.seismic.routing`: expert shares and the normalised mutual information of group and expert).

``python bench/seismoe_by_domain.py --out outputs/seismoe_mix --tag _mix`` writes
``OUT/by_<column><TAG>.md`` and prints it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from moelab.errors import ConfigError
from moelab.paired import interval_cell
from moelab.validation import read_json_record

FIX = "give the --out and --tag of a finished `moelab seismic quality` run (its results<TAG>.json)"


def run_folders(out: Path, doc: dict[str, Any], variant: str) -> dict[int, Path]:
    """seed -> weights folder of ``variant`` in a quality run's record. A merged record points at the
    runs it was merged from (``merged_from``), each with its own tag; they are looked up beside it."""
    from moelab.seismic.quality import run_name

    sources = []
    for p in doc["settings"].get("merged_from", []):
        path = Path(p) if Path(p).is_file() else out / Path(p).name
        sources.append(read_json_record(path, ("settings", "seeds_done"), FIX))
    folders = {}
    for src in sources or [doc]:
        for seed in src["seeds_done"]:
            folder = out / "weights" / run_name(variant, src["settings"].get("tag", ""), seed)
            if not folder.is_dir():
                raise ConfigError(f"'{folder}' is missing: the run's weights were moved or deleted; {FIX}")
            folders[seed] = folder
    return dict(sorted(folders.items()))


def breakdown(out: str | Path, tag: str = "", by: str = "trace_domain", routing: bool = True, echo: Callable[[str], None] = print) -> str:
    """Markdown tables of a quality run by ``by`` (see the module docstring); writes them to
    ``out/by_<by><tag>.md`` and returns them."""
    import pandas as pd

    from moelab.checkpoint import atomic_write_bytes
    from moelab.seismic.evaluate import metrics_by_group
    from moelab.seismic.quality import LOWER_IS_BETTER, METRICS, metric_of, spread_cell
    from moelab.seismic.routing import trace_groups

    out = Path(out)
    doc = read_json_record(out / f"results{tag}.json", ("settings", "seeds_done", "results"), FIX)
    settings = doc["settings"]
    b, headline = settings["domains"][1], settings["headline"]
    data = out / "data" / b
    if not (data / "metadata.csv").is_file():
        raise ConfigError(f"'{data}' holds no data set; {FIX}")
    groups = trace_groups(pd.read_csv(data / "metadata.csv", low_memory=False), by)
    folders = {v: run_folders(out, doc, v) for v in ("eqt_ft", headline)}
    seeds = sorted(set(folders["eqt_ft"]) & set(folders[headline]))
    from moelab.seismic.quality import eval_dir

    per = {v: {seed: metrics_by_group(eval_dir(folders[v][seed], b), groups) for seed in seeds} for v in folders}
    names = sorted(per["eqt_ft"][seeds[0]])

    def get(v: str, seed: int, g: str, m: str) -> float:
        return metric_of(per[v][seed].get(g, {}), m)

    head = "| group | model | " + " | ".join(f"test {m}" for m in METRICS) + " |\n|---|---|" + "---|" * len(METRICS) + "\n"
    lines = [
        f"Trained on {b}, tested on {b}, by {by} (seeds {seeds}; thresholds from the whole {b} dev split; "
        f"paired = {headline} minus eqt_ft on the same seed, mean ± std, then the 95% interval and verdict as in the quality tables)\n\n",
        head,
    ]
    for g in names:
        n = int(per["eqt_ft"][seeds[0]][g].get("test_P_n", 0))  # the same windows for every model and seed
        for v in ("eqt_ft", headline):
            lines.append(f"| {g} ({n} P windows) | {v} | " + " | ".join(spread_cell([get(v, seed, g, m) for seed in seeds]) for m in METRICS) + " |\n")
        diffs = {m: [get(headline, seed, g, m) - get("eqt_ft", seed, g, m) for seed in seeds] for m in METRICS}
        lines.append(f"| {g} | paired | " + " | ".join(spread_cell(diffs[m], signed=True) for m in METRICS) + " |\n")
        lines.append(f"| {g} | 95% interval | " + " | ".join(interval_cell(diffs[m], m in LOWER_IS_BETTER) for m in METRICS) + " |\n")
    if routing:
        lines.append(f"\nRouting of {headline} by {by} over the {b} test windows of tasks 2/3 (normalised mutual information "
                     "of group and expert per MoE layer: 0 = the routing ignores the group, 1 = the group determines the expert; "
                     "expert indices are not comparable across seeds)\n\n")
        lines.append(_routing_section(folders[headline], seeds, data, int(settings["in_samples"]), by, echo))
    text = "".join(lines)
    atomic_write_bytes(text.encode(), out / f"by_{by}{tag}.md")
    return text


def _routing_section(folders: dict[int, Path], seeds: list[int], data: Path, in_samples: int, by: str, echo) -> str:
    from moelab.seismic.config import load_config, validate
    from moelab.seismic.harness import BEST_NAME
    from moelab.seismic.quality import spread_cell
    from moelab.seismic.routing import format_routing_report, routing

    mis: list[list[float]] = []
    first = ""
    for seed in seeds:
        # the run's own config, pointed at the data folder beside its record (the path it recorded
        # may be relative to wherever the run was started), scored on the windows the run was
        cfg = validate({**load_config(folders[seed] / "config.json").raw, "data": str(data)}, source=str(folders[seed] / "config.json"))
        report = routing(cfg, folders[seed] / f"{BEST_NAME}.ckpt", by=by, split="test", task="task23", targets=data / f"targets_{in_samples}")
        mis.append([r["mutual_information"] for r in report.values()])
        echo(f"routing seed {seed}: " + " ".join(f"{layer} MI {r['mutual_information']:.3f}" for layer, r in report.items()))
        if not first:
            first = f"Seed {seed}:\n\n```\n{format_routing_report(report, by)}\n```\n"
    layers = list(report)
    rows = "| seed | " + " | ".join(f"{layer} MI" for layer in layers) + " |\n|---|" + "---|" * len(layers) + "\n"
    rows += "".join(f"| {seed} | " + " | ".join(f"{x:.3f}" for x in mi) + " |\n" for seed, mi in zip(seeds, mis, strict=True))
    rows += "| mean ± std | " + " | ".join(spread_cell([mi[i] for mi in mis]) for i in range(len(layers))) + " |\n\n"
    return rows + first
