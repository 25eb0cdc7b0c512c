"""Generated SeisBench data sets (moelab.seismic.synth) and data resolution (moelab.seismic.data)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("seisbench")
pytest.importorskip("obspy")

import seisbench.data as sbd  # noqa: E402

from moelab.errors import ConfigError, DataError  # noqa: E402
from moelab.seismic import synth  # noqa: E402
from moelab.seismic.data import open_dataset, resolve_data  # noqa: E402

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    synth.make_dataset(out, n_traces=40, seed=7, n_samples=3001, noise_fraction=0.25)
    return out


def test_written_dataset_loads_with_seisbench(small):
    ds = sbd.WaveformDataset(small, component_order="ZNE", dimension_order="NCW")
    m = ds.metadata
    assert len(ds) == 40
    assert (m["trace_category"] == "noise").sum() == 10
    assert set(m["split"]) == {"train", "dev", "test"}
    assert (m["split"] == "train").sum() == 28 and (m["split"] == "dev").sum() == 6
    x = ds.get_waveforms(0)
    assert x.shape == (3, 3001) and np.isfinite(x).all()
    assert (m["trace_sampling_rate_hz"] == 100.0).all()
    noise = m[m["trace_category"] == "noise"]
    assert noise["trace_p_arrival_sample"].isna().all() and noise["trace_s_arrival_sample"].isna().all()


def test_onsets_follow_taup_travel_times(small):
    m = sbd.WaveformDataset(small).metadata
    ev = m[m["trace_category"] == "earthquake_local"]
    p, s = ev["trace_p_arrival_sample"].to_numpy(), ev["trace_s_arrival_sample"].to_numpy()
    assert (0 < p).all() and (p < s).all() and (s < 3001 - 199).all()
    # S-P equals the TauP S-P of the stored distance/depth unless it had to be shortened to fit
    expected = np.round((ev["path_s_travel_sec"] - ev["path_p_travel_sec"]).to_numpy() * 100)
    fits = expected < 3001 - 200 - p
    assert fits.sum() >= len(ev) // 2
    np.testing.assert_allclose((s - p)[fits], expected[fits], atol=1)


def test_travel_time_grid_matches_taup():
    from obspy.taup import TauPyModel

    model = TauPyModel("iasp91")
    for dist_km, depth in ((37.0, 8.0), (120.0, 15.0)):
        arr = model.get_travel_times(source_depth_in_km=depth, distance_in_degree=dist_km / 111.19, phase_list=["p", "P", "s", "S"])
        tp = min(a.time for a in arr if a.name.upper() == "P")
        ts = min(a.time for a in arr if a.name.upper() == "S")
        gp, gs = synth.travel_times(dist_km, depth)
        assert abs(gp - tp) < 0.3 and abs(gs - ts) < 0.5


def test_event_energy_arrives_at_the_p_onset(small):
    ds = sbd.WaveformDataset(small)
    m = ds.metadata
    ratios = []
    for i in np.flatnonzero((m["trace_category"] == "earthquake_local").to_numpy()):
        if m["trace_snr_db"].iloc[i] < 20:
            continue
        x = ds.get_waveforms(i)
        p = int(m["trace_p_arrival_sample"].iloc[i])
        ratios.append(np.abs(x[:, p : p + 300]).max() / (np.abs(x[:, :p]).max() + 1e-9))
    assert len(ratios) >= 5
    assert np.median(ratios) > 5  # real event trains stand out of real noise at the labelled onset


def test_same_seed_same_data_other_seed_differs(small, tmp_path):
    again = synth.make_dataset(tmp_path / "a", n_traces=40, seed=7, n_samples=3001, noise_fraction=0.25)
    other = synth.make_dataset(tmp_path / "b", n_traces=40, seed=8, n_samples=3001, noise_fraction=0.25)
    a, b, c = (sbd.WaveformDataset(p) for p in (small, again, other))
    np.testing.assert_array_equal(a.get_waveforms(3), b.get_waveforms(3))
    assert a.metadata["trace_p_arrival_sample"].equals(b.metadata["trace_p_arrival_sample"])
    assert not np.array_equal(a.get_waveforms(3), c.get_waveforms(3))


def test_source_parameters_come_from_the_packaged_real_stead_metadata(small):
    import pandas as pd

    raw = pd.read_csv(synth.STEAD_METADATA)
    assert len(raw) == 100 and (synth.STEAD_METADATA.parent / "STEAD_100SAMPLES_LICENSE.txt").is_file()
    eq = raw[raw["trace_category"].astype(str).str.startswith("earthquake")]
    table, origin = synth.load_source_table()
    assert origin == f"STEAD metadata stead_100samples.csv ({len(table['distance_km'])} events)"
    # every finite earthquake row becomes one source, in file order
    depth = pd.to_numeric(eq["source_depth_km"], errors="coerce")
    keep = eq[depth.notna() & eq["source_magnitude"].notna() & eq["source_distance_km"].notna()]
    assert 0 < len(table["distance_km"]) <= len(keep)
    np.testing.assert_array_equal(np.isin(table["p_fraction"] * 6000.0, keep["p_arrival_sample"].to_numpy(float)), True)
    m = sbd.WaveformDataset(small).metadata
    assert (m["trace_source"] == origin).all()


def test_source_metadata_file_can_be_given_and_bad_files_are_refused(tmp_path):
    import pandas as pd

    raw = pd.read_csv(synth.STEAD_METADATA)
    one = raw[raw["trace_category"].str.startswith("earthquake")].head(1)
    one.to_csv(tmp_path / "one.csv", index=False)
    out = synth.make_dataset(tmp_path / "one", n_traces=6, seed=1, n_samples=2000, noise_fraction=0.0, source_metadata=tmp_path / "one.csv")
    m = sbd.WaveformDataset(out).metadata
    assert (m["source_magnitude"] == float(one["source_magnitude"].iloc[0])).all()  # every event drawn from the one row
    with pytest.raises(DataError, match="does not exist"):
        synth.load_source_table(tmp_path / "missing.csv")
    raw.drop(columns=["snr_db"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['snr_db'\]"):
        synth.load_source_table(tmp_path / "bad.csv")


def test_refuses_to_overwrite_and_bad_sizes(small):
    with pytest.raises(DataError, match="already holds a data set"):
        synth.make_dataset(small, n_traces=5)
    with pytest.raises(ConfigError, match="n_samples must be >= 1000"):
        synth.make_dataset(small.parent / "x", n_traces=5, n_samples=500)


def test_resolve_data_names_and_folders(small):
    assert resolve_data("STEAD").kind == "named"
    assert resolve_data("stead").name == "STEAD"
    src = resolve_data(str(small))
    assert src.kind == "folder" and src.path == small
    assert resolve_data("ds", data_root=small.parent).path == small
    with pytest.raises(ConfigError, match="did you mean 'STEAD'"):
        resolve_data("STAED")
    ds = open_dataset(src)
    assert ds.metadata.shape[0] == 40


def test_cli_make_dataset(tmp_path, capsys):
    from moelab.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["seismic", "make-dataset", "--out", str(tmp_path / "c"), "--n-traces", "8", "--seed", "2", "--n-samples", "2000"])
    assert rc == 0
    assert "wrote 8 traces" in capsys.readouterr().out
    assert len(sbd.WaveformDataset(tmp_path / "c")) == 8


# ------------------------------------------------------------------------------------- domains
@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            d: synth.make_dataset(root / d, n_traces=30, seed=4, domain=d, n_samples=int(20 * synth.DOMAINS[d].sampling_rate))
            for d in ("ethz_like", "geofon_like")
        }


@pytest.mark.parametrize("name", ["ethz_like", "geofon_like"])
def test_domain_presets_write_their_rate_distances_and_picks(domains, name):
    dom = synth.DOMAINS[name]
    ds = sbd.WaveformDataset(domains[name], component_order="ZNE", dimension_order="NCW")
    m = ds.metadata
    n = int(20 * dom.sampling_rate)
    assert (m["trace_sampling_rate_hz"] == dom.sampling_rate).all() and (m["trace_npts"] == n).all()
    assert ds.get_waveforms(0).shape == (3, n) and (m["trace_domain"] == name).all()
    ev = m[m["trace_category"] != "noise"]
    assert (ev["trace_category"] == dom.category).all() and len(ev) == 30 - round(0.3 * 30)
    lo, hi = dom.distance_km
    assert ev["source_distance_km"].between(lo, hi).all()
    assert ev["trace_p_arrival_sample"].between(0, n - 1).all()
    if dom.s_picks:
        s, p = ev["trace_s_arrival_sample"].to_numpy(), ev["trace_p_arrival_sample"].to_numpy()
        assert (s > p).all()
        # S-P at the domain's rate is the TauP S-P unless it was shortened to fit the trace
        expected = (ev["path_s_travel_sec"] - ev["path_p_travel_sec"]).to_numpy() * dom.sampling_rate
        fits = p + expected < n - 2 * dom.sampling_rate
        assert fits.any()
        np.testing.assert_allclose((s - p)[fits], expected[fits], atol=dom.sampling_rate / 100 + 1)
    else:  # GEOFON-like: P picks only, S beyond the trace for nearly every teleseismic event
        assert ev["trace_s_arrival_sample"].isna().all() and m["trace_s_arrival_sample"].isna().all()
        tp, ts = ev["path_p_travel_sec"].to_numpy(), ev["path_s_travel_sec"].to_numpy()
        in_trace = ev["trace_p_arrival_sample"].to_numpy() + (ts - tp) * dom.sampling_rate <= n - 2 * dom.sampling_rate
        np.testing.assert_array_equal(ev["trace_s_in_trace"].to_numpy(bool), in_trace)


def test_domains_differ_as_stead_ethz_geofon_do():
    st, et, ge = (synth.DOMAINS[d] for d in ("stead_like", "ethz_like", "geofon_like"))
    assert st.distance_km is None and st.s_picks  # local distances from the STEAD metadata
    assert et.distance_km[1] <= 300 < ge.distance_km[1] and ge.distance_km[0] >= 300
    assert len({st.sampling_rate, et.sampling_rate, ge.sampling_rate}) == 3
    assert not ge.s_picks and et.noise_band_hz != ge.noise_band_hz
    with pytest.raises(ConfigError, match="did you mean 'geofon_like'"):
        synth.get_domain("geofon_lik")


def test_targets_of_a_resampled_domain_point_at_the_onsets(domains, tmp_path):
    """Loaded at 100 Hz (as the harness does), 20 Hz GEOFON-like onsets move to 100 Hz samples."""
    from moelab.seismic.evaluate import generate_targets

    ds = open_dataset(resolve_data(str(domains["geofon_like"])), sampling_rate=100.0)
    tg = generate_targets(ds, tmp_path / "t", task1_window_s=10.0, task23_window_s=5.0)
    import pandas as pd

    t23 = pd.read_csv(tg / "task23.csv")
    raw = sbd.WaveformDataset(domains["geofon_like"]).metadata.set_index("trace_name")
    assert len(t23) > 0 and set(t23["phase_label"]) == {"P"}
    np.testing.assert_allclose(t23["phase_onset"], raw.loc[t23["trace_name"], "trace_p_arrival_sample"].to_numpy() * 5)
    assert ((t23["start_sample"] <= t23["phase_onset"]) & (t23["phase_onset"] < t23["end_sample"])).all()


def test_cli_make_dataset_domain(tmp_path, capsys):
    from moelab.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["seismic", "make-dataset", "--out", str(tmp_path / "g"), "--n-traces", "6", "--domain", "geofon_like"])
    assert rc == 0 and "wrote 6 traces" in capsys.readouterr().out
    m = sbd.WaveformDataset(tmp_path / "g").metadata
    assert (m["trace_npts"] == synth.DOMAINS["geofon_like"].n_samples).all() and (m["trace_sampling_rate_hz"] == 20.0).all()


def test_cli_list_domains_follows_the_registry(capsys):
    """``--list-domains`` prints one line per preset and mixture, in registry order, and needs no
    ``--out``; the ``--domain`` help names the same set."""
    from moelab.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["seismic", "make-dataset", "--list-domains"])
    assert exc.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    names = [*synth.DOMAINS, *synth.MIXTURES]
    assert [line.split(": ", 1)[0] for line in lines] == names
    assert lines[names.index("geofon_like")] == f"geofon_like: {synth.DOMAINS['geofon_like'].description}"
    with pytest.raises(SystemExit):
        main(["seismic", "make-dataset", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(n in help_text for n in names)


def test_mixture_draws_each_trace_from_one_preset_at_its_own_rate(tmp_path):
    """``mixed_like``: every trace is one component preset's, stored at that preset's rate and
    the same duration; loaded at 100 Hz (as the harness does) all traces and onsets line up."""
    comps = synth.MIXTURES["mixed_like"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = synth.make_dataset(tmp_path / "mix", n_traces=24, seed=2, domain="mixed_like", n_samples=2000)
    m = sbd.WaveformDataset(path).metadata
    assert set(m["trace_domain"]) <= set(comps) and m["trace_domain"].nunique() >= 2
    rate = m["trace_domain"].map(lambda d: synth.DOMAINS[d].sampling_rate)
    assert (m["trace_sampling_rate_hz"] == rate).all()
    assert (m["trace_npts"] == (20 * rate).astype(int)).all()  # 20 s each, whatever the rate
    ev = m[m["trace_category"] != "noise"]
    assert (ev["trace_category"] == ev["trace_domain"].map(lambda d: synth.DOMAINS[d].category)).all()
    ds = open_dataset(resolve_data(str(path)), sampling_rate=100.0)
    for i in range(len(ds)):
        x, row = ds.get_sample(i)
        raw = m.iloc[i]
        assert x.shape == (3, 2000)
        if np.isfinite(raw["trace_p_arrival_sample"]):
            assert row["trace_p_arrival_sample"] == raw["trace_p_arrival_sample"] * 100.0 / raw["trace_sampling_rate_hz"]
    # a mixture is not one preset; the choices name it
    assert synth.domain_sampling_rate("mixed_like") == synth.DOMAINS[comps[0]].sampling_rate
    with pytest.raises(ConfigError, match="mixture of the presets"):
        synth.get_domain("mixed_like")
    with pytest.raises(ConfigError, match="did you mean 'mixed_like'"):
        synth.get_components("mixed_lik")


def test_presets_spread_p_and_early_p_versions_keep_the_earlier_ones():
    for name in ("stead_like", "ethz_like", "geofon_like"):
        new, old = synth.DOMAINS[name], synth.DOMAINS[f"{name}_early_p"]
        assert new.p_fraction == synth.SPREAD_P_FRACTION == (0.2, 0.7)
        assert old.p_fraction == synth.EARLY_P_FRACTION[name] and old.near_fraction == 0.0
        # everything else is the same domain
        assert {k: v for k, v in vars(new).items() if k not in ("name", "description", "p_fraction", "near_fraction")} == {
            k: v for k, v in vars(old).items() if k not in ("name", "description", "p_fraction", "near_fraction")
        }
    assert synth.EARLY_P_FRACTION == {"stead_like": None, "ethz_like": (0.05, 0.3), "geofon_like": (0.1, 0.4)}
    assert synth.DOMAINS["stead_like"].near_fraction == 0.25
    assert synth.DOMAINS["ethz_like"].near_fraction == synth.DOMAINS["geofon_like"].near_fraction == 0.0


def test_stead_like_draws_spread_p_and_near_source_events():
    table, _ = synth.load_source_table()
    rng = np.random.default_rng(0)
    dom = synth.DOMAINS["stead_like"]
    src = [synth.sample_source(table, rng, dom) for _ in range(2000)]
    p = np.array([s["p_fraction"] for s in src])
    assert p.min() >= 0.2 and p.max() <= 0.7
    dist = np.array([s["distance_km"] for s in src])
    assert 0.2 < (dist < 17.0).mean() < 0.35  # the packaged STEAD events are all >= 18 km away (jittered: rarely < 17)
    from dataclasses import replace

    all_near = [synth.sample_source(table, rng, replace(dom, near_fraction=1.0)) for _ in range(300)]
    assert all(1.0 <= s["distance_km"] <= 20.0 and 0.0 <= s["depth_km"] <= 10.0 for s in all_near)
    # the early-P preset draws nothing extra: the same generator state gives the original sources
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    early = [synth.sample_source(table, rng_a, synth.DOMAINS["stead_like_early_p"]) for _ in range(50)]
    original = [synth._sample_source(table, rng_b) for _ in range(50)]
    assert early == original


def test_weak_p_presets_scale_only_the_p_wave_train():
    """`Domain.p_gain` multiplies the P wave train (P onset to S onset) and nothing else: two traces
    drawn from the same generator state with gains 1 and g differ by (1 - g) times the same P train,
    so their differences for two gains are in the fixed ratio; noise and S are the same."""
    from dataclasses import replace

    table, _ = synth.load_source_table()
    base = replace(synth.DOMAINS["stead_like"], near_fraction=0.0)
    src = synth.sample_source(table, np.random.default_rng(3), base)
    traces = {}
    for g in (1.0, 0.5, 0.25):
        x, meta = synth.make_event_trace(6000, src, np.random.default_rng(7), replace(base, p_gain=(g, g)))
        traces[g] = x
        assert meta["trace_p_gain"] == g
    p, s = meta["trace_p_arrival_sample"], meta["trace_s_arrival_sample"]
    d1, d2 = traces[1.0] - traces[0.5], traces[1.0] - traces[0.25]
    outside = np.ones(6000, bool)
    outside[p:s] = False
    assert np.abs(d1[:, outside]).max() == 0.0 and np.abs(d2[:, outside]).max() == 0.0
    assert np.abs(d1[:, p:s]).max() > 0.0
    np.testing.assert_allclose(d2[:, p:s], 1.5 * d1[:, p:s], rtol=1e-9, atol=1e-12)
    # the presets: S-labelled domains get a weak-P version; nothing else differs, and the plain
    # presets draw no gain (their data sets reproduce)
    assert set(n for n in synth.DOMAINS if n.endswith("_weak_p")) == {"stead_like_weak_p", "ethz_like_weak_p"}
    for name in ("stead_like", "ethz_like"):
        weak, plain = synth.DOMAINS[f"{name}_weak_p"], synth.DOMAINS[name]
        assert weak.p_gain == synth.WEAK_P_GAIN and plain.p_gain is None
        assert replace(weak, name=name, description=plain.description, p_gain=None) == plain
    _, plain_meta = synth.make_event_trace(6000, src, np.random.default_rng(7), base)
    assert "trace_p_gain" not in plain_meta
    with pytest.raises(ConfigError, match="p_gain must be"):
        replace(base, p_gain=(0.0, 1.0))


def test_ethz_like_local_adds_near_sources_and_weaker_p_to_ethz_like(tmp_path):
    """``ethz_like_local`` is ``ethz_like`` with a quarter of near-source events and P trains at
    1/4-1x, nothing else; its data sets hold both traits in their metadata."""
    from dataclasses import replace

    local, plain = synth.DOMAINS["ethz_like_local"], synth.DOMAINS["ethz_like"]
    assert (local.near_fraction, local.p_gain) == (0.25, synth.LOCAL_P_GAIN) == (0.25, (0.25, 1.0))
    assert replace(local, name=plain.name, description=plain.description, near_fraction=0.0, p_gain=None) == plain
    path = synth.make_dataset(tmp_path / "local", n_traces=60, seed=1, n_samples=4000, domain="ethz_like_local")
    m = pd.read_csv(path / "metadata.csv")
    events = m[m["trace_category"] == "earthquake_regional"]
    near = events["source_distance_km"] < 10.0  # below ethz_like's own range: the near-source draw
    assert 0 < near.sum() < len(events)
    assert ((events["path_s_travel_sec"] - events["path_p_travel_sec"])[near] < 2.5).all()
    gains = events["trace_p_gain"].dropna()
    assert len(gains) > 0 and gains.between(0.25, 1.0).all()


def test_ethz_like_dense_raises_only_the_near_source_snr():
    """``ethz_like_dense`` is ``ethz_like_local`` with one more draw for its near-source events, their
    SNR from `DENSE_NEAR_SNR_DB` clipped to 10-60 dB; the far events keep ``ethz_like``'s 3-50 dB draw,
    and presets without ``near_snr_db`` draw exactly what they drew before."""
    from dataclasses import replace

    dense, local = synth.DOMAINS["ethz_like_dense"], synth.DOMAINS["ethz_like_local"]
    assert dense.near_snr_db == synth.DENSE_NEAR_SNR_DB == (35.0, 10.0) and dense.near_snr_clip == (10.0, 60.0)
    assert replace(dense, name=local.name, description=local.description, near_snr_db=None) == local
    table, _ = synth.load_source_table()
    rng = np.random.default_rng(5)
    near = np.array([synth.sample_source(table, rng, replace(dense, near_fraction=1.0))["snr_db"] for _ in range(1000)])
    far = np.array([synth.sample_source(table, rng, replace(dense, near_fraction=0.0))["snr_db"] for _ in range(1000)])
    assert near.min() >= 10.0 and near.max() <= 60.0 and 3.0 <= far.min() and far.max() <= 50.0
    assert 33.0 < near.mean() < 37.0 and 16.0 < far.mean() < 20.0
    # the extra draw is made only where near_snr_db is set: ethz_like_local's sources reproduce
    rng_a, rng_b = np.random.default_rng(2), np.random.default_rng(2)
    a = [synth.sample_source(table, rng_a, local) for _ in range(50)]
    b = [synth.sample_source(table, rng_b, replace(dense, near_snr_db=None)) for _ in range(50)]
    assert a == b


@pytest.mark.parametrize("parent", ["ethz_like_dense", "stead_like_weak_p"])
def test_hf_presets_compress_only_the_near_source_events(parent):
    """``<parent>_hf`` draws the near-source events' time stretch from `DENSE_NEAR_STRETCH` (one
    draw, as before: the far events, and every other preset, come out as they did)."""
    from dataclasses import replace

    hf, dense = synth.DOMAINS[f"{parent}_hf"], synth.DOMAINS[parent]
    assert dense.near_fraction == 0.25
    assert hf.near_stretch == synth.DENSE_NEAR_STRETCH == (0.4, 0.8)
    assert replace(hf, name=dense.name, description=dense.description, near_stretch=None) == dense
    table, _ = synth.load_source_table()
    for near in (True, False):
        src = synth.sample_source(table, np.random.default_rng(4), replace(hf, near_fraction=float(near)))
        assert src.get("near_source", False) is near
        x_hf, m_hf = synth.make_event_trace(6000, src, np.random.default_rng(9), hf)
        x_d, m_d = synth.make_event_trace(6000, src, np.random.default_rng(9), dense)
        lo, hi = hf.near_stretch if near else hf.stretch
        assert lo <= m_hf["trace_stretch_factor"] <= hi
        if near:  # the same uniform draw mapped onto the other range
            u = np.log(m_d["trace_stretch_factor"] / dense.stretch[0]) / np.log(dense.stretch[1] / dense.stretch[0])
            assert m_hf["trace_stretch_factor"] == pytest.approx(lo * (hi / lo) ** u, rel=1e-3)
        else:
            np.testing.assert_array_equal(x_hf, x_d)
            assert m_hf == m_d
    with pytest.raises(ConfigError, match="near_stretch must be"):
        replace(hf, near_stretch=(0.8, 0.4))


def test_event_trains_take_z_n_e_by_component_code():
    """The wave trains are cut from the Z, N, E channels by name: a record named X, Y, Z (like the
    Kinemetrics file earlier versions used) is refused instead of putting a horizontal in the Z slot."""
    import obspy

    trains = synth.event_trains()
    assert len(trains) == len(synth.EVENT_RECORDINGS)
    rjob = obspy.read()  # BW.RJOB EHZ, EHN, EHE
    shuffled = obspy.Stream([rjob[2], rjob[0], rjob[1]])
    assert [tr.stats.channel for tr in synth._zne(shuffled, "test")] == ["EHZ", "EHN", "EHE"]
    for tr, comp in zip(shuffled, "XYZ", strict=True):
        tr.stats.channel = "HN" + comp
    with pytest.raises(DataError, match="exactly one N channel"):
        synth._zne(shuffled, "test")
    # the RJOB train is cut at its S onset (5.70 s), where the horizontals triple in amplitude
    ev = next(t for t in trains if t.name == "BW.RJOB")
    p_len = ev.p_train.shape[-1]
    assert p_len == round((5.70 - 4.73) * synth.SAMPLING_RATE)
    h_p = np.sqrt((ev.p_train[1:, -30:] ** 2).mean())
    h_s = np.sqrt((ev.s_train[1:, :30] ** 2).mean())
    assert h_s > 2 * h_p
