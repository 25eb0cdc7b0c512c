"""Picking a real recording with a trained model, against the reference picks ObsPy's own tests use.

The recording is ObsPy's AR-picker test event (``loc_RJOB20050801145719850.{z,n,e}``, 200 Hz,
60 s, ASCII). ``obspy/signal/tests/test_trigger.py`` expects ``ar_pick`` to put P at 30.635 s and S
at about 31.165 s after the trace start; we compare the model's picks (SeisBench ``classify`` on the
continuous stream, which resamples to the model's 100 Hz and slides its window) with those. This
event is not used by `moelab.seismic.synth`, so it is unseen data for a model trained on it.
The reference picks are another automatic picker's, not an analyst's: residuals are reported as
measured, never asserted against a target we cannot justify.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moelab.errors import DataError

RECORDING = "loc_RJOB20050801145719850"
REFERENCE_P_S = 30.635  # obspy test_trigger.py: ptime == 30.6350002289
REFERENCE_S_S = 31.165  # obspy test_trigger.py: abs(stime - 31.165) < 0.05
RECORDING_RATE = 200.0
#: How close to the reference a pick must be for the issue's real-signal check (P and S both).
TOLERANCE_S = 0.3


def both_within(p_residual_s: float | None, s_residual_s: float | None, tolerance_s: float = TOLERANCE_S) -> bool:
    """The issue's real-signal check: a P and an S pick, each within ``tolerance_s`` of its reference."""
    return all(r is not None and abs(r) <= tolerance_s for r in (p_residual_s, s_residual_s))


@dataclass
class PickReport:
    """Best pick per phase (highest peak probability) and its residual against the reference."""

    p_time_s: float | None
    p_prob: float
    s_time_s: float | None
    s_prob: float
    p_residual_s: float | None
    s_residual_s: float | None
    max_p_prob: float
    max_s_prob: float
    max_detection: float
    n_picks: int
    p_peak_s: float | None = None  # time of the highest P probability, pick or not
    s_peak_s: float | None = None

    def within(self, tolerance_s: float = TOLERANCE_S) -> bool:
        """Whether both the P and the S pick are within ``tolerance_s`` of the reference picks."""
        return both_within(self.p_residual_s, self.s_residual_s, tolerance_s)

    def format(self) -> str:
        def f(v: float | None) -> str:
            return "none" if v is None else f"{v:+.3f} s"

        return (
            f"real recording {RECORDING} (ObsPy ar_pick reference: P {REFERENCE_P_S:.3f} s, S {REFERENCE_S_S:.3f} s)\n"
            f"  P pick: {'none' if self.p_time_s is None else f'{self.p_time_s:.3f} s (p={self.p_prob:.2f})'}  residual {f(self.p_residual_s)}\n"
            f"  S pick: {'none' if self.s_time_s is None else f'{self.s_time_s:.3f} s (p={self.s_prob:.2f})'}  residual {f(self.s_residual_s)}\n"
            f"  max probabilities: detection {self.max_detection:.2f}, P {self.max_p_prob:.2f}, S {self.max_s_prob:.2f}; {self.n_picks} picks\n"
            f"  probability peaks: P at {self.p_peak_s if self.p_peak_s is None else round(self.p_peak_s, 3)} s "
            f"(residual {f(None if self.p_peak_s is None else self.p_peak_s - REFERENCE_P_S)}), "
            f"S at {self.s_peak_s if self.s_peak_s is None else round(self.s_peak_s, 3)} s "
            f"(residual {f(None if self.s_peak_s is None else self.s_peak_s - REFERENCE_S_S)})"
        )


def recording_files() -> tuple[Path, Path, Path]:
    """The recording's Z, N and E files inside the obspy package; a `DataError` names the first one
    missing, so a run that will pick the event can check for it before it trains anything."""
    import obspy

    folder = Path(obspy.__file__).parent / "signal" / "tests" / "data"
    files = tuple(folder / f"{RECORDING}.{comp}" for comp in "zne")
    for f in files:
        if not f.exists():
            raise DataError(f"ObsPy's test recording '{f}' is missing (is obspy installed with its test data?)")
    return files


def recording_stream():
    """The three-component real recording as an ObsPy Stream (Z, N, E; 200 Hz)."""
    import obspy
    from obspy import UTCDateTime

    traces = []
    start = UTCDateTime("2005-08-01T14:57:19.850")
    for comp, f in zip("zne", recording_files(), strict=True):
        data = np.loadtxt(f, dtype=np.float32)
        tr = obspy.Trace(data=data, header={"network": "BW", "station": "RJOB", "channel": f"EH{comp.upper()}", "sampling_rate": RECORDING_RATE, "starttime": start})
        traces.append(tr)
    return obspy.Stream(traces)


def pick_recording(model, p_threshold: float | None = None, s_threshold: float | None = None, stream=None) -> PickReport:
    """Annotate and classify the recording with ``model`` and compare with the reference picks.

    Thresholds left as None come from the model's ``default_args`` (the dev-tuned ones of exported
    weights), else SeisBench's default 0.1; the window overlap and blinding fit the model window
    unless its ``default_args`` set them.
    """
    import torch

    from moelab.seismic.model import window_annotate_args

    st = recording_stream() if stream is None else stream
    t0 = st[0].stats.starttime
    model.eval()
    kwargs = {**window_annotate_args(model.in_samples), **model.default_args}
    if p_threshold is not None:
        kwargs["P_threshold"] = p_threshold
    if s_threshold is not None:
        kwargs["S_threshold"] = s_threshold
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ann = model.annotate(st.copy(), **{k: v for k, v in kwargs.items() if not k.endswith("_threshold")})
        out = model.classify(st.copy(), **kwargs)
    picks = list(out.picks)

    def best(phase: str) -> tuple[float | None, float]:
        cand = [p for p in picks if p.phase == phase]
        if not cand:
            return None, 0.0
        b = max(cand, key=lambda p: p.peak_value)
        return float(b.peak_time - t0), float(b.peak_value)

    def peak_time(suffix: str) -> float | None:
        trs = [tr for tr in ann if tr.stats.channel.endswith(suffix) and tr.stats.npts]
        if not trs:
            return None
        tr = max(trs, key=lambda t: float(np.max(t.data)))
        return float(tr.stats.starttime + int(np.argmax(tr.data)) / tr.stats.sampling_rate - t0)

    def channel_max(suffix: str) -> float:
        vals = [float(np.max(tr.data)) for tr in ann if tr.stats.channel.endswith(suffix)]
        return max(vals) if vals else float("nan")

    p_t, p_v = best("P")
    s_t, s_v = best("S")
    return PickReport(
        p_time_s=p_t,
        p_prob=p_v,
        s_time_s=s_t,
        s_prob=s_v,
        p_residual_s=None if p_t is None else p_t - REFERENCE_P_S,
        s_residual_s=None if s_t is None else s_t - REFERENCE_S_S,
        max_p_prob=channel_max("_P"),
        max_s_prob=channel_max("_S"),
        max_detection=channel_max("_Detection"),
        n_picks=len(picks),
        p_peak_s=peak_time("_P"),
        s_peak_s=peak_time("_S"),
    )


def load_with_tuned_thresholds(checkpoint: str | Path, results_csv: str | Path):
    """The model of ``checkpoint`` as ``moelab seismic export`` would deploy it: its ``default_args``
    hold the thresholds tuned on dev by the evaluation that wrote ``results_csv`` (benchmark/eval.py's
    ``results.csv``)."""
    from moelab.seismic.export import read_results, tuned_default_args
    from moelab.seismic.model import load_trained

    model = load_trained(checkpoint)
    model.default_args = tuned_default_args(model, read_results(results_csv))
    return model


def pick_with_tuned_thresholds(checkpoint: str | Path, results_csv: str | Path) -> PickReport:
    """`pick_recording` with the model of `load_with_tuned_thresholds`, so a benchmark scores the real
    event exactly as ``moelab seismic pick`` does on the exported weights."""
    return pick_recording(load_with_tuned_thresholds(checkpoint, results_csv))
