"""Small SeisBench-format data sets built from real recordings, for offline training and tests.

STEAD/ETHZ cannot be downloaded here, so this module assembles learnable data sets from what is
available offline, keeping every ingredient real where possible:

* event signals: P-wave trains (P onset to S onset) and S-wave trains (S onset onwards) cut from
  real three-component local-earthquake recordings bundled with ObsPy (BW.RJOB from `obspy.read()`,
  four Montserrat stations). The ObsPy AR-picker test
  recordings (``loc_RJOB20050801145719850.*``) are deliberately *not* used, so that the real-signal
  check in `moelab.seismic.realcheck` picks data the model has never seen;
* noise: real background noise cut from long ObsPy recordings (an hour of two co-located 200 Hz
  sensors, a New Zealand broadband record, a Bavarian short-period record);
* onsets: S-P times from ObsPy TauP (iasp91) travel times for sampled distances/depths, drawn from
  the metadata of 100 real STEAD traces shipped with this package (``resources/stead_100samples.csv``,
  from the MIT-licensed EQTransformer repository; see ``resources/STEAD_100SAMPLES_LICENSE.txt``):
  distance, depth, magnitude, SNR and the P position within the trace. Any other metadata file in
  STEAD's column layout (the full STEAD ``merge.csv``, say) can be given instead.

Diversity comes from time stretching, horizontal rotation, polarity flips and SNR. The result is
written with `seisbench.data.WaveformDataWriter` (``metadata.csv`` + ``waveforms.hdf5``, splits
train/dev/test) and loads with ``seisbench.data.WaveformDataset(path)``.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from moelab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SAMPLING_RATE = 100.0
#: The packaged real STEAD metadata (100 traces) the source parameters are drawn from by default.
STEAD_METADATA = Path(__file__).resolve().parent / "resources" / "stead_100samples.csv"
#: STEAD metadata columns the generator reads.
STEAD_COLUMNS = ("trace_category", "source_distance_km", "source_depth_km", "source_magnitude", "snr_db", "p_arrival_sample")

# Real three-component local events: (file relative to the obspy package or None for obspy.read(),
# station, P onset s, S onset s), channels in Z, N, E order. Onsets were read off the 1-20 Hz
# band-passed, 100 Hz resampled recordings with ObsPy's ar_pick where it was stable and checked on
# plots; they decide where a wave train is cut, and the generated traces are labelled where the cut
# train is placed, so an onset off by half a second is a label off by half a second in every trace
# drawn from that train. BW.RJOB's S is 5.70 s, not ar_pick's 6.20 s: its horizontals triple in
# amplitude at 5.70 s (H/V from 0.9 to 2.5; AIC on N and E: 5.76 s, 5.70 s), and 6.20 s lies in the
# S coda. The Kinemetrics record STNA.20020722.044649 that earlier versions used is left out: its
# channels are X, Y, Z (its header), not Z, N, E as they were read, and its horizontal energy rises
# 0.3 s before its vertical does, so no P or S onset can be read off it.
EVENT_RECORDINGS: tuple[tuple[str | None, str | None, float, float], ...] = (
    (None, "RJOB", 4.73, 5.70),
    ("io/seisan/tests/data/9701-30-1048-54S.MVO_21_1", "MBGA", 10.64, 14.38),
    ("io/seisan/tests/data/9701-30-1048-54S.MVO_21_1", "MBGE", 11.24, 15.49),
    ("io/seisan/tests/data/9701-30-1048-54S.MVO_21_1", "MBGH", 11.47, 15.82),
    ("io/seisan/tests/data/9701-30-1048-54S.MVO_21_1", "MBGB", 12.77, 18.20),
)
# Long real noise recordings (single component; three independent cuts make a 3-C noise trace).
NOISE_RECORDINGS: tuple[str, ...] = (
    "signal/tests/data/ref_STS2",
    "signal/tests/data/ref_unknown",
    "signal/tests/data/CRLZ.HHZ.10.NZ.SAC",
    "io/mseed/tests/data/timingquality.mseed",
)

#: Largest epicentral distance the travel-time grid covers (first P is still a direct P there).
MAX_DISTANCE_KM = 9000.0


@dataclass(frozen=True)
class Domain:
    """How one generated data set differs from another, the way STEAD, ETHZ and GEOFON differ.

    Args:
        name: preset name (``stead_like``, ``ethz_like``, ``geofon_like``).
        description: one line saying what it imitates.
        sampling_rate: Hz the traces are stored at (SeisBench resamples on loading, as for GEOFON).
        n_samples: default trace length in samples at ``sampling_rate``.
        distance_km: epicentral distance range, drawn log-uniformly; ``None`` draws the distance
            from the real STEAD metadata (local events), as the original generator did.
        depth_km: source depth range (uniform); ``None``: from the STEAD metadata.
        snr_db: (mean, std) of a normal SNR draw; ``None``: from the STEAD metadata.
        snr_clip: SNR range the draw is clipped to.
        p_fraction: range of the P position as a fraction of the trace; ``None``: STEAD metadata.
        stretch: range of the event time-stretch factor; larger factors lower the corner
            frequency (teleseismic P is far poorer in high frequencies than a local P).
        noise_band_hz: extra band-pass of the real noise (noise type: ``None`` keeps the
            1-20 Hz broadband noise, a high band imitates cultural noise, a low one microseism).
        s_picks: whether S onsets are labelled; ``False`` gives P-only metadata as in GEOFON,
            whose training then needs ``detection_fixed_window`` (pick-benchmark: 2000 samples).
        s_must_fit: shorten S-P so that S and 2 s of S wave fit in the trace (local data sets);
            ``False`` leaves S out of the trace when TauP puts it beyond the end (teleseismic).
        category: ``trace_category`` of the event traces.
        near_fraction: share of events replaced by near-source ones (epicentral distance drawn
            log-uniformly from ``near_distance_km``, depth uniformly from ``near_depth_km``), whose
            S-P times (0.2-2.5 s) the 100 packaged STEAD traces (all >= 18 km away) never give;
            real STEAD holds many such events, and so does ObsPy's real test event (S-P 0.53 s).
            0: no draw at all (the earlier presets reproduce exactly).
        near_distance_km / near_depth_km: ranges of the near-source events.
        p_gain: range of a log-uniform factor on the P wave train's amplitude (the S wave, and so
            the SNR, unchanged). The five source events have S peaks 1.0-2.0x their P peaks; real
            local S waves are often several times stronger (ObsPy's real test event: 7.8x), and
            models trained without such traces took that event's S for its P. ``None``: no
            draw (the other presets reproduce exactly).
        near_snr_db: (mean, std) of a normal SNR draw for the near-source events only, clipped to
            ``near_snr_clip``: a station a few km from the source records it far above the noise
            (ObsPy's real test event, S-P 0.53 s: S 47 dB, P 33 dB over the pre-event noise), which
            a domain-wide draw like ``ethz_like``'s 18 +- 8 dB almost never gives. ``None``: the
            near-source events keep the domain's SNR (and no extra draw is made).
        near_snr_clip: SNR range the near-source draw is clipped to.
        near_stretch: range of the time-stretch factor of the near-source events, in place of
            ``stretch``: small events a few km away reach the station with their high frequencies
            (ObsPy's real test event: P centred at 19 Hz, where the five source events' P trains
            centre at 4-12 Hz). ``None``: ``stretch`` for every event.
    """

    name: str
    description: str
    sampling_rate: float = SAMPLING_RATE
    n_samples: int = 6000
    distance_km: tuple[float, float] | None = None
    depth_km: tuple[float, float] | None = None
    snr_db: tuple[float, float] | None = None
    snr_clip: tuple[float, float] = (5.0, 90.0)
    p_fraction: tuple[float, float] | None = None
    stretch: tuple[float, float] = (0.8, 1.25)
    noise_band_hz: tuple[float, float] | None = None
    s_picks: bool = True
    s_must_fit: bool = True
    category: str = "earthquake_local"
    near_fraction: float = 0.0
    near_distance_km: tuple[float, float] = (1.0, 20.0)
    near_depth_km: tuple[float, float] = (0.0, 10.0)
    p_gain: tuple[float, float] | None = None
    near_snr_db: tuple[float, float] | None = None
    near_snr_clip: tuple[float, float] = (10.0, 60.0)
    near_stretch: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        for field, value, what in (
            ("p_gain", self.p_gain, "a log-uniform factor on the P wave train"),
            ("near_stretch", self.near_stretch, "a log-uniform time-stretch factor of the near-source events"),
        ):
            if value is not None and not 0 < value[0] <= value[1]:
                raise ConfigError(f"Domain '{self.name}': {field} must be (low, high) with 0 < low <= high ({what}), got {value}")


#: P position range (fraction of the trace) of every preset: P 12-42 s into a 60 s trace, so that
#: training windows cut around a pick put P (and S, which follows at the TauP S-P time) anywhere in
#: the model window. STEAD's own P positions (2-18 s into the trace, what ``p_fraction=None`` draws
#: from the metadata) put P in the first seconds of most training windows, and the P head learned
#: that position prior instead of the onset: P came out 0.5 s early on the centred evaluation
#: windows (see the ``*_early_p`` presets, which keep those positions).
SPREAD_P_FRACTION: tuple[float, float] = (0.2, 0.7)

_PRESETS: tuple[Domain, ...] = (
    Domain(
        "stead_like",
        "STEAD: local events (distance, depth and SNR from real STEAD metadata, a quarter near-source at 1-20 km, P 20-70% into the trace), 100 Hz, P and S picks",
        p_fraction=SPREAD_P_FRACTION,
        near_fraction=0.25,
    ),
    Domain(
        "ethz_like",
        "ETHZ: local-to-regional events at 10-300 km, crustal depths, lower SNR, high-frequency (cultural) noise, 200 Hz, P and S picks",
        sampling_rate=200.0,
        n_samples=12000,
        distance_km=(10.0, 300.0),
        depth_km=(0.0, 25.0),
        snr_db=(18.0, 8.0),
        snr_clip=(3.0, 50.0),
        p_fraction=SPREAD_P_FRACTION,
        stretch=(0.7, 1.4),
        noise_band_hz=(3.0, 20.0),
        category="earthquake_regional",
    ),
    Domain(
        "geofon_like",
        "GEOFON: regional-to-teleseismic events at 300-9000 km, low-frequency P, microseism-dominated noise, low SNR, 20 Hz, P picks only",
        sampling_rate=20.0,
        n_samples=1200,
        distance_km=(300.0, MAX_DISTANCE_KM),
        depth_km=(0.0, 40.0),
        snr_db=(12.0, 6.0),
        snr_clip=(0.0, 35.0),
        p_fraction=SPREAD_P_FRACTION,
        stretch=(2.0, 4.0),
        noise_band_hz=(1.0, 4.0),
        s_picks=False,
        s_must_fit=False,
        category="earthquake_teleseismic",
    ),
)
#: The presets as they were before P was spread (``stead_like_early_p``: the original generator,
#: P position from the STEAD metadata; ``ethz_like_early_p``: P 5-30%; ``geofon_like_early_p``: P
#: 10-40% into the trace). They reproduce the data sets of earlier measurements exactly.
EARLY_P_FRACTION: dict[str, tuple[float, float] | None] = {"stead_like": None, "ethz_like": (0.05, 0.3), "geofon_like": (0.1, 0.4)}

#: Named presets of `make_dataset` (``moelab seismic make-dataset --domain NAME``): the three
#: domains with spread P positions, then their ``*_early_p`` versions (the earlier presets).
DOMAINS: dict[str, Domain] = {d.name: d for d in _PRESETS}
_EARLY_P_NOTE = {
    "stead_like": "P position from the STEAD metadata (2-18 s into 60 s), no near-source events",
    "ethz_like": "P 5-30% into the trace",
    "geofon_like": "P 10-40% into the trace",
}
DOMAINS.update(
    {
        f"{d.name}_early_p": replace(
            d,
            name=f"{d.name}_early_p",
            description=f"{d.description.split(' (')[0] if d.name == 'stead_like' else d.description}; as first generated: {_EARLY_P_NOTE[d.name]}",
            p_fraction=EARLY_P_FRACTION[d.name],
            near_fraction=0.0,
        )
        for d in _PRESETS
    }
)


#: `Domain.p_gain` of the ``*_weak_p`` presets: P wave trains at 1/8 to 1x their recorded amplitude,
#: so that S peaks span about 0.6-10x the P peaks, as in real local records.
WEAK_P_GAIN: tuple[float, float] = (0.125, 1.0)
DOMAINS.update(
    {
        f"{d.name}_weak_p": replace(
            d, name=f"{d.name}_weak_p", description=f"{d.description}; P wave trains scaled by 1/8-1x (S up to ~10x the P)", p_gain=WEAK_P_GAIN
        )
        for d in _PRESETS
        if d.s_picks
    }
)


def _derive(parent: str, name: str, adds: str, **changes: Any) -> None:
    """Register preset ``name``: preset ``parent`` with ``changes``, its description extended by ``adds``."""
    base = DOMAINS[parent]
    DOMAINS[name] = replace(base, name=name, description=f"{base.description}; {adds}", **changes)


#: `Domain.p_gain` of ``ethz_like_local``: P wave trains at 1/4 to 1x (S up to ~5x the P). Milder than
#: `WEAK_P_GAIN`: at ETHZ-like SNRs (18 +- 8 dB) a P at 1/8 of its amplitude is often under the noise.
LOCAL_P_GAIN: tuple[float, float] = (0.25, 1.0)
#: SNR (mean, std in dB) of the near-source events of ``ethz_like_dense``, clipped to 10-60 dB.
DENSE_NEAR_SNR_DB: tuple[float, float] = (35.0, 10.0)
#: Time-stretch range of the near-source events of ``ethz_like_dense_hf``: compressed 1.25-2.5x, so
#: that their P trains centre at about 5-30 Hz (the five source events' at 4-12 Hz).
DENSE_NEAR_STRETCH: tuple[float, float] = (0.4, 0.8)

#: ``ethz_like_local``: ETHZ as a dense local network records it. A quarter of the events are
#: near-source (1-20 km, S-P 0.2-2.5 s) and P trains are scaled by `LOCAL_P_GAIN`, the two traits of
#: ObsPy's real test event (S-P 0.53 s, S 7.8x its P) that plain ``ethz_like`` (10-300 km, P at
#: recorded strength) never shows; models fine-tuned on plain ``ethz_like`` picked that event's P late.
_derive("ethz_like", "ethz_like_local", "a quarter near-source (1-20 km) and P wave trains scaled by 1/4-1x (a dense local network)", near_fraction=0.25, p_gain=LOCAL_P_GAIN)
#: ``ethz_like_dense``: ``ethz_like_local`` whose near-source events are recorded as close stations
#: record them, far above the noise (`DENSE_NEAR_SNR_DB`), the rest unchanged. In ``ethz_like_local``
#: the S wave sits 18 +- 8 dB over the noise and the weakened P 0-18 dB below the S, so a P onset as
#: clear as the real test event's (33 dB) is almost never seen, and models fine-tuned on it put that
#: event's P from its S (a broad hump 0.1-0.5 s early) rather than at the onset.
_derive("ethz_like_local", "ethz_like_dense", "near-source events at high SNR (35 +- 10 dB, a station a few km away)", near_snr_db=DENSE_NEAR_SNR_DB)
#: ``ethz_like_dense_hf``: ``ethz_like_dense`` whose near-source events also keep their high
#: frequencies (`DENSE_NEAR_STRETCH`). Models fine-tuned on ``ethz_like_local`` that miss the real
#: test event's P pick it once the recording is slowed down 1.5x (`moelab.seismic.probe`): its P,
#: centred at 19 Hz, is above the frequencies of every P they were trained on.
_HF_ADDS = "near-source events compressed 1.25-2.5x in time (high-frequency P)"
_derive("ethz_like_dense", "ethz_like_dense_hf", _HF_ADDS, near_stretch=DENSE_NEAR_STRETCH)
#: ``stead_like_weak_p_hf``: ``stead_like_weak_p`` (the quality benchmark's base domain) whose
#: near-source quarter keeps its high frequencies too (`DENSE_NEAR_STRETCH`). Of two bases trained
#: 40 epochs on ``stead_like_weak_p`` one picked the real test event's P, the other put it 2.9 s
#: early (and picked it once slowed 1.5x); both trained on this preset pick it, but the models
#: fine-tuned from them on ``ethz_like_dense`` pick it no more often (9 of 12, README).
_derive("stead_like_weak_p", "stead_like_weak_p_hf", _HF_ADDS, near_stretch=DENSE_NEAR_STRETCH)


#: Named mixtures of presets (``make_dataset(domain="mixed_like")``): every trace comes from one
#: component preset, drawn uniformly, at that preset's own sampling rate. A heterogeneous data set
#: -- local 100 Hz records beside regional 200 Hz ones with cultural noise, normal P beside P trains
#: at 1/8-1x -- is what several networks pooled into one training set look like, and the regime in
#: which a mixture of experts is expected to pay (experts specialising by source of data).
MIXTURES: dict[str, tuple[str, ...]] = {
    "mixed_like": ("stead_like", "ethz_like", "ethz_like_weak_p"),
}


def domain_descriptions() -> dict[str, str]:
    """Every name `make_dataset` accepts (presets, then mixtures) with what it generates, so that
    the CLI's ``--domain`` help and ``--list-domains`` follow the registry instead of a copy of it."""
    out = {name: d.description for name, d in DOMAINS.items()}
    out.update({name: f"each trace from one of {', '.join(comps)}, at that preset's own sampling rate (data pooled from several networks)" for name, comps in MIXTURES.items()})
    return out


def _unknown_domain(domain: object) -> ConfigError:
    from moelab.validation import did_you_mean

    names = [*DOMAINS, *MIXTURES]
    return ConfigError(f"unknown domain '{domain}'{did_you_mean(str(domain), names)}; choose one of {', '.join(names)}")


def get_domain(domain: str | Domain | None) -> Domain:
    """The preset named ``domain`` (``None``: ``stead_like``, the original generator)."""
    if isinstance(domain, Domain):
        return domain
    if domain is None:
        return DOMAINS["stead_like"]
    if domain in MIXTURES:
        raise ConfigError(f"'{domain}' is a mixture of the presets {', '.join(MIXTURES[domain])}, not one preset; use get_components")
    if domain not in DOMAINS:
        raise _unknown_domain(domain)
    return DOMAINS[domain]


def get_components(domain: str | Domain | None) -> tuple[Domain, ...]:
    """The presets a data set named ``domain`` draws its traces from: one for a preset, several for
    a `MIXTURES` name. The first one's sampling rate and length are the data set's reference."""
    if isinstance(domain, str) and domain in MIXTURES:
        return tuple(DOMAINS[d] for d in MIXTURES[domain])
    return (get_domain(domain),)


def domain_sampling_rate(domain: str | Domain | None) -> float:
    """Sampling rate (Hz) of a preset, or of a mixture's first component (its reference rate)."""
    return get_components(domain)[0].sampling_rate


@dataclass(frozen=True)
class EventTrain:
    """One real event: P train (P onset to S onset) and S train (S onset onwards), 3 x samples, ZNE."""

    name: str
    p_train: np.ndarray
    s_train: np.ndarray
    pre_noise: np.ndarray


def _obspy_dir() -> Path:
    import obspy

    return Path(obspy.__file__).parent


def _prepare(st, sr: float = SAMPLING_RATE):
    """Band-pass 1-20 Hz (causal, like the event cut points were determined) and resample to ``sr``."""
    st = st.copy()
    st.detrend("demean")
    st.taper(0.05)
    st.filter("bandpass", freqmin=1.0, freqmax=20.0, corners=4)
    for tr in st:
        if tr.stats.sampling_rate != sr:
            tr.resample(sr)
    return st


def _zne(st, source: str):
    """The Z, N and E traces of ``st`` in that order, chosen by component code, never by position:
    a record whose channels are named otherwise (X, Y, Z) would put a horizontal where the model
    expects the vertical."""
    import obspy

    picked = []
    for comp in "ZNE":
        sel = st.select(component=comp)
        if len(sel) != 1:
            have = ", ".join(tr.stats.channel for tr in st)
            raise DataError(f"event recording {source} needs exactly one {comp} channel (has: {have})")
        picked.append(sel[0])
    return obspy.Stream(picked)


@functools.lru_cache(maxsize=1)
def event_trains() -> tuple[EventTrain, ...]:
    """Cut the P and S wave trains out of the bundled real recordings (cached per process)."""
    import obspy

    root = _obspy_dir()
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rel, station, p_s, s_s in EVENT_RECORDINGS:
            st = obspy.read() if rel is None else obspy.read(str(root / rel))
            if station is not None:
                st = st.select(station=station)
            st = _prepare(_zne(st, rel or "obspy.read()"))
            n = min(len(tr) for tr in st)
            data = np.stack([tr.data[:n] for tr in st]).astype(np.float64)
            p, s = int(round(p_s * SAMPLING_RATE)), int(round(s_s * SAMPLING_RATE))
            name = f"{st[0].stats.network}.{st[0].stats.station}".strip(".")
            out.append(EventTrain(name=name, p_train=data[:, p:s], s_train=data[:, s:], pre_noise=data[:, 300:p]))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def noise_records() -> tuple[np.ndarray, ...]:
    """Real noise records at 100 Hz, band-passed like the events, each scaled to unit std."""
    import obspy

    root = _obspy_dir()
    recs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rel in NOISE_RECORDINGS:
            st = obspy.read(str(root / rel))
            st.merge(fill_value=0)
            for tr in _prepare(st[:1]):
                d = tr.data.astype(np.float64)[500:-500]
                recs.append(d / d.std())
        for ev in event_trains():  # pre-event noise of the event recordings (short)
            for comp in ev.pre_noise:
                if len(comp) > 200:
                    recs.append(comp / comp.std())
    return tuple(recs)


@functools.lru_cache(maxsize=1)
def _travel_time_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """First P and S travel times (iasp91) on a distance x depth grid, interpolated per trace."""
    from obspy.taup import TauPyModel

    model = TauPyModel("iasp91")
    # local/regional points as before, then up to 9,000 km (~81 deg, before P diffracts at the core)
    dists = np.concatenate([np.geomspace(1.0, 300.0, 14), np.geomspace(300.0, MAX_DISTANCE_KM, 12)[1:]])
    depths = np.array([0.0, 5.0, 10.0, 20.0, 40.0])
    tp = np.zeros((len(dists), len(depths)))
    ts = np.zeros_like(tp)
    for i, d in enumerate(dists):
        for j, z in enumerate(depths):
            arr = model.get_travel_times(source_depth_in_km=z, distance_in_degree=d / 111.19, phase_list=["p", "P", "s", "S"])
            tp[i, j] = min(a.time for a in arr if a.name.upper() == "P")
            ts[i, j] = min(a.time for a in arr if a.name.upper() == "S")
    return dists, depths, tp, ts


def travel_times(distance_km: float, depth_km: float) -> tuple[float, float]:
    """First P and S travel times in seconds (iasp91, bilinear in log-distance and depth)."""
    dists, depths, tp, ts = _travel_time_grid()
    x = np.log(np.clip(distance_km, dists[0], dists[-1]))
    z = float(np.clip(depth_km, depths[0], depths[-1]))
    lx = np.log(dists)
    i = int(np.clip(np.searchsorted(lx, x) - 1, 0, len(lx) - 2))
    j = int(np.clip(np.searchsorted(depths, z) - 1, 0, len(depths) - 2))
    fx = (x - lx[i]) / (lx[i + 1] - lx[i])
    fz = (z - depths[j]) / (depths[j + 1] - depths[j])

    def interp(t):
        return float((1 - fx) * (1 - fz) * t[i, j] + fx * (1 - fz) * t[i + 1, j] + (1 - fx) * fz * t[i, j + 1] + fx * fz * t[i + 1, j + 1])

    return interp(tp), interp(ts)


def _parse_snr(value) -> float:
    """STEAD stores SNR per component as '[ 56.8 55.4 47.4]'; use the mean."""
    try:
        vals = [float(v) for v in str(value).strip("[]").split()]
        return float(np.mean(vals)) if vals else float("nan")
    except ValueError:
        return float("nan")


def load_source_table(metadata: str | Path | None = None) -> tuple[dict[str, np.ndarray], str]:
    """Per-event source parameters from real STEAD metadata.

    ``metadata``: a CSV in STEAD's column layout; ``None`` reads the 100-trace file shipped with the
    package, so every machine generates the same data set from the same seed.
    """
    import pandas as pd

    path = STEAD_METADATA if metadata is None else Path(metadata)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise DataError(f"STEAD metadata file '{path}' {what}: pass a STEAD-format metadata CSV, or omit it to use the packaged one")
    try:
        m = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"STEAD metadata file '{path}' is not a readable CSV: {e}") from None
    missing = [c for c in STEAD_COLUMNS if c not in m.columns]
    if missing:
        raise DataError(f"STEAD metadata file '{path}' lacks the column(s) {missing}: it must use STEAD's metadata layout")
    m = m[m["trace_category"].astype(str).str.startswith("earthquake")]
    table = {
        "distance_km": pd.to_numeric(m["source_distance_km"], errors="coerce").to_numpy(float),
        "depth_km": pd.to_numeric(m["source_depth_km"], errors="coerce").to_numpy(float),
        "magnitude": pd.to_numeric(m["source_magnitude"], errors="coerce").to_numpy(float),
        "snr_db": np.array([_parse_snr(v) for v in m["snr_db"]], dtype=float),
        "p_fraction": pd.to_numeric(m["p_arrival_sample"], errors="coerce").to_numpy(float) / 6000.0,
    }
    ok = np.all([np.isfinite(v) for v in table.values()], axis=0)
    if not ok.any():
        raise DataError(f"STEAD metadata file '{path}' holds no earthquake row with finite distance, depth, magnitude, SNR and P sample")
    return {k: v[ok] for k, v in table.items()}, f"STEAD metadata {path.name} ({int(ok.sum())} events)"


def _sample_source(table: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, float]:
    i = rng.integers(len(table["distance_km"]))
    return {
        # jitter so that 100 real events become a continuous distribution around them
        "distance_km": float(np.clip(table["distance_km"][i] * np.exp(rng.normal(0, 0.25)), 2.0, 250.0)),
        "depth_km": float(np.clip(table["depth_km"][i] + rng.normal(0, 2.0), 0.0, 40.0)),
        "magnitude": float(table["magnitude"][i]),
        "snr_db": float(np.clip(table["snr_db"][i] + rng.normal(0, 3.0), 5.0, 90.0)),
        "p_fraction": float(np.clip(table["p_fraction"][i] + rng.normal(0, 0.01), 0.03, 0.3)),
    }


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    """One draw, log-uniform on ``bounds`` (one ``rng.uniform`` call: the generated data sets do not change)."""
    lo, hi = bounds
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def sample_source(table: dict[str, np.ndarray], rng: np.random.Generator, domain: Domain) -> dict[str, float | bool]:
    """Source parameters of one event: the STEAD-metadata draw, then the domain's own ranges.

    The STEAD draw comes first for every domain, so ``stead_like`` reproduces the original
    generator's data exactly; other domains replace distance, depth, SNR and P position. A
    near-source draw is marked ``near_source: True`` (`make_event_trace` reads it for ``near_stretch``).
    """
    src = _sample_source(table, rng)
    if domain.distance_km is not None:
        src["distance_km"] = _log_uniform(rng, domain.distance_km)
    if domain.depth_km is not None:
        src["depth_km"] = float(rng.uniform(*domain.depth_km))
    if domain.snr_db is not None:
        src["snr_db"] = float(np.clip(rng.normal(*domain.snr_db), *domain.snr_clip))
    if domain.p_fraction is not None:
        src["p_fraction"] = float(rng.uniform(*domain.p_fraction))
    if domain.near_fraction > 0 and rng.random() < domain.near_fraction:
        src["distance_km"] = _log_uniform(rng, domain.near_distance_km)
        src["depth_km"] = float(rng.uniform(*domain.near_depth_km))
        src["near_source"] = True
        if domain.near_snr_db is not None:
            src["snr_db"] = float(np.clip(rng.normal(*domain.near_snr_db), *domain.near_snr_clip))
    return src


def _band(x: np.ndarray, band_hz: tuple[float, float] | None) -> np.ndarray:
    """Zero-phase band-pass of (3, n) noise at 100 Hz, each component back to unit std."""
    if band_hz is None:
        return x
    from scipy.signal import butter, sosfiltfilt

    sos = butter(4, band_hz, btype="bandpass", fs=SAMPLING_RATE, output="sos")
    y = sosfiltfilt(sos, x, axis=-1)
    return y / (y.std(axis=-1, keepdims=True) + 1e-12)


def _resample(x: np.ndarray, sampling_rate: float, n: int) -> np.ndarray:
    """(3, m) trace at 100 Hz to ``sampling_rate`` (polyphase, anti-aliased), exactly ``n`` samples."""
    if sampling_rate == SAMPLING_RATE:
        return x[:, :n]
    from fractions import Fraction

    from scipy.signal import resample_poly

    f = Fraction(sampling_rate / SAMPLING_RATE).limit_denominator(1000)
    y = resample_poly(x, f.numerator, f.denominator, axis=-1)
    if y.shape[-1] < n:
        y = np.pad(y, ((0, 0), (0, n - y.shape[-1])), mode="edge")
    return y[:, :n]


def _noise(n: int, rng: np.random.Generator) -> np.ndarray:
    recs = [r for r in noise_records() if len(r) > n]
    out = np.empty((3, n))
    for c in range(3):
        r = recs[rng.integers(len(recs))]
        o = rng.integers(0, len(r) - n)
        out[c] = r[o : o + n]
        out[c] /= out[c].std() + 1e-12
    return out


def _stretch(x: np.ndarray, factor: float, antialias: bool = False) -> np.ndarray:
    """Time-stretch a (3, n) train by ``factor`` (linear interpolation), mimicking other corner frequencies.

    ``antialias`` low-passes the train below the compressed Nyquist first (for the strong compressions
    of `Domain.near_stretch`; the presets' own mild stretches keep the plain interpolation they were
    generated with, so their data sets reproduce)."""
    if antialias and factor < 1.0:
        from scipy.signal import butter, sosfiltfilt

        sos = butter(4, 0.9 * factor * SAMPLING_RATE / 2, btype="lowpass", fs=SAMPLING_RATE, output="sos")
        x = sosfiltfilt(sos, x, axis=-1)
    n = x.shape[-1]
    m = max(2, int(round(n * factor)))
    t = np.linspace(0, n - 1, m)
    return np.stack([np.interp(t, np.arange(n), c) for c in x])


def _p_coda(p_train: np.ndarray, length: int) -> np.ndarray:
    """Cut or extend a P train to ``length`` samples; extension mirror-tiles it under a decaying envelope
    so that long S-P times keep a P coda instead of falling back to pure noise."""
    n = p_train.shape[-1]
    if n >= length:
        return p_train[:, :length]
    reps = int(np.ceil(length / n))
    tiled = np.concatenate([p_train if k % 2 == 0 else p_train[:, ::-1] for k in range(reps)], axis=-1)[:, :length]
    tau = max(SAMPLING_RATE, n / 2)
    env = np.ones(length)
    env[n:] = np.exp(-np.arange(length - n) / tau)
    return tiled * env


def _taper_end(x: np.ndarray, length: int) -> np.ndarray:
    length = min(length, x.shape[-1])
    if length > 1:
        x = x.copy()
        x[:, -length:] *= 0.5 * (1 + np.cos(np.linspace(0, np.pi, length)))
    return x


def make_event_trace(
    n: int, source: dict[str, float], rng: np.random.Generator, domain: Domain | None = None
) -> tuple[np.ndarray, dict]:
    """One 3 x n earthquake trace (ZNE, 100 Hz) with P and S onsets where TauP puts them for ``source``.

    ``domain`` decides the stretch range, the noise band, whether S must fit in the trace (else
    S is left out when TauP puts it beyond the end: P and its coda only) and whether S is labelled.
    """
    domain = get_domain(domain)
    t_p, t_s = travel_times(source["distance_km"], source["depth_km"])
    sp = int(round((t_s - t_p) * SAMPLING_RATE))
    p = int(round(source["p_fraction"] * n))
    tail = int(2 * SAMPLING_RATE)
    if domain.s_must_fit:
        if p + sp > n - tail:  # keep the S onset and 2 s of S wave inside the trace
            p = max(int(0.03 * n), n - tail - sp)
        if p + sp > n - tail:
            sp = n - tail - p
    has_s = p + sp <= n - tail
    s = p + sp

    ev = event_trains()[rng.integers(len(event_trains()))]
    near_hf = domain.near_stretch is not None and source.get("near_source", False)
    factor = _log_uniform(rng, domain.near_stretch if near_hf else domain.stretch)  # one draw either way
    p_len = sp if has_s else n - p
    p_train = _taper_end(_p_coda(_stretch(ev.p_train, factor, near_hf), p_len), int(0.2 * SAMPLING_RATE))
    s_train = _taper_end(_stretch(ev.s_train, factor, near_hf)[:, : n - s], int(1.0 * SAMPLING_RATE)) if has_s else None
    # random horizontal rotation and polarity: the same event seen at another azimuth
    a = rng.uniform(0, 2 * np.pi)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]]) * rng.choice([-1.0, 1.0])
    p_train = rot @ p_train
    p_gain = None
    if domain.p_gain is not None and s_train is not None:
        p_gain = _log_uniform(rng, domain.p_gain)
        p_train = p_train * p_gain
    # SNR as STEAD defines it: 10 log10 of signal over noise power (unit-variance noise here); the
    # signal is the S wave when there is one, else the P wave (teleseismic P-only traces)
    ref = rot @ s_train if s_train is not None else p_train
    sig_rms = np.sqrt(np.mean(ref[:, : int(4 * SAMPLING_RATE)] ** 2)) + 1e-12
    amp = 10 ** (source["snr_db"] / 20.0) / sig_rms
    x = _band(_noise(n, rng), domain.noise_band_hz)
    x[:, p : p + p_train.shape[-1]] += amp * p_train
    if s_train is not None:
        x[:, s : s + s_train.shape[-1]] += amp * (rot @ s_train)
    labelled_s = has_s and domain.s_picks
    meta = {
        "trace_category": domain.category,
        "trace_p_arrival_sample": p,
        "trace_s_arrival_sample": s if labelled_s else np.nan,
        "trace_p_status": "synthetic",
        "trace_s_status": "synthetic" if labelled_s else "",
        "trace_s_in_trace": bool(has_s),
        "path_p_travel_sec": round(t_p, 3),
        "path_s_travel_sec": round(t_s, 3),
        "source_distance_km": round(source["distance_km"], 3),
        "source_depth_km": round(source["depth_km"], 3),
        "source_magnitude": round(source["magnitude"], 2),
        "trace_snr_db": round(source["snr_db"], 2),
        "trace_event_signal": ev.name,
        "trace_stretch_factor": round(factor, 4),
    }
    if p_gain is not None:
        meta["trace_p_gain"] = round(p_gain, 4)
    return x, meta


def make_noise_trace(n: int, rng: np.random.Generator, domain: Domain | None = None) -> tuple[np.ndarray, dict]:
    """One 3 x n noise trace (100 Hz) of the domain's noise type."""
    x = _band(_noise(n, rng), get_domain(domain).noise_band_hz)
    return x, {
        "trace_category": "noise",
        "trace_p_arrival_sample": np.nan,
        "trace_s_arrival_sample": np.nan,
    }


def make_dataset(
    out: str | Path,
    n_traces: int = 1000,
    seed: int = 0,
    n_samples: int | None = None,
    noise_fraction: float = 0.3,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    source_metadata: str | Path | None = None,
    overwrite: bool = False,
    domain: str | Domain | None = None,
) -> Path:
    """Write a SeisBench data set of ``n_traces`` three-component traces of one domain to ``out``.

    Args:
        out: folder for ``metadata.csv`` + ``waveforms.hdf5``.
        n_traces: traces in all splits together; ``noise_fraction`` of them are noise.
        seed: generator seed (same seed, same domain: the same data set on every machine).
        n_samples: samples per trace at the domain's sampling rate (default: the domain's,
            60 s).
        noise_fraction: share of noise traces, in [0, 1).
        split_fractions: train/dev/test shares.
        source_metadata: a STEAD-format metadata CSV the source parameters are drawn from;
            ``None`` uses the 100 real STEAD traces shipped with the package.
        overwrite: replace a data set already in ``out``.
        domain: a `DOMAINS` preset name (``stead_like`` when ``None``, the original generator), a
            `Domain`, or a `MIXTURES` name: each trace is then drawn from one of its presets, stored
            at that preset's sampling rate with the same duration (``n_samples`` counts samples at
            the first preset's rate); ``trace_domain`` names the preset.

    Returns the folder; load it with ``seisbench.data.WaveformDataset(out)``.
    """
    import seisbench.data as sbd

    comps = get_components(domain)
    ref_sr = comps[0].sampling_rate
    n_samples = comps[0].n_samples if n_samples is None else n_samples
    out = Path(out)
    if n_traces < 3:
        raise ConfigError(f"n_traces must be >= 3 (one per split), got {n_traces}")
    if n_samples < 10 * ref_sr:
        raise ConfigError(
            f"n_samples must be >= {int(10 * ref_sr)} (10 s at {ref_sr:g} Hz, domain {domain if isinstance(domain, str) else comps[0].name}) to hold a P and S onset, got {n_samples}"
        )
    if not 0.0 <= noise_fraction < 1.0:
        raise ConfigError(f"noise_fraction must be in [0, 1), got {noise_fraction}")
    if (out / "metadata.csv").exists() and not overwrite:
        raise DataError(f"'{out}' already holds a data set (metadata.csv); pick another --out or delete it")
    table, origin = load_source_table(source_metadata)
    log.info("source parameters from %s", origin)

    rng = np.random.default_rng(seed)
    n_noise = int(round(noise_fraction * n_traces))
    kinds = np.array([True] * (n_traces - n_noise) + [False] * n_noise)
    rng.shuffle(kinds)
    split = np.array(["train"] * n_traces, dtype=object)
    n_tr = int(round(split_fractions[0] * n_traces))
    n_dev = int(round(split_fractions[1] * n_traces))
    order = rng.permutation(n_traces)
    split[order[n_tr : n_tr + n_dev]] = "dev"
    split[order[n_tr + n_dev :]] = "test"
    # which preset each trace comes from; drawn only for mixtures, so that a preset's data set is
    # the same as before mixtures existed
    which = rng.integers(len(comps), size=n_traces) if len(comps) > 1 else np.zeros(n_traces, dtype=int)

    out.mkdir(parents=True, exist_ok=True)
    for f in ("metadata.csv", "waveforms.hdf5"):
        (out / f).unlink(missing_ok=True)
    with sbd.WaveformDataWriter(out / "metadata.csv", out / "waveforms.hdf5") as writer:
        writer.data_format = {
            "dimension_order": "CW",
            "component_order": "ZNE",
            "measurement": "velocity",
            "unit": "normalised counts",
            "instrument_response": "not restituted",
        }
        if len(comps) == 1:  # one rate for every trace; a mixture's rates are per trace (metadata)
            writer.data_format["sampling_rate"] = ref_sr
        for i in range(n_traces):
            dom = comps[which[i]]
            sr = dom.sampling_rate
            n = n_samples if sr == ref_sr else int(round(n_samples * sr / ref_sr))
            n100 = int(np.ceil(n * SAMPLING_RATE / sr))  # generated at 100 Hz, then resampled
            to_rate = sr / SAMPLING_RATE
            if kinds[i]:
                x, meta = make_event_trace(n100, sample_source(table, rng, dom), rng, dom)
            else:
                x, meta = make_noise_trace(n100, rng, dom)
            x = _resample(x, sr, n)
            for key in ("trace_p_arrival_sample", "trace_s_arrival_sample"):
                if np.isfinite(meta[key]):
                    meta[key] = int(round(meta[key] * to_rate))
            meta.update(
                {
                    "trace_name": f"synth_{i:06d}",
                    "split": split[i],
                    "trace_sampling_rate_hz": sr,
                    "trace_npts": n,
                    "trace_component_order": "ZNE",
                    "station_network_code": "SY",
                    "station_code": f"S{i % 97:02d}",
                    "trace_source": origin,
                    "trace_domain": dom.name,
                }
            )
            writer.add_trace(meta, x.astype(np.float32))
    return out
