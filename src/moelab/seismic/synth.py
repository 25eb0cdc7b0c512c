"""Small SeisBench-format data sets built from real recordings, for offline training and tests.

STEAD/ETHZ cannot be downloaded here, so this module assembles learnable data sets from what is
available offline, keeping every ingredient real where possible:

* event signals: P-wave trains (P onset to S onset) and S-wave trains (S onset onwards) cut from
  real three-component local-earthquake recordings bundled with ObsPy (BW.RJOB from `obspy.read()`,
  a Kinemetrics strong-motion record, five Montserrat stations). The ObsPy AR-picker test
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moelab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SAMPLING_RATE = 100.0
#: The packaged real STEAD metadata (100 traces) the source parameters are drawn from by default.
STEAD_METADATA = Path(__file__).resolve().parent / "resources" / "stead_100samples.csv"
#: STEAD metadata columns the generator reads.
STEAD_COLUMNS = ("trace_category", "source_distance_km", "source_depth_km", "source_magnitude", "snr_db", "p_arrival_sample")

# Real three-component local events: (file relative to the obspy package or None for obspy.read(),
# station, P onset s, S onset s). Onsets were read off the 1-20 Hz band-passed, 100 Hz resampled
# recordings with ObsPy's ar_pick where it was stable and checked on plots; they only decide where a
# wave train is cut, and the generated traces are labelled where the cut train is placed.
EVENT_RECORDINGS: tuple[tuple[str | None, str | None, float, float], ...] = (
    (None, "RJOB", 4.73, 6.20),
    ("io/kinemetrics/tests/data/STNA.20020722.044649.evt.gz", None, 6.74, 7.70),
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
            st = _prepare(obspy.Stream(list(st[:3])))
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
    dists = np.geomspace(1.0, 300.0, 14)
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
        raise DataError(f"STEAD metadata file '{path}' does not exist: pass a STEAD-format metadata CSV, or omit it to use the packaged one")
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


def _noise(n: int, rng: np.random.Generator) -> np.ndarray:
    recs = [r for r in noise_records() if len(r) > n]
    out = np.empty((3, n))
    for c in range(3):
        r = recs[rng.integers(len(recs))]
        o = rng.integers(0, len(r) - n)
        out[c] = r[o : o + n]
        out[c] /= out[c].std() + 1e-12
    return out


def _stretch(x: np.ndarray, factor: float) -> np.ndarray:
    """Time-stretch a (3, n) train by ``factor`` (linear interpolation), mimicking other corner frequencies."""
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


def make_event_trace(n: int, source: dict[str, float], rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """One 3 x n earthquake trace (ZNE) with P and S onsets where TauP puts them for ``source``."""
    t_p, t_s = travel_times(source["distance_km"], source["depth_km"])
    sp = int(round((t_s - t_p) * SAMPLING_RATE))
    p = int(round(source["p_fraction"] * n))
    if p + sp > n - int(2 * SAMPLING_RATE):  # keep the S onset and 2 s of S wave inside the trace
        p = max(int(0.03 * n), n - int(2 * SAMPLING_RATE) - sp)
    if p + sp > n - int(2 * SAMPLING_RATE):
        sp = n - int(2 * SAMPLING_RATE) - p
    s = p + sp

    ev = event_trains()[rng.integers(len(event_trains()))]
    factor = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    p_train = _taper_end(_p_coda(_stretch(ev.p_train, factor), sp), int(0.2 * SAMPLING_RATE))
    s_train = _taper_end(_stretch(ev.s_train, factor)[:, : n - s], int(1.0 * SAMPLING_RATE))
    # random horizontal rotation and polarity: the same event seen at another azimuth
    a = rng.uniform(0, 2 * np.pi)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]]) * rng.choice([-1.0, 1.0])
    p_train, s_train = rot @ p_train, rot @ s_train

    # SNR as STEAD defines it: 10 log10 of signal over noise power (unit-variance noise here)
    sig_rms = np.sqrt(np.mean(s_train[:, : int(4 * SAMPLING_RATE)] ** 2)) + 1e-12
    amp = 10 ** (source["snr_db"] / 20.0) / sig_rms
    x = _noise(n, rng)
    x[:, p : p + p_train.shape[-1]] += amp * p_train
    x[:, s : s + s_train.shape[-1]] += amp * s_train
    meta = {
        "trace_category": "earthquake_local",
        "trace_p_arrival_sample": p,
        "trace_s_arrival_sample": s,
        "trace_p_status": "synthetic",
        "trace_s_status": "synthetic",
        "path_p_travel_sec": round(t_p, 3),
        "path_s_travel_sec": round(t_s, 3),
        "source_distance_km": round(source["distance_km"], 3),
        "source_depth_km": round(source["depth_km"], 3),
        "source_magnitude": round(source["magnitude"], 2),
        "trace_snr_db": round(source["snr_db"], 2),
        "trace_event_signal": ev.name,
        "trace_stretch_factor": round(factor, 4),
    }
    return x, meta


def make_noise_trace(n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    x = _noise(n, rng)
    return x, {
        "trace_category": "noise",
        "trace_p_arrival_sample": np.nan,
        "trace_s_arrival_sample": np.nan,
    }


def make_dataset(
    out: str | Path,
    n_traces: int = 1000,
    seed: int = 0,
    n_samples: int = 6000,
    noise_fraction: float = 0.3,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    source_metadata: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a SeisBench data set of ``n_traces`` 100 Hz three-component traces to ``out``.

    ``source_metadata``: a STEAD-format metadata CSV the source parameters are drawn from; ``None``
    uses the 100 real STEAD traces shipped with the package.

    Returns the folder; load it with ``seisbench.data.WaveformDataset(out)``.
    """
    import seisbench.data as sbd

    out = Path(out)
    if n_traces < 3:
        raise ConfigError(f"n_traces must be >= 3 (one per split), got {n_traces}")
    if n_samples < 1000:
        raise ConfigError(f"n_samples must be >= 1000 (10 s at 100 Hz) to hold a P and S onset, got {n_samples}")
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
            "sampling_rate": SAMPLING_RATE,
        }
        for i in range(n_traces):
            if kinds[i]:
                x, meta = make_event_trace(n_samples, _sample_source(table, rng), rng)
            else:
                x, meta = make_noise_trace(n_samples, rng)
            meta.update(
                {
                    "trace_name": f"synth_{i:06d}",
                    "split": split[i],
                    "trace_sampling_rate_hz": SAMPLING_RATE,
                    "trace_npts": n_samples,
                    "trace_component_order": "ZNE",
                    "station_network_code": "SY",
                    "station_code": f"S{i % 97:02d}",
                    "trace_source": origin,
                }
            )
            writer.add_trace(meta, x.astype(np.float32))
    return out
