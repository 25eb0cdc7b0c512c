"""Does SeisMoE earn its experts? The user guide's upcycle-and-fine-tune workflow, measured over seeds.

The guide's promise: take an EQTransformer pretrained on a large data set (STEAD), upcycle its
feed-forward layers into experts and fine-tune on a new data set (ETHZ, only the MoE layers
training), and SeisMoE picks at least as well as EQTransformer fine-tuned the same way. This module
runs exactly that on three generated domains (`moelab.seismic.synth.DOMAINS`), through the
benchmark harness (`moelab.seismic.harness.train` / `evaluate`, the python API of
benchmark/train.py and eval.py), so nothing here is a second trainer or evaluator:

1. ``base``: EQTransformer trained from scratch on domain A (``stead_like``), the "pretrained" model;
2. on domain B (``ethz_like``), for every seed: ``eqt_ft`` (EQTransformer fine-tuned from the base),
   ``eqt_ffn`` (EQTransformer fine-tuned from the base with only its two transformer feed-forward
   networks training: the dense control of ``moe_frozen``, the same frozen trunk with one dense FFN
   where SeisMoE has experts), ``moe_frozen`` (SeisMoE upcycled from the base, ``freeze_non_moe``: the guide's ETHZ recipe),
   ``moe_full`` (upcycled, everything trains) and ``moe_scratch`` (SeisMoE from random weights);
3. every model is scored on pick-benchmark's tasks 1/2/3 with thresholds chosen on the dev split
   of the data set it is tested on; in-domain on B, cross-domain on A and C (``geofon_like``,
   P-only, stored at 20 Hz);
4. every model picks ObsPy's real test event (`moelab.seismic.realcheck`) at the thresholds tuned
   on the dev split of its training domain, as ``moelab seismic pick`` does on exported weights:
   a check on real data, which no generated test split can give.

The summary gives mean ± std over seeds per variant, the in-domain differences to ``eqt_ft`` paired
by seed (and ``moe_frozen`` − ``eqt_ffn``, the guide's recipe against its dense control) (every variant of seed i is trained with seed i from the same base; the spread of the
per-seed differences holds both models' seed noise and is what a difference has to exceed; a 95%
Student-t interval of the mean difference and a verdict per metric follow), and the last line
compares the headline
SeisMoE variant with ``eqt_ft`` (differences / ratios of the means over seeds, in-domain test):
``seismoe_quality: mcc moe-eqt=<±x.xxx> p_mae moe/eqt=<x.xx> s_mae moe/eqt=<x.xx> det_auc moe-eqt=<±x.xxx>``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from moelab.errors import ConfigError
from moelab.validation import at_least_one, check_output, read_json_record
from moelab.paired import interval_cell, mean_std
from moelab.seismic.config import LR_SCHEDULES

log = logging.getLogger(__name__)

#: Fine-tuning variants on domain B, in table order.
VARIANTS: tuple[str, ...] = ("eqt_ft", "eqt_ffn", "moe_frozen", "moe_full", "moe_scratch")
#: Variants that do not depend on ``moe_args``: never tagged, shared by every lever run in a folder.
DENSE_VARIANTS: tuple[str, ...] = ("eqt_ft", "eqt_ffn")
#: Reported metrics (harness.evaluate keys without the split prefix).
METRICS: tuple[str, ...] = ("det_auc", "phase_mcc", "P_mae_s", "S_mae_s")
#: Trainer settings of every run: no progress bar or sanity check (logs go to the CSV logger).
QUIET: dict[str, Any] = {"enable_progress_bar": False, "num_sanity_val_steps": 0, "enable_model_summary": False}


@dataclass
class QualitySettings:
    """Size and recipe of one quality run; every field maps onto a harness config key.

    Args:
        out: working folder (data sets, weights, tables).
        seeds: training seeds of the domain-B variants (the base and the data sets are fixed).
        domains: (A, B, C): pretraining domain, fine-tuning domain, extra cross-domain test.
        traces: traces per generated domain (70/15/15 train/dev/test).
        trace_seconds: length of every generated trace.
        data_seed: seed of the generated data sets.
        in_samples: model window at 100 Hz (pick-benchmark: 6000).
        sigma: width of the P/S label Gaussians in samples.
        batch_size: traces per batch.
        base_epochs / base_lr: training of the pretrained EQTransformer on A.
        ft_epochs / ft_lr: fine-tuning on B (also SeisMoE from scratch, at ``base_lr``).
        ft_schedule: the ``lr_schedule`` of every run on B: ``"constant"`` (pick-benchmark's, the
            runs before it), ``"linear"`` or ``"cosine"`` (the rate falls to 0 at the last step).
        moe_args: SeisMoE model_args of every SeisMoE variant (the levers: num_experts,
            num_experts_per_token, moe_loss_coef, detach_router_input, router_jitter, gate, ...).
        variants: which of `VARIANTS` to run (``eqt_ft`` is needed for the last line).
        headline: the SeisMoE variant the last line compares with ``eqt_ft``.
        base_seed: seed of the base training.
        base_redo: recycle the base's dormant decoder channels every this many steps (the
            ``redo_every`` model argument, `moelab.seismic.dormant`); None: never (the runs
            before it). A base whose P head has no live channel raising its logit caps every
            model fine-tuned from it near 0.5 (`moelab.seismic.heads`).
        base_prior: the base's ``head_prior`` (its P and S heads start at this output); None:
            PyTorch's default initialisation (the runs before it).
        tag: suffix of the SeisMoE runs and of the tables (``moe_frozen<tag>_s0``,
            ``quality<tag>.md``, ``results<tag>.json``), so that lever variants (other
            ``moe_args``) run in the same folder, reusing its data, base and dense
            (``eqt_ft``, ``eqt_ffn``) models instead of overwriting them; ``""`` (default): the
            plain names.
    """

    out: Path = Path("outputs/seismoe_quality")
    seeds: tuple[int, ...] = (0, 1, 2)
    domains: tuple[str, str, str] = ("stead_like", "ethz_like", "geofon_like")
    traces: int = 1200
    trace_seconds: float = 60.0
    data_seed: int = 0
    in_samples: int = 3001
    sigma: float = 20.0
    batch_size: int = 32
    base_epochs: int = 20
    base_lr: float = 1e-3
    ft_epochs: int = 8
    ft_lr: float = 5e-4
    ft_schedule: str = "constant"
    moe_args: dict[str, Any] = field(default_factory=lambda: {"num_experts": 4, "num_experts_per_token": 2, "moe_loss_coef": 0.02})
    variants: tuple[str, ...] = VARIANTS
    headline: str = "moe_frozen"
    base_seed: int = 0
    base_redo: int | None = None
    base_prior: float | None = None
    tag: str = ""

    def check(self) -> None:
        from moelab.seismic.synth import get_components

        for d in self.domains:
            get_components(d)  # a preset or a mixture name, else one error naming the choices
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
        if "eqt_ft" not in self.variants or self.headline not in self.variants:
            raise ConfigError(f"variants must include eqt_ft and the headline '{self.headline}' (the last line compares them)")
        if not self.headline.startswith("moe_"):
            raise ConfigError(f"headline must be a SeisMoE variant ({', '.join(v for v in VARIANTS if v.startswith('moe_'))}), got '{self.headline}'")
        if not self.seeds:
            raise ConfigError("seeds is empty; give at least one training seed")
        if self.trace_seconds * 100 < self.in_samples:
            raise ConfigError(f"trace_seconds={self.trace_seconds} is shorter than the model window in_samples={self.in_samples} at 100 Hz")
        if min(self.base_epochs, self.ft_epochs, self.traces, self.batch_size) < 1:
            raise ConfigError("base_epochs, ft_epochs, traces and batch_size must all be >= 1")
        if self.tag and not all(c.isalnum() or c in "-_." for c in self.tag):
            raise ConfigError(f"tag '{self.tag}' may hold only letters, digits, '-', '_' and '.' (it becomes part of folder and file names)")
        if not isinstance(self.moe_args, dict):
            raise ConfigError(f"--moe-args must be a JSON object of SeisMoE model_args, e.g. '{{\"num_experts\": 8}}', got {json.dumps(self.moe_args)}")
        check_output("--out", self.out, folder=True)
        from moelab.seismic.config import validate

        # every run's config, before any data is generated or model trained (placeholder paths)
        data = self.out / "data" / self.domains[1]
        validate(base_config(self, data), source="base_eqt (--base-redo, --base-lr, ...)")
        for v in self.variants:
            validate(variant_config(self, v, self.out / "base.ckpt", data, self.seeds[0]), source=f"variant {v} (--moe-args, --ft-lr, ...)")


# --------------------------------------------------------------------------------- building blocks
def make_domains(s: QualitySettings) -> dict[str, Path]:
    """Generate the three domain data sets under ``out/data/`` (kept when already there)."""
    from moelab.seismic.synth import domain_sampling_rate, make_dataset

    paths = {}
    for d in s.domains:
        path = s.out / "data" / d
        if not (path / "metadata.csv").exists():
            n = int(round(s.trace_seconds * domain_sampling_rate(d)))
            make_dataset(path, n_traces=s.traces, seed=s.data_seed, n_samples=n, domain=d, overwrite=True)
        paths[d] = path
    return paths


def _config(s: QualitySettings, name: str, model: str, data: Path, seed: int, epochs: int, model_args: dict[str, Any]) -> dict[str, Any]:
    margs = {"lr": s.base_lr, "sigma": s.sigma, "in_samples": s.in_samples, **model_args}
    if "geofon" in data.name:  # P-only picks: pick-benchmark's fixed detection window
        margs.setdefault("detection_fixed_window", 2000)
    return {"model": model, "data": str(data), "name": name, "model_args": margs, "batch_size": s.batch_size, "max_epochs": epochs, "seed": seed}


def differing_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two configs or settings, sorted, then, where both values
    are dicts (``model_args``, ``moe_args``), the inner keys that differ, as ``outer.inner``."""
    flat, nested = [], []
    for k in sorted(a.keys() | b.keys()):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            nested += [f"{k}.{inner}" for inner in differing_keys(x, y)]
        elif x != y:
            flat.append(k)
    return flat + nested


def run_state(folder: Path, raw: dict[str, Any]) -> tuple[str, Path | None]:
    """Whether the run of config ``raw`` in ``folder`` is ``done`` (its best checkpoint, to reuse),
    ``stopped`` before its last epoch (its ``last.ckpt``, to resume) or to ``train`` (no run yet);
    a folder holding a run of another config is a `ConfigError`, not overwritten. A run killed
    mid-training leaves a best checkpoint of its first epochs; reusing it as finished would score
    an undertrained model."""
    from moelab.checkpoint import safe_load
    from moelab.seismic.harness import BEST_NAME, LAST_NAME

    config = folder / "config.json"
    if not config.is_file():
        return "train", None
    fix = f"move the folder '{folder}' away (or delete it) to train this run anew"
    written = read_json_record(config, (), fix)
    if written != raw:  # another recipe (--ft-lr, --ft-schedule, ...): never train over a finished run
        keys = ", ".join(differing_keys(written, raw))
        raise ConfigError(f"'{folder}' holds a run of another config (it differs in {keys}); give this recipe its own --out, or {fix}")
    best, last = folder / f"{BEST_NAME}.ckpt", folder / f"{LAST_NAME}.ckpt"
    if last.is_file():
        epochs_done = int(safe_load(last).get("epoch", -1)) + 1
        if epochs_done < int(raw.get("max_epochs", 0)):
            return "stopped", last
    return ("done", best) if best.is_file() else ("train", None)


def heads_line(stats: dict[str, float]) -> str:
    """The evaluation's look at the output heads (`moelab.seismic.heads`, on dev event windows of the
    domain ``stats`` were scored on), one line."""
    from moelab.seismic.heads import healths_from_stats

    return "; ".join(h.format() for h in healths_from_stats(stats)) or "heads: not looked at (no dev window with a P pick)"


def base_config(s: QualitySettings, data: Path) -> dict[str, Any]:
    """Harness config of the base EQTransformer trained from scratch on domain A."""
    extra = {key: value for key, value in (("redo_every", s.base_redo), ("head_prior", s.base_prior)) if value is not None}
    return _config(s, "base_eqt", "EQTransformer", data, s.base_seed, s.base_epochs, {"base_model": None, **extra})


def run_name(variant: str, tag: str, seed: int) -> str:
    """Folder name (under ``out/weights``) of one variant's run: the dense variants are shared by
    every ``--tag`` of a folder, the SeisMoE ones carry it."""
    return f"{variant}_s{seed}" if variant in DENSE_VARIANTS else f"{variant}{tag}_s{seed}"


def variant_config(s: QualitySettings, variant: str, base_ckpt: Path, data: Path, seed: int) -> dict[str, Any]:
    """Harness config of one domain-B variant (what benchmark/train.py would be given)."""
    cfg = _variant_config(s, variant, str(base_ckpt), data, seed)
    if s.ft_schedule != "constant":  # absent otherwise, so the configs of earlier runs still match
        cfg["model_args"]["lr_schedule"] = s.ft_schedule
    return cfg


def _variant_config(s: QualitySettings, variant: str, base: str, data: Path, seed: int) -> dict[str, Any]:
    moe = dict(s.moe_args)
    name = run_name(variant, s.tag, seed)
    if variant == "eqt_ft":
        return _config(s, name, "EQTransformer", data, seed, s.ft_epochs, {"base_model": base, "lr": s.ft_lr})
    if variant == "eqt_ffn":
        return _config(s, name, "EQTransformer", data, seed, s.ft_epochs, {"base_model": base, "freeze_non_ffn": True, "lr": s.ft_lr})
    if variant == "moe_frozen":
        return _config(s, name, "SeisMoE", data, seed, s.ft_epochs, {**moe, "base_model": base, "freeze_non_moe": True, "lr": s.ft_lr})
    if variant == "moe_full":
        return _config(s, name, "SeisMoE", data, seed, s.ft_epochs, {**moe, "base_model": base, "freeze_non_moe": False, "lr": s.ft_lr})
    if variant == "moe_scratch":
        return _config(s, name, "SeisMoE", data, seed, s.ft_epochs, {**moe, "base_model": None, "lr": s.base_lr})
    raise ConfigError(f"unknown variant '{variant}'; choose from {', '.join(VARIANTS)}")


def evaluate_on(raw: dict[str, Any], ckpt: Path, data: Path, out: Path, in_samples: int) -> dict[str, float]:
    """Score a checkpoint on another data set with the harness (thresholds from that set's dev split)."""
    from moelab.seismic import harness
    from moelab.seismic.config import validate

    cfg = validate({**raw, "data": str(data), "model_args": {k: v for k, v in raw["model_args"].items() if k != "detection_fixed_window"}})
    stats, _ = harness.evaluate(cfg, ckpt, targets=data / f"targets_{in_samples}", output=out)
    return stats


def metric_of(stats: dict[str, float], metric: str) -> float:
    """A test metric, NaN when the task has no windows (no S picks on a P-only domain: no phase MCC)."""
    if metric.startswith("phase_") and not stats.get("test_S_n"):
        return float("nan")
    return float(stats.get(f"test_{metric}", float("nan")))


def spread_cell(values: list[float], signed: bool = False) -> str:
    """``mean ± std`` of ``values`` to three decimals (the mean alone for one value; n/a for none)."""
    m, sd = mean_std(values)
    if math.isnan(m):
        return "n/a"
    mean = f"{m:+.3f}" if signed else f"{m:.3f}"
    return mean if len(values) == 1 else f"{mean} ± {sd:.3f}"  # one run (the base): no spread to show


def summary_line(results: dict[str, dict[str, list[dict[str, float]]]], headline: str, domain: str) -> str:
    """The last line: headline SeisMoE vs fine-tuned EQTransformer, means over seeds, in-domain test."""

    def mean(variant: str, metric: str) -> float:
        return mean_std([metric_of(r, metric) for r in results[variant][domain]])[0]

    mcc = mean(headline, "phase_mcc") - mean("eqt_ft", "phase_mcc")
    p = mean(headline, "P_mae_s") / mean("eqt_ft", "P_mae_s")
    s_ = mean(headline, "S_mae_s") / mean("eqt_ft", "S_mae_s")
    auc = mean(headline, "det_auc") - mean("eqt_ft", "det_auc")
    return f"seismoe_quality: mcc moe-eqt={mcc:+.3f} p_mae moe/eqt={p:.2f} s_mae moe/eqt={s_:.2f} det_auc moe-eqt={auc:+.3f}"


def paired_differences(
    results: dict[str, dict[str, list[dict[str, float]]]], variant: str, domain: str, metric: str, reference: str = "eqt_ft"
) -> list[float]:
    """``variant`` minus ``reference`` on ``metric``, seed by seed (run i of each was trained with the
    same seed and, for the fine-tuned variants, from the same base). Their spread holds the seed noise
    of both models: what a difference has to exceed to be more than noise."""
    pairs = zip(results[variant][domain], results[reference][domain], strict=True)
    return [metric_of(r, metric) - metric_of(e, metric) for r, e in pairs]


#: Metrics where a lower value is better (the rest: higher is better).
LOWER_IS_BETTER: tuple[str, ...] = ("P_mae_s", "S_mae_s")


def format_tables(s: QualitySettings, results: dict[str, dict[str, list[dict[str, float]]]], base: dict[str, dict[str, float]]) -> str:
    """Markdown tables: in-domain (B) per variant, the in-domain differences to ``eqt_ft`` paired by
    seed, then cross-domain (trained on B, tested on A and C)."""
    a, b, c = s.domains
    head = "| model | " + " | ".join(f"test {m}" for m in METRICS) + " |\n|---|" + "---|" * len(METRICS) + "\n"
    lines = [f"In-domain: trained on {b}, tested on {b} (mean ± std over seeds {list(s.seeds)}; thresholds from {b} dev)\n", head]
    lines.append(f"| base EQTransformer ({a} only, not fine-tuned) | " + " | ".join(spread_cell([metric_of(base[b], m)]) for m in METRICS) + " |\n")
    for v in s.variants:
        lines.append(f"| {v} | " + " | ".join(spread_cell([metric_of(r, m) for r in results[v][b]]) for m in METRICS) + " |\n")
    moe = [v for v in s.variants if v != "eqt_ft"]
    if moe:
        # The spread of the per-seed difference is the spread of the comparison itself.
        lines.append(f"\nIn-domain, paired by seed: variant minus eqt_ft on the same seed (mean ± std of the {len(s.seeds)} differences)\n\n")
        lines.append(head.replace("| model |", "| variant − eqt_ft |"))
        for v in moe:
            lines.append(f"| {v} | " + " | ".join(spread_cell(paired_differences(results, v, b, m), signed=True) for m in METRICS) + " |\n")
        lines.append(
            f"\n95% confidence interval of the mean paired difference (Student t, {len(s.seeds) - 1} degrees of freedom) and the"
            " verdict: better/worse by 'spread' = |mean| > std of the differences as printed (the issue's goal), 'CI' = the"
            " interval excludes 0, else level; MAE lower is better\n\n"
        )
        lines.append(head.replace("| model |", "| variant − eqt_ft |"))
        for v in moe:
            lines.append(f"| {v} | " + " | ".join(interval_cell(paired_differences(results, v, b, m), m in LOWER_IS_BETTER) for m in METRICS) + " |\n")
    if "eqt_ffn" in s.variants and "moe_frozen" in s.variants:
        # The guide's recipe against its dense control: the same trunk frozen, experts vs one FFN.
        lines.append(f"\nIn-domain, paired by seed: moe_frozen minus eqt_ffn (only the FFN / MoE layers trained; mean ± std of the {len(s.seeds)} differences)\n\n")
        lines.append(head.replace("| model |", "| variant − eqt_ffn |"))
        lines.append("| moe_frozen | " + " | ".join(spread_cell(paired_differences(results, "moe_frozen", b, m, "eqt_ffn"), signed=True) for m in METRICS) + " |\n")
    for d in (a, c):
        lines.append(f"\nCross-domain: trained on {b}, tested on {d} (thresholds from {d} dev)\n\n")
        lines.append(head)
        lines.append(f"| base EQTransformer (trained on {a}) | " + " | ".join(spread_cell([metric_of(base[d], m)]) for m in METRICS) + " |\n")
        for v in s.variants:
            lines.append(f"| {v} | " + " | ".join(spread_cell([metric_of(r, m) for r in results[v][d]]) for m in METRICS) + " |\n")
    return "".join(lines)


def eval_dir(run: Path, domain: str) -> Path:
    """Where a run's evaluation on ``domain`` is written (its ``results.csv`` holds the thresholds
    tuned on that domain's dev split): ``<run folder>/eval_<domain>``."""
    return run / f"eval_{domain}"


def real_event(ckpt: Path, eval_dir: Path) -> dict[str, Any]:
    """ObsPy's real event picked by ``ckpt`` at the thresholds its evaluation in ``eval_dir`` tuned on
    dev (what ``moelab seismic pick`` prints for the exported model): the issue's real-signal check."""
    from moelab.seismic.realcheck import pick_with_tuned_thresholds

    return asdict(pick_with_tuned_thresholds(ckpt, eval_dir / "results.csv"))


def _residual(value: float | None) -> str:
    return "none" if value is None else f"{value:+.3f}"


def pick_cell(report: dict[str, Any]) -> str:
    """``P / S`` residuals; a missing pick shows where its probability peaked and how high, so a
    phase just under the threshold reads differently from one the model never saw."""
    from moelab.seismic.realcheck import REFERENCE_P_S, REFERENCE_S_S

    def one(phase: str, ref: float) -> str:
        res, peak = report.get(f"{phase}_residual_s"), report.get(f"{phase}_peak_s")
        if res is not None or peak is None:
            return _residual(res)
        return f"none (peak {peak - ref:+.3f}, p {report[f'max_{phase}_prob']:.2f})"

    return f"{one('p', REFERENCE_P_S)} / {one('s', REFERENCE_S_S)}"


def real_event_passes(report: dict[str, Any]) -> bool:
    from moelab.seismic.realcheck import both_within

    return both_within(report.get("p_residual_s"), report.get("s_residual_s"))


def real_event_line(real: dict[str, Any], variants: tuple[str, ...] | list[str]) -> str:
    """One line: on how many seeds each model picks both phases of the real event within tolerance."""
    from moelab.seismic.realcheck import TOLERANCE_S

    parts = [f"{v} {sum(map(real_event_passes, real['variants'][v]))}/{len(real['variants'][v])} seeds" for v in variants]
    base = "yes" if real_event_passes(real["base"]) else "no"
    return f"real_event: P and S within {TOLERANCE_S} s of the reference: " + ", ".join(parts) + f" (base: {base})"


def format_real_event(s: QualitySettings, real: dict[str, Any]) -> str:
    """Markdown table of the real-event check: residual of the best P / S pick per model and seed."""
    from moelab.seismic.realcheck import RECORDING, REFERENCE_P_S, REFERENCE_S_S, TOLERANCE_S

    a, b, _ = s.domains
    lines = [
        f"\nReal event ({RECORDING}, ObsPy's AR-picker reference P {REFERENCE_P_S:.3f} s, S {REFERENCE_S_S:.3f} s): residual (s) of"
        f" the best P / S pick, as `moelab seismic pick` prints it for the exported model (thresholds tuned on {b} dev; the base's on {a} dev)\n\n",
        "| model | " + " | ".join(f"seed {seed}" for seed in s.seeds) + f" | both within {TOLERANCE_S} s |\n",
        "|---|" + "---|" * (len(s.seeds) + 1) + "\n",
    ]
    base = real["base"]
    lines.append(f"| base EQTransformer ({a}) | {pick_cell(base)} |"
                 + " |" * (len(s.seeds) - 1) + f" {'yes' if real_event_passes(base) else 'no'} |\n")
    for v in s.variants:
        reps = real["variants"][v]
        cells = " | ".join(pick_cell(r) for r in reps)
        lines.append(f"| {v} | {cells} | {sum(map(real_event_passes, reps))} of {len(reps)} |\n")
    return "".join(lines)


# ----------------------------------------------------------------------------------------- the run
def run(s: QualitySettings, echo: Callable[[str], None] = print) -> str:
    """Run the whole workflow; writes ``out/results.json`` and ``out/quality.md``; returns the last line."""
    from moelab.seismic import harness
    from moelab.seismic.config import validate
    from moelab.seismic.realcheck import recording_files

    s.check()
    recording_files()  # the real-event check's recording: missing ObsPy test data fails here, before any training
    s.out.mkdir(parents=True, exist_ok=True)
    data = make_domains(s)
    a, b, c = s.domains
    weights = s.out / "weights"

    def train(raw: dict[str, Any]) -> Path:
        cfg = validate(raw, source=raw["name"])
        state, ckpt = run_state(weights / cfg.experiment_name, raw)
        if state == "done":
            echo(f"{raw['name']}: reusing {ckpt}")
            return ckpt
        if state == "stopped":  # a run stopped early continues where it stopped, never counts as done
            echo(f"{raw['name']}: resuming {ckpt}")
            return harness.train(cfg, weights_dir=weights, resume=ckpt, trainer_overrides=QUIET)
        return harness.train(cfg, weights_dir=weights, trainer_overrides=QUIET)

    def score(raw: dict[str, Any], ckpt: Path) -> dict[str, dict[str, float]]:
        return {d: evaluate_on(raw, ckpt, data[d], eval_dir(ckpt.parent, d), s.in_samples) for d in (a, b, c)}

    def check_real(ckpt: Path, domain: str, stats: dict[str, float]) -> dict[str, Any]:
        report = real_event(ckpt, eval_dir(ckpt.parent, domain))
        echo(f"  real event, P / S residual (s): {pick_cell(report)}")
        echo("  " + heads_line(stats))
        return report

    base_raw = base_config(s, data[a])
    base_ckpt = train(base_raw)
    base = score(base_raw, base_ckpt)
    echo(f"base EQTransformer on {a}: " + "  ".join(f"{d}: " + " ".join(f"{m} {metric_of(base[d], m):.3f}" for m in METRICS) for d in (a, b, c)))
    real: dict[str, Any] = {"base": check_real(base_ckpt, a, base[a]), "variants": {v: [] for v in s.variants}}

    results: dict[str, dict[str, list[dict[str, float]]]] = {v: {d: [] for d in (a, b, c)} for v in s.variants}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()}

    def write(seeds_done: list[int]) -> tuple[str, str]:
        # after every seed, so that a run stopped early still leaves the table of its complete seeds
        done = QualitySettings(**{**asdict(s), "seeds": tuple(seeds_done)})
        return write_outputs(done, settings, base, results, real)

    for i, seed in enumerate(s.seeds):
        for v in s.variants:
            raw = variant_config(s, v, base_ckpt, data[b], seed)
            ckpt = train(raw)
            stats = score(raw, ckpt)
            for d in (a, b, c):
                results[v][d].append(stats[d])
            echo(f"{v:<12} seed {seed}: {b} " + " ".join(f"{m} {metric_of(stats[b], m):.3f}" for m in METRICS))
            real["variants"][v].append(check_real(ckpt, b, stats[b]))
        tables, last = write(list(s.seeds[: i + 1]))
    echo("\n" + tables)
    return last


def write_outputs(
    done: QualitySettings,
    settings: dict[str, Any],
    base: dict[str, dict[str, float]],
    results: dict[str, dict[str, list[dict[str, float]]]],
    real: dict[str, Any] | None = None,
) -> tuple[str, str]:
    """Write ``results<tag>.json`` (``settings`` as recorded, the seeds of ``done``) and
    ``quality<tag>.md`` into ``done.out``, atomically; return the tables and the last line.

    ``real``: the real-event check (``{"base": report, "variants": {variant: [report per seed]}}``),
    tabled after the cross-domain tables with its own summary line just above the last line;
    ``None`` for results recorded before the benchmark made the check."""
    from moelab.checkpoint import atomic_write_bytes

    tables = format_tables(done, results, base)
    if real is not None:
        tables += format_real_event(done, real) + "\n" + real_event_line(real, done.variants) + "\n"
    last = summary_line(results, done.headline, done.domains[1])
    doc = {"settings": settings, "seeds_done": list(done.seeds), "base": base, "results": results}
    if real is not None:
        doc["real_event"] = real
    atomic_write_bytes(json.dumps(doc, indent=1).encode(), done.out / f"results{done.tag}.json")
    atomic_write_bytes((tables + "\n" + last + "\n").encode(), done.out / f"quality{done.tag}.md")
    return tables, last


def same_scores(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> bool:
    """Whether two runs' scores of one model agree on every domain and every metric both recorded
    (NaN equal to NaN): runs written before the evaluation added a metric (the heads' columns)
    still merge with later ones of the same model."""

    def equal(x: float, y: float) -> bool:
        return x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))

    if a.keys() != b.keys():
        return False
    return all((common := a[d].keys() & b[d].keys()) and all(equal(a[d][k], b[d][k]) for k in common) for d in a)


def merge(paths: list[Path], out: Path, tag: str) -> str:
    """Combine ``results*.json`` files of runs that differ only in their seeds (and tag) -- e.g. two
    processes of the same settings on disjoint seeds, one per core -- into ``out/results<tag>.json``
    and ``out/quality<tag>.md``, seeds in ascending order; returns the last line.

    The runs must agree on every setting but ``seeds``/``tag`` and on the base model's scores (same
    data, same base), and no seed may appear twice: otherwise a `ConfigError` names the difference.
    """
    fix = "give results*.json files written by this benchmark"
    docs = [read_json_record(path, ("settings", "seeds_done", "base", "results"), fix) for path in paths]
    ignore = {"seeds", "tag", "out", "merged_from"}
    # a setting that a run's file lacks came after it: that run had the setting's default (e.g.
    # ft_schedule "constant"), so it still merges with later runs of the default
    defaults = {f.name: f.default for f in fields(QualitySettings) if f.default is not MISSING}

    def settings(doc: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in {**defaults, **doc["settings"]}.items() if k not in ignore}

    first = settings(docs[0])
    for path, doc in zip(paths[1:], docs[1:], strict=True):
        other = settings(doc)
        diff = differing_keys(first, other)
        if diff:
            raise ConfigError(f"{path} was run with other settings than {paths[0]} ({', '.join(diff)}); only runs that differ in seeds can be merged")
        if not same_scores(doc["base"], docs[0]["base"]):
            raise ConfigError(f"{path} scored another base model than {paths[0]}; merge only runs of the same folder and base")
    seeds = [seed for doc in docs for seed in doc["seeds_done"]]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seed(s) {sorted({x for x in seeds if seeds.count(x) > 1})} appear in more than one results file; merge runs of disjoint seeds")
    # (seed, variant, domain) -> stats, then back into per-variant lists in ascending seed order
    per_seed: dict[int, dict[str, dict[str, dict[str, float]]]] = {}
    for doc in docs:
        for i, seed in enumerate(doc["seeds_done"]):
            per_seed[seed] = {v: {d: stats[i] for d, stats in by_domain.items()} for v, by_domain in doc["results"].items()}
    order = sorted(per_seed)
    variants = list(docs[0]["results"])
    domains = list(docs[0]["results"][variants[0]])
    results = {v: {d: [per_seed[seed][v][d] for seed in order] for d in domains} for v in variants}
    real = None
    if all("real_event" in doc for doc in docs):  # results of older runs hold no real-event check
        by_seed = {seed: {v: reps[i] for v, reps in doc["real_event"]["variants"].items()} for doc in docs for i, seed in enumerate(doc["seeds_done"])}
        real = {"base": docs[0]["real_event"]["base"], "variants": {v: [by_seed[seed][v] for seed in order] for v in variants}}
    raw = {k: v for k, v in docs[0]["settings"].items() if k in {f.name for f in fields(QualitySettings)}}  # not e.g. merged_from
    settings = QualitySettings(**{**raw, "out": Path(out), "seeds": tuple(order), "tag": tag, "domains": tuple(raw["domains"]),
                                  "variants": tuple(raw["variants"])})
    recorded = {**raw, "out": str(out), "seeds": order, "tag": tag, "merged_from": [str(p) for p in paths]}
    Path(out).mkdir(parents=True, exist_ok=True)
    tables, last = write_outputs(settings, recorded, docs[0]["base"], results, real)
    print(tables)
    return last


def add_args(p: Any) -> Any:
    """Command-line flags of `QualitySettings` (bench/seismoe_quality.py and `moelab seismic quality`)."""
    d = QualitySettings()
    p.add_argument("--out", default=str(d.out), help="working folder (data, weights, quality.md, results.json)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    p.add_argument("--domains", nargs=3, default=list(d.domains), metavar=("A", "B", "C"), help="pretraining, fine-tuning and extra test domain")
    p.add_argument("--traces", type=int, default=d.traces, help="traces per domain")
    p.add_argument("--trace-seconds", type=float, default=d.trace_seconds)
    p.add_argument("--data-seed", type=int, default=d.data_seed)
    p.add_argument("--in-samples", type=int, default=d.in_samples)
    p.add_argument("--sigma", type=float, default=d.sigma)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--base-epochs", type=int, default=d.base_epochs)
    p.add_argument("--base-lr", type=float, default=d.base_lr)
    p.add_argument("--base-seed", type=int, default=d.base_seed, help="seed of the base training (the fine-tuning seeds are --seeds)")
    p.add_argument("--base-redo", type=int, default=d.base_redo, metavar="STEPS",
                   help="recycle the base's dormant decoder channels every STEPS steps (ReDo; default: never)")
    p.add_argument("--base-prior", type=float, default=d.base_prior, metavar="P",
                   help="start the base's P and S heads at output P (prior-probability initialisation, e.g. 0.01; default: PyTorch's)")
    p.add_argument("--ft-epochs", type=int, default=d.ft_epochs)
    p.add_argument("--ft-lr", type=float, default=d.ft_lr)
    p.add_argument("--ft-schedule", default=d.ft_schedule, choices=LR_SCHEDULES, help="learning-rate schedule of every run on B (default constant, as pick-benchmark)")
    p.add_argument("--moe-args", type=json.loads, default=d.moe_args, help='SeisMoE model_args as JSON, e.g. \'{"num_experts": 8, "num_experts_per_token": 2}\'')
    p.add_argument("--variants", nargs="+", default=list(d.variants), choices=VARIANTS)
    p.add_argument("--headline", default=d.headline, choices=[v for v in VARIANTS if v.startswith("moe_")])
    p.add_argument("--tag", default=d.tag, help="suffix of the SeisMoE runs and tables (quality<TAG>.md), to compare moe_args levers in one folder")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU)")
    p.add_argument("--merge", nargs="+", metavar="RESULTS_JSON", default=None,
                   help="train nothing: combine results*.json of runs on disjoint seeds (e.g. one process per core) "
                        "into OUT/quality<TAG>.md and OUT/results<TAG>.json")
    return p


def settings_from_args(args: Any) -> QualitySettings:
    return QualitySettings(
        out=Path(args.out), seeds=tuple(args.seeds), domains=tuple(args.domains), traces=args.traces,
        trace_seconds=args.trace_seconds, data_seed=args.data_seed, in_samples=args.in_samples, sigma=args.sigma,
        batch_size=args.batch_size, base_epochs=args.base_epochs, base_lr=args.base_lr, base_seed=args.base_seed, base_redo=args.base_redo, base_prior=args.base_prior, ft_epochs=args.ft_epochs,
        ft_lr=args.ft_lr, ft_schedule=args.ft_schedule, moe_args=dict(args.moe_args) if isinstance(args.moe_args, dict) else args.moe_args, variants=tuple(args.variants), headline=args.headline, tag=args.tag,
    )


def main_from_args(args: Any) -> int:
    import warnings

    import torch

    at_least_one(("--threads", args.threads))
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="lightning")
    if args.merge:
        last = merge([Path(p) for p in args.merge], Path(args.out), args.tag)
    else:
        last = run(settings_from_args(args))
    print(last)
    return 0
