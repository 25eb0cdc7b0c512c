"""Resolving a config's ``data`` to a SeisBench data set: a named one or a local folder, with clear errors.

Named data sets (STEAD, ETHZ, GEOFON, ...) go through SeisBench's own classes, which download into
SeisBench's cache when online. Local folders must be in SeisBench format (``metadata.csv`` +
``waveforms.hdf5``, e.g. written by `moelab.seismic.synth.make_dataset`). Everything that can be
wrong with either (unknown name, offline, missing/corrupt files, traces shorter than the model
window) becomes a `DataError`/`ConfigError` here, before any training starts.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moelab.errors import ConfigError, DataError
from moelab.seismic.config import looks_like_path
from moelab.validation import did_you_mean

log = logging.getLogger(__name__)


def seisbench_dataset_names() -> list[str]:
    """Names of the waveform benchmark data sets SeisBench can download."""
    import seisbench.data as sbd

    return sorted(
        n
        for n, c in vars(sbd).items()
        if inspect.isclass(c) and issubclass(c, sbd.WaveformBenchmarkDataset) and c is not sbd.WaveformBenchmarkDataset
    )


@dataclass(frozen=True)
class DataSource:
    """Where a config's data comes from: ``kind`` is "named" (SeisBench class) or "folder"."""

    kind: str
    name: str
    path: Path | None = None

    @property
    def label(self) -> str:
        return self.name if self.kind == "named" else str(self.path)


def resolve_data(data: str, data_root: str | Path | None = None) -> DataSource:
    """Decide what ``data`` means; no files are read beyond existence checks."""
    candidates = [Path(data).expanduser()]
    if data_root is not None and not Path(data).is_absolute():
        candidates.insert(0, Path(data_root).expanduser() / data)
    for c in candidates:
        if c.is_dir():
            return DataSource("folder", c.name, c)
        if c.is_file():
            raise DataError(f"data '{c}' is a file; point 'data' at the SeisBench folder holding metadata.csv and waveforms.hdf5")
    names = seisbench_dataset_names()
    lower = {n.lower(): n for n in names}
    if data.lower() in lower:
        name = lower[data.lower()]
        if data_root is not None:
            local = Path(data_root).expanduser() / name.lower()
            if local.is_dir():
                return DataSource("folder", name, local)
        return DataSource("named", name)
    if looks_like_path(data):
        where = " or ".join(f"'{c}'" for c in candidates)
        raise DataError(
            f"data folder {where} does not exist; create one with `moelab seismic make-dataset --out {data}` "
            "or point 'data' at a SeisBench folder (metadata.csv + waveforms.hdf5)"
        )
    hint = did_you_mean(data, names)
    raise ConfigError(
        f"unknown data '{data}'{hint}: it is neither a SeisBench data set ({', '.join(names[:12])}, ...) nor an existing folder"
    )


def offline_data_message(name: str, error: BaseException | None = None) -> str:
    import seisbench

    cache = Path(seisbench.cache_root) / "datasets" / name.lower()
    why = f" ({type(error).__name__}: {str(error).splitlines()[0][:160]})" if error is not None else ""
    return (
        f"the SeisBench data set '{name}' is not in SeisBench's cache ({cache}) and could not be downloaded{why}. "
        f"Without internet, either copy a downloaded {name} (metadata.csv + waveforms.hdf5) into {cache}, "
        f"or set \"data\" in the config to a local SeisBench folder (or pass --data_root DIR with DIR/{name.lower()}/); "
        "for an offline demo generate one with `moelab seismic make-dataset --out data/synth` and use configs/seismic/demo_seismoe.json"
    )


def check_folder(path: Path) -> None:
    """A local folder must hold a readable SeisBench data set (metadata + waveforms)."""
    metas = sorted(path.glob("metadata*.csv"))
    if not metas:
        raise DataError(
            f"'{path}' has no metadata.csv, so it is not a SeisBench data set; expected metadata.csv + waveforms.hdf5 "
            "(write one with seisbench.data.WaveformDataWriter or `moelab seismic make-dataset --out DIR`)"
        )
    for meta in metas:
        chunk = meta.name[len("metadata") : -len(".csv")]
        wave = path / f"waveforms{chunk}.hdf5"
        if not wave.exists():
            raise DataError(f"'{path}' has {meta.name} but no {wave.name}; the waveforms are missing")
        if meta.stat().st_size == 0:
            raise DataError(f"'{meta}' is empty; regenerate the data set")
        if wave.stat().st_size == 0:
            raise DataError(f"'{wave}' is empty (0 bytes); the data set was not written completely, regenerate it")
        try:
            import h5py

            with h5py.File(wave, "r") as f:
                if "data" not in f:
                    raise DataError(f"'{wave}' has no 'data' group, so it is not a SeisBench waveform file; regenerate it")
        except OSError as e:
            raise DataError(f"'{wave}' is corrupt or not an HDF5 file ({str(e).splitlines()[0]}); regenerate or re-download it") from None


def open_dataset(
    source: DataSource,
    sampling_rate: float = 100.0,
    cache: str | None = "full",
):
    """The SeisBench ``WaveformDataset`` for ``source``, ZNE / NCW as pick-benchmark uses it."""
    import pandas as pd
    import seisbench.data as sbd

    kwargs = {"sampling_rate": sampling_rate, "component_order": "ZNE", "dimension_order": "NCW", "cache": cache}
    if source.kind == "named":
        cls = getattr(sbd, source.name)
        try:
            ds = cls(**kwargs)
        except (OSError, ValueError, KeyError) as e:  # requests' ConnectionError is an OSError
            raise DataError(offline_data_message(source.name, e)) from None
    else:
        assert source.path is not None
        check_folder(source.path)
        try:
            ds = sbd.WaveformDataset(source.path, **kwargs)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, KeyError, ValueError, OSError) as e:
            raise DataError(f"'{source.path}' could not be read as a SeisBench data set ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if len(ds) == 0:
        raise DataError(f"data set '{source.label}' has no traces")
    if "split" not in ds.metadata.columns:
        log.warning("data set %s has no 'split' column; using pick-benchmark's auxiliary 60/10/30 train/dev/test split", source.label)
        split = np.array(["train"] * len(ds), dtype=object)
        split[int(0.6 * len(ds)) : int(0.7 * len(ds))] = "dev"
        split[int(0.7 * len(ds)) :] = "test"
        ds._metadata["split"] = split
    return ds


def trace_lengths(ds) -> np.ndarray:
    """Samples per trace at the data set's sampling rate (metadata when present, else the waveforms)."""
    m = ds.metadata
    if "trace_npts" in m.columns and m["trace_npts"].notna().all():
        n = m["trace_npts"].to_numpy(float)
        if "trace_sampling_rate_hz" in m.columns and ds.sampling_rate:
            n = n * ds.sampling_rate / m["trace_sampling_rate_hz"].to_numpy(float)
        return n.astype(int)
    return np.array([ds.get_waveforms(i).shape[-1] for i in range(min(len(ds), 50))])


def check_window(ds, in_samples: int, label: str) -> None:
    """Refuse data whose traces are all shorter than the model window (training would see mostly padding)."""
    n = trace_lengths(ds)
    if n.size and n.max() < in_samples:
        raise DataError(
            f"the traces of '{label}' have at most {int(n.max())} samples, shorter than the model window "
            f"in_samples={in_samples}; set model_args.in_samples <= {int(n.max())} or use longer traces "
            f"(e.g. `moelab seismic make-dataset --n-samples {in_samples}`)"
        )


def split_data(ds, split: str):
    """One split; a clear error when it is empty."""
    part = ds.get_split(split)
    if len(part) == 0:
        raise DataError(f"the data set has no '{split}' traces (metadata column 'split'); add some or regenerate it")
    return part
