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


def test_probe_edits_change_only_what_they_name():
    """Each edit of `moelab.seismic.probe` changes one trait of the recording and nothing else, and
    moves the reference picks where it moves the phases."""
    from moelab.seismic import probe

    x = realcheck.recording_stream()[0].data.astype(np.float64)
    ip, is_ = int(round(realcheck.REFERENCE_P_S * 200)), int(round(realcheck.REFERENCE_S_S * 200))
    noise = x[: ip - 200]
    base = noise.mean()
    e = {d.name: d for d in probe.edits()}
    assert list(e) == ["as recorded", "S removed", "P x4", "S x1/4", "slower x1.5", "slower x2"]
    np.testing.assert_array_equal(e["as recorded"].apply(x), x)
    y = e["S removed"].apply(x)
    np.testing.assert_array_equal(y[:is_], x[:is_])
    np.testing.assert_array_equal(y[is_:], np.tile(noise, 2)[: len(x) - is_])  # the pre-event noise, repeated
    assert e["S removed"].s_ref_s is None
    y = e["P x4"].apply(x)
    np.testing.assert_array_equal(np.delete(y, np.s_[ip:is_]), np.delete(x, np.s_[ip:is_]))
    np.testing.assert_allclose(y[ip:is_] - base, 4.0 * (x[ip:is_] - base), rtol=1e-12)
    y = e["S x1/4"].apply(x)
    np.testing.assert_array_equal(y[:is_], x[:is_])
    np.testing.assert_allclose(y[is_:] - base, 0.25 * (x[is_:] - base), rtol=1e-12, atol=1e-9)
    y = e["slower x2"].apply(x)
    m = np.arange(-1000, 1000)
    np.testing.assert_allclose(y[ip + 2 * m], x[ip + m], rtol=0, atol=1e-9)  # dilated about the P onset
    assert e["slower x2"].p_ref_s == realcheck.REFERENCE_P_S
    assert e["slower x2"].s_ref_s == pytest.approx(realcheck.REFERENCE_P_S + 2 * (realcheck.REFERENCE_S_S - realcheck.REFERENCE_P_S))
    assert len(y) == len(x) and np.isfinite(y).all()


def test_probe_picks_every_edit_against_its_own_references(checkpoint):
    from moelab.seismic import probe

    model = load_trained(checkpoint)
    model.default_args = {**model.default_args, "P_threshold": 0.01, "S_threshold": 0.01}
    rows = probe.probe(model)
    assert [r.edit.name for r in rows] == [e.name for e in probe.edits()]
    for r in rows:
        if r.report.p_time_s is not None:
            assert r.p_residual_s == pytest.approx(r.report.p_time_s - r.edit.p_ref_s)
        if r.report.s_time_s is not None:
            ref = r.edit.s_ref_s if r.edit.s_ref_s is not None else r.edit.p_ref_s
            assert r.s_residual_s == pytest.approx(r.report.s_time_s - ref)
        assert r.format().startswith(r.edit.name)
    # the unedited row is exactly the real-event check
    plain = realcheck.pick_recording(model)
    assert (rows[0].report.p_time_s, rows[0].report.s_time_s) == (plain.p_time_s, plain.s_time_s)


def test_real_event_probe_bench_refuses_unmatched_results(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "real_event_probe.py"
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"")
    r = subprocess.run([sys.executable, str(script), str(ckpt)], capture_output=True, text=True)
    assert r.returncode == 2 and "no config.json beside it" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, str(script), str(ckpt), "--results", "a.csv", "b.csv"], capture_output=True, text=True)
    assert r.returncode == 2 and "--results names 2 files for 1 checkpoints" in r.stderr and "Traceback" not in r.stderr
