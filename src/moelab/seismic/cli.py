"""`moelab seismic <train|eval|targets|make-dataset|pick|export|routing|quality>` and the argument parsers that
benchmark/train.py, benchmark/eval.py and benchmark/generate_eval_targets.py share with them."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from moelab.errors import ConfigError
from moelab.validation import check_output


# ---------------------------------------------------------------------------------------- train
def add_train_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("config", nargs="?", help="JSON config, e.g. configs/stead_seismoe.json")
    p.add_argument("--config", dest="config_opt", metavar="CONFIG", help="the config (pick-benchmark's spelling)")
    p.add_argument("--weights_dir", default="weights", help="checkpoints go to WEIGHTS_DIR/<name>/ (default: weights)")
    p.add_argument("--data_root", help="folder holding local data sets: relative 'data' paths and DATA_ROOT/<name>/ are looked up here")
    p.add_argument("--device", help="cpu, gpu/cuda or auto (default: auto)")
    p.add_argument("--resume", metavar="PATH", help="training checkpoint to continue exactly from, e.g. weights/<name>/last.ckpt")
    p.add_argument("--name", help="experiment name (default <model>_<data>)")
    p.add_argument("--max_epochs", type=int)
    p.add_argument("--batch_size", type=int)
    p.add_argument("--num_workers", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--lr", type=float, help="overrides model_args.lr")
    p.add_argument("--limit_train_batches", type=float, help="Lightning: number of batches (integer) or fraction (< 1) per epoch")
    p.add_argument("--limit_val_batches", type=float)
    return p


def _config_path(args: argparse.Namespace) -> str:
    path = args.config or getattr(args, "config_opt", None)
    if not path:
        raise ConfigError("no config given; usage: python benchmark/train.py configs/stead_seismoe.json")
    if args.config and getattr(args, "config_opt", None) and args.config != args.config_opt:
        raise ConfigError(f"two different configs given ({args.config} and --config {args.config_opt}); pass one")
    return path


def _batches(v: float | None) -> int | float | None:
    if v is None:
        return None
    if v <= 0:
        raise ConfigError(f"limit_*_batches must be > 0, got {v}")
    if v > 1 and not float(v).is_integer():
        raise ConfigError(f"limit_*_batches={v}: give a whole number of batches (e.g. 2) or a fraction of the epoch <= 1 (e.g. 0.5)")
    return int(v) if float(v).is_integer() else float(v)  # Lightning: int = batches, float < 1 = fraction


def load_with_overrides(path: str, args: argparse.Namespace):
    """Config file + command-line overrides, validated together once."""
    from moelab.seismic.config import load_config, validate

    cfg = load_config(path)
    raw: dict[str, Any] = json.loads(json.dumps(cfg.raw))
    for key in ("max_epochs", "batch_size", "num_workers", "seed", "name"):
        v = getattr(args, key, None)
        if v is not None:
            raw[key] = v
    if getattr(args, "lr", None) is not None:
        raw.setdefault("model_args", {})["lr"] = args.lr
    return validate(raw, source=path)


def run_train(args: argparse.Namespace) -> int:
    from moelab.seismic import harness
    from moelab.seismic.config import check_accelerator

    check_accelerator(args.device)
    cfg = load_with_overrides(_config_path(args), args)
    overrides = {}
    for key in ("limit_train_batches", "limit_val_batches"):
        v = _batches(getattr(args, key, None))
        if v is not None:
            overrides[key] = v
    best = harness.train(cfg, weights_dir=args.weights_dir, data_root=args.data_root, resume=args.resume, device=args.device, trainer_overrides=overrides)
    print(f"best checkpoint: {best}")
    print(f"last checkpoint: {best.parent / (harness.LAST_NAME + '.ckpt')}")
    return 0


# ----------------------------------------------------------------------------------------- eval
def add_eval_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model_path", required=True, help="checkpoint, e.g. weights/SeisMoE_STEAD/model.ckpt")
    p.add_argument("--config", required=True, help="the config the model was trained with")
    p.add_argument("--targets", help="folder with task1.csv/task23.csv (default: targets/<data>/, generated when absent)")
    p.add_argument("--sets", default="dev,test", help="comma-separated splits; the first picks thresholds (default dev,test)")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--data_root")
    p.add_argument("--device", help="cpu or gpu/cuda")
    p.add_argument("--output", help="folder for predictions and results.csv (default: <model dir>/eval)")
    return p


def run_eval(args: argparse.Namespace) -> int:
    from moelab.seismic import harness
    from moelab.seismic.config import check_accelerator, load_config
    from moelab.seismic.evaluate import format_results

    check_accelerator(args.device)
    cfg = load_config(args.config)
    sets = tuple(s.strip() for s in args.sets.split(",") if s.strip())
    if not sets:
        raise ConfigError("--sets is empty; use e.g. dev,test")
    unknown = [s for s in sets if s not in ("train", "dev", "test")]
    if unknown:
        raise ConfigError(f"--sets {args.sets}: unknown split(s) {', '.join(unknown)}; use train, dev and/or test, e.g. dev,test")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {args.batch_size}")
    stats, out = harness.evaluate(
        cfg, args.model_path, data_root=args.data_root, targets=args.targets, sets=sets,
        batch_size=args.batch_size, device=args.device, output=args.output,
    )
    print(format_results(stats, sets))
    for line in heads_report(stats, sets[0]):
        print(line)
    print(f"results: {out / 'results.csv'} (predictions per window: {out}/<set>_task*.csv)")
    return 0


def heads_report(stats: dict[str, Any], split: str) -> list[str]:
    """The evaluation's look at the output heads (`moelab.seismic.heads`), one line per head, then a
    warning for each head that cannot rise (P or S only where ``split`` has windows of that phase)."""
    from moelab.seismic.heads import healths_from_stats

    healths = healths_from_stats(stats)
    lines = [f"{'heads (' + split + ')':<20} " + "; ".join(h.format() for h in healths)] if healths else []
    lines += [h.warning() for h in healths if h.capped and (h.head == "detection" or stats.get(f"{split}_{h.head}_n", 0) > 0)]
    return lines


# -------------------------------------------------------------------------------------- targets
def add_targets_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("dataset", help="SeisBench data set name or local SeisBench folder")
    p.add_argument("output", help="folder to write task1.csv and task23.csv to (must not hold targets yet)")
    p.add_argument("--sampling_rate", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--task1_window_s", type=float, default=30.0, help="task 1 window length (pick-benchmark: 30 s)")
    p.add_argument("--task23_window_s", type=float, default=10.0, help="task 2/3 window length (pick-benchmark: 10 s)")
    p.add_argument("--no_noise_before_events", action="store_true")
    p.add_argument("--data_root")
    return p


def run_targets(args: argparse.Namespace) -> int:
    from moelab.errors import DataError
    from moelab.seismic.data import open_dataset, resolve_data
    from moelab.seismic.evaluate import generate_targets

    out = check_output("output", args.output, folder=True)
    if any((out / f).exists() for f in ("task1.csv", "task23.csv")):
        raise DataError(f"'{out}' already holds evaluation targets; choose another folder (targets must stay fixed once made)")
    for key in ("task1_window_s", "task23_window_s", "sampling_rate"):
        if getattr(args, key) <= 0:
            raise ConfigError(f"--{key} must be > 0, got {getattr(args, key)}")
    ds = open_dataset(resolve_data(args.dataset, args.data_root), sampling_rate=args.sampling_rate)
    generate_targets(ds, out, seed=args.seed, task1_window_s=args.task1_window_s, task23_window_s=args.task23_window_s, noise_before_events=not args.no_noise_before_events)
    import pandas as pd

    for f in ("task1.csv", "task23.csv"):
        df = pd.read_csv(out / f)
        print(f"{out / f}: {len(df)} windows " + ", ".join(f"{k}={v}" for k, v in df["trace_split"].value_counts().items()))
    return 0


# ---------------------------------------------------------------------------------- make-dataset
class _ListDomains(argparse.Action):
    """``--list-domains``: prints the registry and exits at once, like ``--version``, so that it
    needs no ``--out``."""

    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from moelab.seismic.synth import domain_descriptions

        print("\n".join(f"{name}: {text}" for name, text in domain_descriptions().items()))
        parser.exit(0)


def add_make_dataset_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", required=True, help="folder to write metadata.csv + waveforms.hdf5 to")
    p.add_argument("--n-traces", "--n_traces", dest="n_traces", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    from moelab.seismic.synth import domain_descriptions

    names = list(domain_descriptions())
    p.add_argument("--domain", default=None, help=f"preset or mixture, one of {', '.join(names)} (default {names[0]}); --list-domains says what each one generates")
    p.add_argument("--list-domains", action=_ListDomains, help="print every --domain name with what it generates, and exit")
    p.add_argument("--n-samples", "--n_samples", dest="n_samples", type=int, default=None, help="samples per trace at the domain's sampling rate (default: 60 s, e.g. 6000 at 100 Hz, like STEAD)")
    p.add_argument("--noise-fraction", "--noise_fraction", dest="noise_fraction", type=float, default=0.3)
    p.add_argument("--source-metadata", "--source_metadata", dest="source_metadata", help="STEAD-format metadata CSV to draw distances, depths, magnitudes, SNRs and P positions from (default: the 100 real STEAD traces shipped with moelab)")
    p.add_argument("--overwrite", action="store_true")
    return p


def run_make_dataset(args: argparse.Namespace) -> int:
    from moelab.seismic.synth import make_dataset

    check_output("--out", args.out, folder=True)
    out = make_dataset(args.out, n_traces=args.n_traces, seed=args.seed, n_samples=args.n_samples, noise_fraction=args.noise_fraction, source_metadata=args.source_metadata, overwrite=args.overwrite, domain=args.domain)
    import pandas as pd

    m = pd.read_csv(out / "metadata.csv")
    print(f"wrote {len(m)} traces to {out} (" + ", ".join(f"{k}={v}" for k, v in m["split"].value_counts().items()) + "; "
          + ", ".join(f"{k}={v}" for k, v in m["trace_category"].value_counts().items()) + f"; source parameters: {m['trace_source'].iloc[0]})")
    return 0


# ------------------------------------------------------------------------------------------ pick
def add_pick_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model_path", required=True, help="training checkpoint (.ckpt) or exported SeisBench weights (DIR/NAME of moelab seismic export)")
    p.add_argument("--waveforms", nargs="+", metavar="FILE_OR_DIR", help="waveform files or folders (any format ObsPy reads, any length; folders searched recursively); without it: ObsPy's AR-picker test event")
    p.add_argument("--out", help="folder for picks.csv, picks.xml, summary.txt (and annotations/); required with --waveforms")
    p.add_argument("--annotations", action="store_true", help="also write the probability traces as miniSEED (OUT/annotations/<NET.STA.LOC>.mseed)")
    p.add_argument("--p_threshold", type=float, help="P pick threshold (default: the model's tuned default_args, else SeisBench's 0.1)")
    p.add_argument("--s_threshold", type=float, help="S pick threshold (default: as --p_threshold)")
    p.add_argument("--batch_size", type=int, help="windows per forward pass (SeisBench default 256)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def run_pick(args: argparse.Namespace) -> int:
    from moelab.errors import DataError
    from moelab.seismic.model import load_trained

    for key in ("p_threshold", "s_threshold"):
        v = getattr(args, key)
        if v is not None and not 0 < v < 1:
            raise ConfigError(f"--{key} must be in (0, 1), got {v}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.waveforms and not args.out:
        raise ConfigError("--waveforms needs --out DIR (where picks.csv and picks.xml go)")
    if (args.out or args.annotations) and not args.waveforms:
        raise ConfigError("--out/--annotations apply to --waveforms FILES_OR_DIRS; without --waveforms the ObsPy test event is picked and printed")
    if args.out:
        check_output("--out", args.out, folder=True)
    model = load_trained(args.model_path)
    if not args.waveforms:
        from moelab.seismic.realcheck import pick_recording

        print(pick_recording(model, args.p_threshold, args.s_threshold).format())
        return 0
    from moelab.seismic.picking import pick_files

    kwargs = {k: v for k, v in (("P_threshold", args.p_threshold), ("S_threshold", args.s_threshold), ("batch_size", args.batch_size)) if v is not None}
    run = pick_files(model, args.waveforms, out=args.out, annotations=args.annotations, progress=not args.no_progress, **kwargs)
    print(run.summary())
    if not run.stations:
        raise DataError("no station could be picked (see the reasons above); check the --waveforms paths and files")
    return 0


# ---------------------------------------------------------------------------------------- export
def add_export_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model_path", required=True, help="training checkpoint, e.g. weights/SeisMoE_synth/model.ckpt")
    p.add_argument("--out", required=True, help="DIR/NAME: writes DIR/NAME.json + DIR/NAME.pt (SeisBench's save format)")
    p.add_argument("--results", help="results.csv of benchmark/eval.py (default: eval/results.csv beside the checkpoint)")
    return p


def run_export(args: argparse.Namespace) -> int:
    from moelab.seismic.export import export_weights

    check_output("--out", f"{args.out}.json")  # DIR/NAME -> DIR/NAME.json + .pt: DIR must not be a file
    json_path, pt_path = export_weights(args.model_path, args.out, results=args.results)
    meta = json.loads(json_path.read_text())
    tuned = ", ".join(f"{k}={v:.4f}" for k, v in meta["default_args"].items() if k.endswith("_threshold"))
    print(f"wrote {json_path} and {pt_path} (default_args: {tuned})")
    loader = "moelab.seismic.model.SeisMoE" if "num_experts" in meta["model_args"] else "seisbench.models.EQTransformer"
    print(f"load with {loader}.load('{args.out}'), or pass it as base_model or --model_path")
    return 0


# --------------------------------------------------------------------------------------- routing
def add_routing_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model_path", required=True, help="SeisMoE checkpoint, e.g. weights/SeisMoE_STEAD/model.ckpt")
    p.add_argument("--config", required=True, help="the config the model was trained with (its data set is read)")
    p.add_argument("--by", default="trace_domain", help="metadata column to group the traces by (default trace_domain: the presets of a generated mixture; e.g. station_network_code, trace_category)")
    p.add_argument("--split", default="test", choices=("train", "dev", "test"))
    p.add_argument("--task", default="task23", choices=("task23", "task1"), help="evaluation windows to route: task23 (10 s around one P or S onset, default) or task1 (30 s, earthquakes and noise)")
    p.add_argument("--targets", help="folder with task1.csv/task23.csv (default: as benchmark/eval.py)")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--data_root")
    p.add_argument("--device", help="cpu or gpu/cuda")
    p.add_argument("--json", dest="json_out", metavar="FILE", help="also write the report as JSON")
    return p


def run_routing(args: argparse.Namespace) -> int:
    from moelab.seismic.config import load_config
    from moelab.seismic.routing import format_routing_report, routing

    if args.json_out:
        check_output("--json", args.json_out)
    report = routing(
        load_config(args.config), args.model_path, by=args.by, split=args.split, task=args.task,
        data_root=args.data_root, targets=args.targets, batch_size=args.batch_size, device=args.device,
    )
    print(format_routing_report(report, args.by))
    if args.json_out:
        from pathlib import Path

        from moelab.checkpoint import atomic_write_bytes

        atomic_write_bytes(json.dumps(report, indent=1).encode(), Path(args.json_out))
        print(f"report: {args.json_out}")
    return 0


# --------------------------------------------------------------------------------------- quality
def _add_quality_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from moelab.seismic.quality import add_args

    return add_args(p)


def _run_quality(args: argparse.Namespace) -> int:
    from moelab.seismic.quality import main_from_args

    return main_from_args(args)


def add_commands(parser: argparse.ArgumentParser) -> None:
    """Called by `moelab.cli`: registers the seismic subcommands."""
    sub = parser.add_subparsers(dest="command", required=True)
    for name, add, run, help_ in (
        ("train", add_train_args, run_train, "train SeisMoE/EQTransformer from a JSON config (= benchmark/train.py)"),
        ("eval", add_eval_args, run_eval, "pick-benchmark tasks 1-3 on dev/test (= benchmark/eval.py)"),
        ("targets", add_targets_args, run_targets, "write evaluation targets (= benchmark/generate_eval_targets.py)"),
        ("make-dataset", add_make_dataset_args, run_make_dataset, "generate a SeisBench data set from real recordings + TauP onsets"),
        ("pick", add_pick_args, run_pick, "pick continuous records (QuakeML/CSV) with a trained model (default: ObsPy's AR-picker test event)"),
        ("export", add_export_args, run_export, "save a checkpoint as SeisBench weights (json + pt) with the thresholds tuned on dev"),
        ("routing", add_routing_args, run_routing, "which experts a SeisMoE checkpoint routes each group of traces to (by a metadata column)"),
        ("quality", _add_quality_args, _run_quality, "upcycle-and-fine-tune benchmark: SeisMoE vs EQTransformer over seeds and domains (= bench/seismoe_quality.py)"),
    ):
        p = add(sub.add_parser(name, help=help_))
        p.set_defaults(func=run)


def configure_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("seisbench").propagate = False  # it has its own handler; avoid printing twice
