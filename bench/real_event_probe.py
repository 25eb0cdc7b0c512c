"""What do trained models' picks on ObsPy's real event depend on? The recording edited one trait at a time.

For each checkpoint, the recording as recorded, with its S removed, its P 4x louder, its S at 1/4,
and slowed down 1.5x and 2x (`moelab.seismic.probe`), picked at the thresholds tuned on the dev split
of the model's training domain (what ``moelab seismic pick`` does for the exported model); then,
per edit, on how many models the P pick lands within 0.3 s of the (moved) reference P.

Usage: ``python bench/real_event_probe.py outputs/seismoe_dense/weights/eqt_ft_s*/model.ckpt``
(the quality run's layout: each model's ``config.json`` names its training data, whose dev-tuned
thresholds are in ``eval_<domain>/results.csv`` beside it), or ``--results CSV ...``, one per
checkpoint, for other layouts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moelab.errors import ConfigError
from moelab.guard import run_guarded


def results_csv(ckpt: Path) -> Path:
    """The dev-tuned thresholds a quality run wrote for this checkpoint's own training domain."""
    from moelab.seismic.quality import eval_dir
    from moelab.validation import read_json_record

    cfg = ckpt.parent / "config.json"
    if not cfg.exists():
        raise ConfigError(f"'{ckpt}': no config.json beside it to say which domain it was trained on; pass --results CSV for it")
    domain = Path(read_json_record(cfg, ("data",), "pass --results CSV for this checkpoint")["data"]).name
    csv = eval_dir(ckpt.parent, domain) / "results.csv"
    if not csv.exists():
        raise ConfigError(f"'{ckpt}': no {csv} (the quality run's evaluation on {domain}); pass --results CSV for it")
    return csv


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--results", nargs="+", type=Path, default=None, help="benchmark/eval.py results.csv per checkpoint (its dev-tuned thresholds)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    def go() -> int:
        import torch

        from moelab.seismic.probe import probe
        from moelab.seismic.realcheck import TOLERANCE_S, load_with_tuned_thresholds, recording_stream

        torch.set_num_threads(args.threads)
        if args.results is not None and len(args.results) != len(args.checkpoints):
            raise ConfigError(f"--results names {len(args.results)} files for {len(args.checkpoints)} checkpoints; give one per checkpoint, in the same order")
        csvs = args.results or [results_csv(c) for c in args.checkpoints]
        st = recording_stream()
        counts: dict[str, list[int]] = {}
        for ckpt, csv in zip(args.checkpoints, csvs, strict=True):
            model = load_with_tuned_thresholds(ckpt, csv)
            print(f"== {ckpt}")
            for row in probe(model, stream=st):
                print("  " + row.format())
                hit = row.p_residual_s is not None and abs(row.p_residual_s) <= TOLERANCE_S
                counts.setdefault(row.edit.name, []).append(int(hit))
        n = len(args.checkpoints)
        print("real_event_probe: P within 0.3 s of the reference, models out of " + str(n) + ": " + ", ".join(f"{k} {sum(v)}" for k, v in counts.items()))
        return 0

    return run_guarded(go)


if __name__ == "__main__":
    raise SystemExit(main())
