"""moelab.paired: the per-seed difference statistics both applications report."""

import math

import numpy as np
import pytest

from moelab import paired


def test_paired_interval_is_student_t():
    from scipy import stats

    # nine seeds, |mean| (0.0211) inside the std of the differences (0.0226), interval below 0
    diffs = [-0.05, 0.0, -0.03, -0.02, -0.05, 0.01, -0.04, -0.01, 0.0]
    m, lo, hi = paired.paired_interval(diffs)
    ref = stats.t.interval(0.95, 8, np.mean(diffs), stats.sem(diffs))  # scipy's own interval as the reference
    assert (m, lo, hi) == pytest.approx((-0.19 / 9, *ref), abs=1e-12)
    assert paired.paired_interval(diffs, 0.99)[1] < lo  # a higher level, a wider interval
    assert math.isnan(paired.paired_interval([0.02])[1])


def test_verdicts_follow_the_direction_and_both_criteria():
    diffs = [-0.05, 0.0, -0.03, -0.02, -0.05, 0.01, -0.04, -0.01, 0.0]
    assert paired.paired_verdict(diffs, lower_is_better=True) == "better (CI)"
    assert paired.paired_verdict(diffs, lower_is_better=False) == "worse (CI)"
    assert paired.paired_verdict(diffs[:3], True) == "better (spread)"  # -0.027 ± 0.025, t(2) too wide
    assert paired.paired_verdict([-0.05, -0.04, -0.06], True) == "better (spread, CI)"
    assert paired.paired_verdict([0.05, -0.04, 0.01], True) == "level"
    # as printed: -0.0221 ± 0.0224 is "-0.022 ± 0.022", not beyond the spread
    assert paired.paired_verdict([-0.0221 + 0.0224 / math.sqrt(2) * z for z in (-1, 1)], True) == "level"
    assert paired.paired_verdict([0.02], False) == "one seed"  # no spread, no interval: no verdict
    assert paired.paired_verdict([float("nan")], False) == "n/a"


def test_missing_values_are_left_out_and_cells_read_as_printed():
    assert paired.finite([1.0, None, float("nan"), 2.0]) == [1.0, 2.0]
    assert paired.mean_std([1.0, float("nan"), 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert paired.mean_std([5.0]) == (5.0, 0.0)
    assert all(math.isnan(v) for v in paired.mean_std([None]))
    assert paired.interval_cell([-0.05, -0.04, -0.06], True) == "[-0.075, -0.025] better (spread, CI)"
    assert paired.interval_cell([0.3], True) == "one seed"
