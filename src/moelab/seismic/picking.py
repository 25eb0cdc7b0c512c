"""Picking continuous records as seismologists do: files or folders in, QuakeML and CSV picks out.

`pick_files` reads every waveform file ObsPy can read (miniSEED, SAC, GSE2, ...; folders are
searched recursively), groups the traces by station (``NET.STA.LOC``) and runs SeisBench's own
continuous picking on each station: ``annotate`` slides the model window over a record of any
length with the overlap and stacking set in ``default_args`` / the call, and ``classify_aggregate``
turns the probability traces into picks, exactly as ``model.classify`` does (the two steps are
called separately only so that the probability traces can be written too, without running the
model twice). Results, written atomically (`moelab.checkpoint.atomic_write_bytes`):

* ``picks.csv``: one row per pick: ``trace_id`` (``NET.STA.LOC``), ``phase``, ``time`` (peak, UTC
  ISO 8601), ``probability`` (peak value), ``start_time`` / ``end_time`` (the trigger window);
* ``picks.xml``: the same picks as QuakeML (ObsPy ``Catalog`` with one ``Event`` holding the
  unassociated picks), readable by ``obspy.read_events``; each pick carries its probability and
  window in a comment, ``probability=<p> window=<start>/<end>``;
* with ``annotations=True``, ``annotations/<NET.STA.LOC>.mseed``: the probability traces, channel
  codes `ANNOTATION_CHANNELS` (miniSEED allows three characters; SeisBench names them
  ``<model>_<label>``);
* ``summary.txt``: what was picked, what was skipped and why.

Input problems follow SeisBench where it has a rule: gaps are left to ``annotate`` (it picks each
covered segment), a missing component is filled with zeros (``strict=False``, SeisBench's
default), N/E and 1/2 horizontals are interchangeable (``flexible_horizontal_components``).
Lower-case channel codes, which SeisBench would silently ignore (it matches the last character of
the trace id against ``"ZNE"``), are upper-cased, since SEED codes are upper case. A file ObsPy
cannot read, a file without traces, or a station without any usable component is skipped with its
reason; one bad file never stops the others.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moelab.checkpoint import atomic_write_bytes
from moelab.errors import ConfigError, DataError

#: SeisBench annotation label -> miniSEED channel code of the written probability trace.
ANNOTATION_CHANNELS: dict[str, str] = {"P": "PBP", "S": "PBS", "Detection": "PBD"}
#: Columns of ``picks.csv``.
CSV_COLUMNS: tuple[str, ...] = ("trace_id", "phase", "time", "probability", "start_time", "end_time")
#: Components SeisBench accepts for a 3-component ZNE model with flexible horizontals.
_HORIZONTAL_ALIASES = {"1": "N", "2": "E"}


@dataclass
class Skipped:
    """A file or station left out, and why."""

    what: str
    reason: str


@dataclass
class PickRun:
    """Outcome of `pick_files`: the picks, the stations picked, what was skipped and the files written."""

    picks: list = field(default_factory=list)
    stations: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> str:
        """Human-readable account: counts per phase, notes on the input, every skip with its reason."""
        phases = {ph: sum(p.phase == ph for p in self.picks) for ph in sorted({p.phase for p in self.picks})}
        lines = [
            f"picked {len(self.stations)} station(s): {len(self.picks)} picks"
            + (" (" + ", ".join(f"{k} {v}" for k, v in phases.items()) + ")" if phases else "")
        ]
        lines += [f"  note: {n}" for n in self.notes]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}:")
            lines += [f"  {s.what}: {s.reason}" for s in self.skipped]
        else:
            lines.append("skipped nothing")
        lines += [f"{name}: {path}" for name, path in self.outputs.items()]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------- inputs
def collect_files(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[Skipped]]:
    """Files named in ``inputs`` plus every file under the folders named there (recursively,
    hidden files excluded), sorted and without duplicates; a missing path is reported, not raised."""
    files: list[Path] = []
    skipped: list[Skipped] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(
                f for f in path.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
            )
            if not found:
                skipped.append(Skipped(str(path), "folder holds no files"))
            files += found
        elif path.is_file():
            files.append(path)
        else:
            skipped.append(Skipped(str(path), "no such file or folder"))
    unique = list(dict.fromkeys(f.resolve() for f in files))
    return unique, skipped


def read_waveforms(files: Iterable[Path]) -> tuple[dict[str, Any], list[Skipped], list[str]]:
    """Read ``files`` with ObsPy and group their traces by station ``NET.STA.LOC``.

    Returns ``(stations, skipped, notes)``: a Stream per station, the files that could not be used
    (with ObsPy's reason) and notes on what was changed (upper-cased channel codes).
    """
    import obspy

    stations: dict[str, obspy.Stream] = {}
    skipped: list[Skipped] = []
    notes: list[str] = []
    for f in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                st = obspy.read(str(f))
        except Exception as e:  # noqa: BLE001 - ObsPy raises many types for unreadable files
            reason = str(e).splitlines()[0][:200] if str(e) else ""
            skipped.append(Skipped(str(f), f"not a waveform file ObsPy can read ({type(e).__name__}: {reason})"))
            continue
        st = obspy.Stream([tr for tr in st if tr.stats.npts > 0])
        if not st:
            skipped.append(Skipped(str(f), "holds no samples"))
            continue
        lowered = sorted({tr.stats.channel for tr in st if tr.stats.channel != tr.stats.channel.upper()})
        if lowered:
            for tr in st:
                tr.stats.channel = tr.stats.channel.upper()
            notes.append(f"{f.name}: lower-case channel codes {lowered} read as upper case (SEED codes are upper case)")
        for tr in st:
            key = f"{tr.stats.network}.{tr.stats.station}.{tr.stats.location}"
            stations.setdefault(key, obspy.Stream()).append(tr)
    return stations, skipped, notes


def check_station(station: str, st: Any, component_order: str) -> str | None:
    """What SeisBench will do with this station's components, or raise `DataError` when none is usable."""
    wanted = set(component_order)
    comps = {_HORIZONTAL_ALIASES.get(tr.stats.channel[-1:], tr.stats.channel[-1:]) for tr in st}
    usable = comps & wanted
    if not usable:
        channels = sorted({tr.stats.channel for tr in st})
        raise DataError(
            f"no component the model reads (channels {channels}; it needs codes ending in "
            f"{'/'.join(component_order)}, or 1/2 for horizontals): rename the channels or drop the station"
        )
    notes = []
    missing = sorted(wanted - usable, key=component_order.index)
    if missing:
        notes.append(f"component(s) {', '.join(missing)} missing: SeisBench fills them with zeros (strict=False)")
    gaps = st.get_gaps()
    if gaps:
        notes.append(f"{len(gaps)} gap(s): SeisBench annotates each covered segment")
    return f"{station}: " + "; ".join(notes) if notes else None


# ------------------------------------------------------------------------------------- picking
def pick_stream(model, stream, **kwargs: Any):
    """SeisBench ``classify`` of one station's stream, also returning the probability traces.

    The steps of SeisBench's ``classify`` (``default_args`` updated by ``kwargs``,
    ``classify_stream_pre``, ``annotate``, ``classify_aggregate``), so the picks are those
    ``model.classify(stream, **kwargs)`` gives. Returns ``(ClassifyOutput, annotations)``.
    """
    import torch

    argdict = dict(model.default_args)
    argdict.update(kwargs)
    with torch.no_grad():
        pre = model.classify_stream_pre(stream, argdict)
        annotations = model.annotate(pre, **argdict)
        return model.classify_aggregate(annotations, argdict), annotations


def pick_files(
    model,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    annotations: bool = False,
    progress: bool = True,
    **kwargs: Any,
) -> PickRun:
    """Pick every station found in ``inputs`` (files and folders) and write the results to ``out``.

    Args:
        model: a SeisBench picker (`SeisMoE`, EQTransformer, ...), e.g. from `moelab.seismic.model.load_trained`.
        inputs: waveform files and folders (searched recursively).
        out: folder for ``picks.csv``, ``picks.xml``, ``summary.txt`` (and ``annotations/``); None writes nothing.
        annotations (`bool`, defaults to False): also write the probability traces as miniSEED.
        progress (`bool`, defaults to True): a tqdm progress bar over stations (on stderr).
        kwargs: SeisBench ``classify`` arguments (``P_threshold``, ``S_threshold``, ``overlap``,
            ``stacking``, ``batch_size``, ...) overriding the model's ``default_args``.
    """
    from tqdm.auto import tqdm

    for key, value in kwargs.items():
        if key.endswith("_threshold") and not (isinstance(value, (int, float)) and 0 < value < 1):
            raise ConfigError(f"{key} must be a number in (0, 1), got {value!r}")
    files, skipped = collect_files(inputs)
    stations, unreadable, notes = read_waveforms(files)
    run = PickRun(skipped=skipped + unreadable, notes=notes)
    ann_dir = Path(out) / "annotations" if out is not None and annotations else None
    model.eval()
    order = str(getattr(model, "component_order", "ZNE") or "ZNE")
    bar = tqdm(sorted(stations), desc="stations", unit="station", disable=not progress, file=sys.stderr)
    for station in bar:
        bar.set_postfix_str(station, refresh=False)
        st = stations[station]
        try:
            note = check_station(station, st, order)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                output, ann = pick_stream(model, st, **kwargs)
        except DataError as e:
            run.skipped.append(Skipped(f"station {station}", str(e)))
            continue
        except (ValueError, TypeError, IndexError, RuntimeError) as e:  # SeisBench's own refusals
            run.skipped.append(Skipped(f"station {station}", f"SeisBench could not annotate it ({type(e).__name__}: {str(e)[:200]})"))
            continue
        if note:
            run.notes.append(note)
        run.stations.append(station)
        run.picks.extend(output.picks)
        if ann_dir is not None:
            _write_mseed(ann, ann_dir / f"{station}.mseed")
    bar.close()
    run.picks.sort(key=lambda p: (p.peak_time, p.trace_id, p.phase))
    if out is not None:
        out = Path(out)
        write_csv(run.picks, out / "picks.csv")
        write_quakeml(run.picks, out / "picks.xml", method=type(model).__name__, channels=_vertical_channels(stations))
        run.outputs = {"picks.csv": out / "picks.csv", "picks.xml": out / "picks.xml"}
        if ann_dir is not None:
            run.outputs["annotations"] = ann_dir
        atomic_write_bytes((run.summary() + "\n").encode(), out / "summary.txt")
        run.outputs["summary"] = out / "summary.txt"
    return run


# ------------------------------------------------------------------------------------- writers
def picks_table(picks: Iterable[Any]):
    """The picks as a pandas DataFrame with `CSV_COLUMNS` (times as UTC ISO 8601 strings)."""
    import pandas as pd

    rows = [
        {
            "trace_id": p.trace_id,
            "phase": p.phase,
            "time": str(p.peak_time),
            "probability": float(p.peak_value),
            "start_time": str(p.start_time),
            "end_time": str(p.end_time),
        }
        for p in picks
    ]
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS))


def write_csv(picks: Iterable[Any], path: str | os.PathLike) -> None:
    """``picks.csv`` (see the module docstring), written atomically."""
    atomic_write_bytes(picks_table(picks).to_csv(index=False).encode(), path)


def write_quakeml(picks: Iterable[Any], path: str | os.PathLike, method: str = "SeisMoE", channels: dict[str, str] | None = None) -> None:
    """QuakeML through ObsPy: one ``Event`` holding every (unassociated) pick, written atomically.

    ``channels`` maps ``NET.STA.LOC`` to the channel code put in each pick's waveform id (the
    vertical channel picked on); the pick probability and trigger window go in a comment.
    """
    from obspy.core.event import Catalog, Comment, CreationInfo, Event, Pick, ResourceIdentifier, WaveformStreamID

    channels = channels or {}
    method_id = ResourceIdentifier(f"smi:moelab/{method}")
    qpicks = []
    for i, p in enumerate(picks):
        net, sta, loc = (p.trace_id.split(".") + ["", "", ""])[:3]
        qpicks.append(
            Pick(
                resource_id=ResourceIdentifier(f"smi:moelab/pick/{i}"),
                time=p.peak_time,
                waveform_id=WaveformStreamID(network_code=net, station_code=sta, location_code=loc, channel_code=channels.get(p.trace_id, "")),
                phase_hint=p.phase,
                method_id=method_id,
                evaluation_mode="automatic",
                comments=[Comment(text=f"probability={float(p.peak_value):.6f} window={p.start_time}/{p.end_time}")],
                creation_info=CreationInfo(agency_id="moelab", author=method),
            )
        )
    event = Event(resource_id=ResourceIdentifier("smi:moelab/event/unassociated"), picks=qpicks, event_type="not reported")
    event.comments.append(Comment(text=f"unassociated picks of {method}; associate them (e.g. PyOcto, GaMMA) to form events"))
    buf = io.BytesIO()
    Catalog(events=[event], resource_id=ResourceIdentifier("smi:moelab/catalog")).write(buf, format="QUAKEML")
    atomic_write_bytes(buf.getvalue(), path)


def read_quakeml_picks(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The picks of a `write_quakeml` file as `CSV_COLUMNS` dicts (for comparison with ``picks.csv``)."""
    import obspy

    rows = []
    for event in obspy.read_events(str(path)):
        for pick in event.picks:
            wid = pick.waveform_id
            text = next((c.text for c in pick.comments if c.text.startswith("probability=")), "")
            fields = dict(part.split("=", 1) for part in text.split())
            start, _, end = fields.get("window", "/").partition("/")
            rows.append({
                "trace_id": f"{wid.network_code}.{wid.station_code}.{wid.location_code or ''}",
                "phase": pick.phase_hint,
                "time": str(pick.time),
                "probability": float(fields["probability"]) if "probability" in fields else float("nan"),
                "start_time": start,
                "end_time": end,
            })
    return rows


def _vertical_channels(stations: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, st in stations.items():
        chans = sorted({tr.stats.channel for tr in st})
        out[key] = next((c for c in chans if c.endswith("Z")), chans[0] if chans else "")
    return out


def _write_mseed(annotations: Any, path: Path) -> None:
    st = annotations.copy()
    for tr in st:
        label = tr.stats.channel.rsplit("_", 1)[-1]
        tr.stats.channel = ANNOTATION_CHANNELS.get(label, label[:3].upper())
        tr.data = np.ascontiguousarray(tr.data, dtype=np.float32)
    buf = io.BytesIO()
    st.write(buf, format="MSEED", encoding="FLOAT32")
    atomic_write_bytes(buf.getvalue(), path)
