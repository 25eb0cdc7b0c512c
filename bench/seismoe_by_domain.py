"""A finished `bench/seismoe_quality.py` run by a metadata column of its fine-tuning set: per group of
test traces (default ``trace_domain``, the presets of a generated mixture such as ``mixed_like``),
fine-tuned EQTransformer against the headline SeisMoE over seeds, and the SeisMoE's routing by group.
Trains nothing; see `moelab.seismic.breakdown`.

Usage: ``python bench/seismoe_by_domain.py --out outputs/seismoe_mix --tag _mix [--by trace_domain] [--no-routing]``
(writes OUT/by_<column><TAG>.md).
"""

from __future__ import annotations

import argparse
import warnings

from moelab.guard import run_guarded


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the quality run's folder")
    p.add_argument("--tag", default="", help="its --tag (results<TAG>.json; a merged record finds the runs it was merged from)")
    p.add_argument("--by", default="trace_domain", help="metadata column to group the test traces by")
    p.add_argument("--no-routing", action="store_true", help="skip the routing tables (no model is run)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    def go() -> int:
        import torch

        from moelab.seismic.breakdown import breakdown

        torch.set_num_threads(max(1, args.threads))
        warnings.filterwarnings("ignore", module="lightning")
        print(breakdown(args.out, args.tag, by=args.by, routing=not args.no_routing))
        return 0

    return run_guarded(go)


if __name__ == "__main__":
    raise SystemExit(main())
