"""Real-signal check: pick ObsPy's real AR-picker test event with a (briefly) trained SeisMoE.

The residuals of a model trained this briefly are printed, not asserted: what is asserted is that
the recording and its reference picks are the ones ObsPy's own picker test uses, that continuous
picking through SeisBench's annotate/classify runs on it, and that the report measures residuals
against those references.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("seisbench")

pytest.importorskip("obspy")

from moelab.seismic import harness, realcheck, synth  # noqa: E402
from moelab.seismic.model import load_trained  # noqa: E402
from moelab.seismic.config import validate  # noqa: E402




def test_recording_and_reference_picks_match_obspy_ar_pick():
    from obspy.signal.trigger import ar_pick

    st = realcheck.recording_stream()
    assert [tr.stats.channel for tr in st] == ["EHZ", "EHN", "EHE"]
    assert all(tr.stats.npts == 12000 and tr.stats.sampling_rate == 200.0 for tr in st)
    # the parameters of obspy/signal/tests/test_trigger.py::test_ar_pick_unesco
    p, s = ar_pick(st[0].data, st[1].data, st[2].data, 200.0, 1.0, 20.0, 1.0, 0.1, 4.0, 1.0, 2, 8, 0.1, 0.2)
    assert p == pytest.approx(realcheck.REFERENCE_P_S, abs=1e-6)
    assert s == pytest.approx(realcheck.REFERENCE_S_S, abs=0.05)


def test_recording_is_not_in_generated_training_data():
    names = {rec for rec, *_ in synth.EVENT_RECORDINGS if rec} | set(synth.NOISE_RECORDINGS)
    assert not any(realcheck.RECORDING in n for n in names)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    data = synth.make_dataset(root / "synth", n_traces=48, seed=5, n_samples=1600)
    cfg = validate({
        "model": "SeisMoE", "data": str(data), "batch_size": 16, "max_epochs": 2, "seed": 2,
        "model_args": {"base_model": None, "num_experts": 4, "num_experts_per_token": 2, "lr": 1e-2, "sigma": 30, "in_samples": 1001},
    })
    return harness.train(cfg, weights_dir=root / "weights", trainer_overrides={"enable_progress_bar": False, "num_sanity_val_steps": 0}, check_weights=False)


def test_pick_real_recording(checkpoint, capsys):
    from moelab.cli import main

    model = load_trained(checkpoint)
    report = realcheck.pick_recording(model, p_threshold=0.05, s_threshold=0.05)
    for v in (report.max_p_prob, report.max_s_prob, report.max_detection):
        assert 0.0 <= v <= 1.0 and math.isfinite(v)
    if report.p_time_s is not None:
        assert report.p_residual_s == pytest.approx(report.p_time_s - realcheck.REFERENCE_P_S)
        assert 0.0 <= report.p_time_s <= 60.0
    if report.s_time_s is not None:
        assert report.s_residual_s == pytest.approx(report.s_time_s - realcheck.REFERENCE_S_S)
    print("\n" + report.format())
    assert main(["seismic", "pick", "--model_path", str(checkpoint), "--p_threshold", "0.05", "--s_threshold", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "ObsPy ar_pick reference: P 30.635 s, S 31.165 s" in out and "max probabilities" in out


def test_annotation_covers_the_recording(checkpoint):
    model = load_trained(checkpoint)
    ann = model.annotate(realcheck.recording_stream())  # load_trained sets an overlap/blinding fitting the window
    p = [tr for tr in ann if tr.stats.channel.endswith("_P")][0]
    assert p.stats.sampling_rate == 100.0
    assert p.stats.endtime - p.stats.starttime > 50  # most of the 60 s recording is annotated
    assert np.isfinite(p.data).all()


def test_the_check_needs_both_phases_within_tolerance():
    assert realcheck.TOLERANCE_S == 0.3
    assert realcheck.both_within(0.3, -0.3) and realcheck.both_within(0.0, 0.0)
    assert not realcheck.both_within(0.301, 0.0) and not realcheck.both_within(0.0, -0.31)
    assert not realcheck.both_within(None, 0.0) and not realcheck.both_within(0.1, None)
    report = realcheck.PickReport(30.7, 0.5, 31.2, 0.5, 0.065, 0.035, 0.5, 0.5, 0.9, 2)
    assert report.within() and not report.within(tolerance_s=0.05)
