"""WiSE-FT on the quality runs' fine-tuned models: in-domain quality and the real event, before and after.

For each run folder of ``bench/seismoe_quality.py`` (``<out>/weights/<name>``, fine-tuned from a
base), the weights ``(1 - alpha) * start + alpha * fine-tuned`` (`moelab.seismic.wise`) are written
to ``<out>/<run name>_a<alpha>/``, scored on the run's own training domain with the harness
(thresholds tuned on its dev split, as for the run itself), and made to pick ObsPy's real event at
those thresholds. Each model's line gives both; the last line sums them up:

``wise_ft: alpha=<a> real event <n>/<N> (fine-tuned <m>/<N>) mcc wise-ft=<±x.xxx> p_mae wise/ft=<x.xx> s_mae wise/ft=<x.xx>``

(means over the runs). Usage::

    python bench/wise_ft.py outputs/seismoe_whf1/weights/{eqt_ft,moe_full_w1a}_s{0,1,2} --alpha 0.5 --out outputs/wise
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moelab.guard import run_guarded


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (config.json, model.ckpt and eval_<domain>/ of the quality run)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the fine-tuned model (default 0.5, WiSE-FT's)")
    p.add_argument("--out", type=Path, default=Path("outputs/wise"), help="folder for the interpolated models and their evaluations")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    def go() -> int:
        import warnings

        import numpy as np
        import torch

        from moelab.seismic import quality
        from moelab.seismic.export import read_results
        from moelab.seismic.wise import write_interpolated
        from moelab.validation import at_least_one, read_json_record

        at_least_one(("--threads", args.threads))
        torch.set_num_threads(args.threads)
        warnings.filterwarnings("ignore", module="lightning")
        def cells(stats: dict) -> str:
            return " ".join(f"{m} {quality.metric_of(stats, m):.3f}" for m in quality.METRICS)

        rows = []
        for run in args.runs:
            config = read_json_record(run / "config.json", ("data", "model_args"), "pass a run folder of the quality benchmark")
            data = Path(config["data"])
            own_eval = quality.eval_dir(run, data.name)
            own = read_results(own_eval / "results.csv")
            own_real = quality.real_event(run / "model.ckpt", own_eval)
            out = args.out / f"{run.parent.parent.name}_{run.name}_a{args.alpha:g}"
            ckpt = write_interpolated(run, args.alpha, out)
            stats = quality.evaluate_on(config, ckpt, data, quality.eval_dir(out, data.name), int(config["model_args"]["in_samples"]))
            real = quality.real_event(ckpt, quality.eval_dir(out, data.name))
            rows.append((own, stats, quality.real_event_passes(own_real), quality.real_event_passes(real)))
            print(f"{run} on {data.name}\n  fine-tuned: {cells(own)}  real event {quality.pick_cell(own_real)} (max P {own_real['max_p_prob']:.2f})"
                  f"\n  alpha {args.alpha:g}:  {cells(stats)}  real event {quality.pick_cell(real)} (max P {real['max_p_prob']:.2f})", flush=True)

        def mean(i: int, m: str) -> float:
            return float(np.nanmean([quality.metric_of(r[i], m) for r in rows]))

        n = len(rows)
        print(
            f"wise_ft: alpha={args.alpha:g} real event {sum(r[3] for r in rows)}/{n} (fine-tuned {sum(r[2] for r in rows)}/{n}) "
            f"mcc wise-ft={mean(1, 'phase_mcc') - mean(0, 'phase_mcc'):+.3f} p_mae wise/ft={mean(1, 'P_mae_s') / mean(0, 'P_mae_s'):.2f} "
            f"s_mae wise/ft={mean(1, 'S_mae_s') / mean(0, 'S_mae_s'):.2f}"
        )
        return 0

    return run_guarded(go)


if __name__ == "__main__":
    raise SystemExit(main())
