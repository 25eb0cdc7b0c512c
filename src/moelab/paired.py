"""Paired comparisons over seeds: the statistics both applications use to say whether one model beats another.

Seed ``i`` of each model is trained with the same seed (and data order, and for fine-tuning the same
base), so the per-seed differences ``a_i - b_i`` cancel what the seed does to both and keep what
it does to one. Two criteria are reported, because they answer different questions:

* the **spread**: the mean difference exceeds the standard deviation of the differences -- where
  one more seed may land (the criterion our issues set);
* the **95% interval**: the two-sided Student-t confidence interval of the mean difference
  excludes 0 -- where the mean itself lies; it narrows with more seeds, the spread does not.

With three seeds the spread is the weaker criterion (t = 4.3), with nine the interval is (t = 2.3
over sqrt(9)). NaN / None values (a metric a run does not have, e.g. S picks on a P-only data set)
are left out. Used by `moelab.seismic.quality` (SeisMoE vs EQTransformer) and
`moelab.diffusion.compare` (MoEFsDiC vs UNet2DModel).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable


def finite(values: Iterable[float | None]) -> list[float]:
    """The values that exist: NaN and None (no windows for a task, no run) left out."""
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def mean_std(values: Iterable[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values; std 0 for one value, NaN for none."""
    vals = finite(values)
    if not vals:
        return float("nan"), float("nan")
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def paired_interval(diffs: Iterable[float | None], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of the paired differences and its two-sided Student-t confidence interval (n - 1 degrees
    of freedom). NaN bounds for fewer than two seeds."""
    diffs = list(diffs)
    n = len(finite(diffs))
    m, sd = mean_std(diffs)
    if n < 2:
        return m, float("nan"), float("nan")
    from scipy.stats import t as student_t

    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return m, m - half, m + half


def paired_verdict(diffs: Iterable[float | None], lower_is_better: bool) -> str:
    """``better``/``worse`` with the criteria it meets, or ``level``; ``one seed`` when there is
    neither a spread nor an interval, ``n/a`` when there is no value.

    ``spread`` is compared as printed, to 3 decimals, so that the verdict agrees with the
    ``mean ± std`` cell next to it; ``CI`` when the 95% interval excludes 0.
    """
    diffs = list(diffs)
    m, lo, hi = paired_interval(diffs)
    if math.isnan(m):
        return "n/a"
    if math.isnan(lo):
        return "one seed"
    _, sd = mean_std(diffs)
    criteria = []
    if round(abs(m), 3) > round(sd, 3):
        criteria.append("spread")
    if lo > 0 or hi < 0:
        criteria.append("CI")
    if not criteria:
        return "level"
    good = (m < 0) if lower_is_better else (m > 0)
    return f"{'better' if good else 'worse'} ({', '.join(criteria)})"


def interval_cell(diffs: Iterable[float | None], lower_is_better: bool) -> str:
    """``[lo, hi] verdict`` for a table cell (the verdict alone where there is no interval)."""
    diffs = list(diffs)
    _, lo, hi = paired_interval(diffs)
    verdict = paired_verdict(diffs, lower_is_better)
    return verdict if math.isnan(lo) else f"[{lo:+.3f}, {hi:+.3f}] {verdict}"
