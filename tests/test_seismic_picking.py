"""Continuous picking and exported weights, on ObsPy's bundled real recordings.

What is asserted is exact: the picks written equal SeisBench's own ``classify`` on the same stream,
picks.csv and picks.xml hold the same picks and reload, the probability traces written equal
``annotate``'s, exported weights carry the thresholds of results.csv and classify with them by
default, and bad input (corrupt files, lower-case or missing components) is handled per file. The
models are randomly initialised (picking quality is not what is tested here).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("seisbench")
obspy = pytest.importorskip("obspy")

from seisbench.models import EQTransformer  # noqa: E402

from moelab.checkpoint import atomic_save  # noqa: E402
from moelab.errors import CheckpointError, DataError  # noqa: E402
from moelab.seismic.export import export_weights  # noqa: E402
from moelab.seismic.model import SeisMoE, load_trained, window_annotate_args  # noqa: E402
from moelab.seismic.picking import CSV_COLUMNS, pick_files, picks_table, read_quakeml_picks  # noqa: E402

N = 1000  # model window (samples); ObsPy's example record is 3000 samples at 100 Hz


def _key(picks):
    return sorted((p.trace_id, p.phase, str(p.peak_time), round(float(p.peak_value), 6)) for p in picks)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = SeisMoE(in_samples=N).eval()
    m.default_args.update(window_annotate_args(N))
    return m


@pytest.fixture(scope="module")
def threshold(model):
    """Just under the random model's peak probabilities on the record, so that it picks both phases."""
    ann = model.annotate(obspy.read())
    peak = {tr.stats.channel.rsplit("_", 1)[1]: float(np.nanmax(tr.data)) for tr in ann}
    return 0.9 * min(peak["P"], peak["S"])


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Two stations of real data: ObsPy's BW.RJOB record and the same record as station BW.RJOC."""
    folder = tmp_path_factory.mktemp("records")
    st = obspy.read()
    st.write(str(folder / "rjob.mseed"), format="MSEED")
    other = st.copy()
    for tr in other:
        tr.stats.station = "RJOC"
    (folder / "sub").mkdir()
    other.write(str(folder / "sub" / "rjoc.mseed"), format="MSEED")
    return folder


def test_picks_written_agree_with_seisbench_classify_and_reload(model, threshold, records, tmp_path):
    run = pick_files(model, [records], out=tmp_path, annotations=True, progress=False, P_threshold=threshold, S_threshold=threshold)
    assert run.stations == ["BW.RJOB.", "BW.RJOC."] and not run.skipped
    expected = model.classify(obspy.read(), P_threshold=threshold, S_threshold=threshold).picks
    assert {p.phase for p in expected} == {"P", "S"}
    rjob = [p for p in run.picks if p.trace_id == "BW.RJOB."]
    assert _key(rjob) == _key(expected)  # SeisBench's classify, unchanged
    assert len(run.picks) == 2 * len(expected)  # the second station is the same record

    import pandas as pd

    csv = pd.read_csv(tmp_path / "picks.csv", keep_default_na=False)
    assert tuple(csv.columns) == CSV_COLUMNS and len(csv) == len(run.picks)
    xml = pd.DataFrame(read_quakeml_picks(tmp_path / "picks.xml"))
    assert len(xml) == len(csv)
    for col in ("trace_id", "phase", "time", "start_time", "end_time"):
        assert sorted(xml[col]) == sorted(csv[col])
    assert sorted(xml["probability"].round(6)) == sorted(csv["probability"].round(6))
    events = obspy.read_events(str(tmp_path / "picks.xml"))
    picks = events[0].picks
    assert {p.waveform_id.station_code for p in picks} == {"RJOB", "RJOC"}
    assert {p.waveform_id.channel_code for p in picks} == {"EHZ"}
    assert all(p.evaluation_mode == "automatic" and p.phase_hint in ("P", "S") for p in picks)
    assert sorted(obspy.UTCDateTime(t) for t in csv["time"]) == sorted(p.time for p in picks)

    ann = obspy.read(str(tmp_path / "annotations" / "BW.RJOB..mseed"))
    reference = model.annotate(obspy.read())
    assert sorted(tr.stats.channel for tr in ann) == ["PBD", "PBP", "PBS"]
    for label, channel in (("P", "PBP"), ("S", "PBS"), ("Detection", "PBD")):
        got = ann.select(channel=channel)[0]
        ref = [tr for tr in reference if tr.stats.channel.endswith("_" + label)][0]
        assert got.stats.starttime == ref.stats.starttime and got.stats.npts == ref.stats.npts
        np.testing.assert_allclose(got.data, ref.data.astype(np.float32), rtol=0, atol=0)
    assert "picked 2 station(s)" in (tmp_path / "summary.txt").read_text()


def test_a_corrupt_file_among_good_ones_is_reported_and_skipped(model, threshold, records, tmp_path):
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "corrupt.mseed").write_bytes(b"\x00garbage" * 300)
    (bad / "empty.mseed").write_bytes(b"")
    cut = (records / "rjob.mseed").read_bytes()
    (bad / "cut.mseed").write_bytes(cut[: len(cut) // 3])  # a truncated record: ObsPy reads what is there
    run = pick_files(model, [records / "rjob.mseed", bad, tmp_path / "missing.mseed"], out=tmp_path / "out", progress=False,
                     P_threshold=threshold, S_threshold=threshold)
    reasons = {Path(s.what).name: s.reason for s in run.skipped}
    assert set(reasons) == {"corrupt.mseed", "empty.mseed", "missing.mseed"}
    assert "ObsPy" in reasons["corrupt.mseed"] and "no such file" in reasons["missing.mseed"]
    assert "BW.RJOB." in run.stations and len(run.picks) > 0
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "skipped 3:" in summary and "corrupt.mseed" in summary


def test_lower_case_and_missing_components(model, threshold, tmp_path):
    st = obspy.read()
    lower = st.copy()
    for tr in lower:
        tr.stats.channel = tr.stats.channel.lower()
    lower.write(str(tmp_path / "lower.mseed"), format="MSEED")
    run = pick_files(model, [tmp_path / "lower.mseed"], progress=False, P_threshold=threshold, S_threshold=threshold)
    assert _key(run.picks) == _key(model.classify(st, P_threshold=threshold, S_threshold=threshold).picks)
    assert any("lower-case channel codes" in n for n in run.notes)

    z_only = st.select(component="Z").copy()
    for tr in z_only:
        tr.stats.station = "ZONLY"
    z_only.write(str(tmp_path / "z.mseed"), format="MSEED")
    odd = st.copy()
    for tr, code in zip(odd, ("EHX", "EHY", "EHQ"), strict=True):
        tr.stats.station, tr.stats.channel = "ODD", code
    odd.write(str(tmp_path / "odd.mseed"), format="MSEED")
    run = pick_files(model, [tmp_path / "z.mseed", tmp_path / "odd.mseed"], progress=False, P_threshold=threshold, S_threshold=threshold)
    assert run.stations == ["BW.ZONLY."]  # SeisBench fills the missing N and E with zeros
    assert _key(run.picks) == _key(model.classify(z_only, P_threshold=threshold, S_threshold=threshold).picks)
    assert any("N, E missing" in n for n in run.notes)
    assert [s.what for s in run.skipped] == ["station BW.ODD."] and "no component the model reads" in run.skipped[0].reason


def test_gaps_are_left_to_seisbench(model, threshold, tmp_path):
    st = obspy.read()
    t0 = st[0].stats.starttime
    st.cutout(t0 + 12, t0 + 14)  # a 2 s data gap on every component
    st.write(str(tmp_path / "gap.mseed"), format="MSEED")
    run = pick_files(model, [tmp_path / "gap.mseed"], progress=False, P_threshold=threshold, S_threshold=threshold)
    assert run.stations == ["BW.RJOB."] and not run.skipped
    reread = obspy.read(str(tmp_path / "gap.mseed"))
    assert _key(run.picks) == _key(model.classify(reread, P_threshold=threshold, S_threshold=threshold).picks)
    assert any("3 gap(s)" in n for n in run.notes)


def _checkpoint(module, folder: Path, results: dict) -> Path:
    import pandas as pd

    folder.mkdir(parents=True)
    atomic_save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, folder / "model.ckpt")
    (folder / "config.json").write_text(json.dumps({"model": "SeisMoE", "data": "data/synth"}))
    (folder / "eval").mkdir()
    pd.DataFrame([results]).to_csv(folder / "eval" / "results.csv", index=False)
    return folder / "model.ckpt"


def test_exported_weights_classify_with_their_tuned_thresholds(threshold, tmp_path, capsys):
    from moelab.cli import main
    from moelab.seismic.lit import EQTransformerLit, SeisMoELit

    results = {"model": "SeisMoE", "data": "synth", "det_threshold": 0.41, "phase_threshold": 1.3,
               "P_threshold": round(threshold, 4), "S_threshold": round(threshold * 0.95, 4), "test_det_auc": 0.875, "dev_P_mae_s": 0.25}
    torch.manual_seed(0)
    ckpt = _checkpoint(SeisMoELit(base_model=None, in_samples=N), tmp_path / "moe", results)
    assert main(["seismic", "export", "--model_path", str(ckpt), "--out", str(tmp_path / "shared" / "seismoe")]) == 0
    assert "P_threshold=" in capsys.readouterr().out
    meta = json.loads((tmp_path / "shared" / "seismoe.json").read_text())
    assert meta["default_args"]["P_threshold"] == results["P_threshold"] and meta["default_args"]["detection_threshold"] == 0.41
    assert meta["model_args"]["num_experts"] == 4
    assert "test_det_auc=0.8750" in meta["docstring"] and "data/synth" in meta["docstring"] and "top-2-of-4" in meta["docstring"]

    loaded = SeisMoE.load(tmp_path / "shared" / "seismoe").eval()
    assert loaded.default_args["S_threshold"] == results["S_threshold"]
    st = obspy.read()
    tuned = dict(P_threshold=results["P_threshold"], S_threshold=results["S_threshold"], detection_threshold=0.41, **window_annotate_args(N))
    by_default = loaded.classify(st).picks
    assert len(by_default) > 0 and _key(by_default) == _key(load_trained(ckpt).classify(st, **tuned).picks)
    assert SeisMoE.from_base(tmp_path / "shared" / "seismoe").default_args["P_threshold"] == results["P_threshold"]  # base_model
    assert load_trained(tmp_path / "shared" / "seismoe").default_args == loaded.default_args  # --model_path

    # the dense model: SeisBench's own EQTransformer.load reads the same format
    torch.manual_seed(0)
    ckpt = _checkpoint(EQTransformerLit(in_samples=N), tmp_path / "eqt", {**results, "model": "EQTransformer"})
    json_path, _ = export_weights(ckpt, tmp_path / "shared" / "eqt")
    dense = EQTransformer.load(tmp_path / "shared" / "eqt")
    assert dense.default_args["P_threshold"] == results["P_threshold"] and "EQTransformer" in dense.weights_docstring
    assert type(load_trained(tmp_path / "shared" / "eqt")) is EQTransformer

    # pick with the exported weights through the CLI
    rec = tmp_path / "rec"
    rec.mkdir()
    st.write(str(rec / "a.mseed"), format="MSEED")
    assert main(["seismic", "pick", "--model_path", str(tmp_path / "shared" / "seismoe"), "--waveforms", str(rec),
                 "--out", str(tmp_path / "picked"), "--no_progress"]) == 0
    assert "picked 1 station(s)" in capsys.readouterr().out
    assert len(picks_table(by_default)) == len(open(tmp_path / "picked" / "picks.csv").read().splitlines()) - 1


def test_export_needs_the_tuned_thresholds(tmp_path):
    from moelab.seismic.lit import SeisMoELit

    torch.manual_seed(0)
    ckpt = _checkpoint(SeisMoELit(base_model=None, in_samples=N), tmp_path / "m", {"model": "SeisMoE", "det_threshold": 0.4})
    with pytest.raises(DataError, match=r"lack the tuned threshold\(s\) \['P_threshold', 'S_threshold'\].*run benchmark/eval.py again"):
        export_weights(ckpt, tmp_path / "x" / "m")
    (tmp_path / "m" / "eval" / "results.csv").unlink()
    with pytest.raises(DataError, match="run benchmark/eval.py --model_path"):
        export_weights(ckpt, tmp_path / "x" / "m")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_trained(tmp_path / "nowhere.ckpt")
