"""What a model's picks on the real recording depend on: the recording edited one trait at a time.

The real-event check (`moelab.seismic.realcheck`) says whether a model picks ObsPy's event; when it
does not, it cannot say why. Each `Edit` here changes one trait of the recording -- the S wave
removed, the P wave train louder, the S wave weaker, the whole event slower (lower frequencies, a
longer S-P) -- and keeps the rest, with the reference picks moved where the edit moves them. A model
whose P pick appears once the event is slowed down is missing P onsets of that frequency in its
training data; one that calls the lone P an S once the S is removed takes its P from the S behind it.
The edits are diagnostics of a trained model, not augmentations: nothing here enters training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moelab.seismic.realcheck import RECORDING_RATE, REFERENCE_P_S, REFERENCE_S_S, PickReport, pick_recording, recording_stream

#: Seconds before the reference P that the pre-event noise (baseline and fill) is taken from.
NOISE_GUARD_S = 1.0


@dataclass(frozen=True)
class Edit:
    """One edit of the three-component recording.

    Args:
        name: short label of the edit (a table row).
        description: what it changes, and what a change of the picks would mean.
        apply: maps one component's samples (float64, 200 Hz) to the edited samples, same length.
        p_ref_s / s_ref_s: where the reference P and S are in the edited recording; ``None``: the
            edit removed that phase.
    """

    name: str
    description: str
    apply: Callable[[np.ndarray], np.ndarray]
    p_ref_s: float | None
    s_ref_s: float | None


def _ip() -> int:
    return int(round(REFERENCE_P_S * RECORDING_RATE))


def _is() -> int:
    return int(round(REFERENCE_S_S * RECORDING_RATE))


def _noise(x: np.ndarray) -> np.ndarray:
    """The pre-event noise: everything up to `NOISE_GUARD_S` before the reference P."""
    return x[: _ip() - int(NOISE_GUARD_S * RECORDING_RATE)]


def remove_s(x: np.ndarray) -> np.ndarray:
    """From the reference S on, the trace's own pre-event noise repeated: only the P train is left."""
    y = x.copy()
    noise = _noise(x)
    n = len(x) - _is()
    y[_is():] = np.tile(noise, n // len(noise) + 1)[:n]
    return y


def scale_window(x: np.ndarray, start: int, stop: int | None, factor: float) -> np.ndarray:
    """``factor`` times the samples of ``[start, stop)`` about the pre-event baseline; the rest kept."""
    y = x.copy()
    base = _noise(x).mean()
    y[start:stop] = (x[start:stop] - base) * factor + base
    return y


def slow_down(x: np.ndarray, factor: float) -> np.ndarray:
    """The recording dilated in time by ``factor`` about the reference P (linear interpolation):
    every frequency divided by ``factor``, S-P multiplied by it, the P onset where it was; what the
    dilation pulls in before the start is the pre-event baseline."""
    ip = _ip()
    t = ip + (np.arange(len(x)) - ip) / factor
    return np.interp(t, np.arange(len(x)), x, left=float(_noise(x).mean()), right=float(x[-1]))


def edits(slow_factors: tuple[float, ...] = (1.5, 2.0)) -> tuple[Edit, ...]:
    """The edits `probe` applies, the unedited recording first."""
    sp = REFERENCE_S_S - REFERENCE_P_S
    rows = [
        Edit("as recorded", "the recording unchanged", lambda x: x.copy(), REFERENCE_P_S, REFERENCE_S_S),
        Edit("S removed", "pre-event noise from the S onset on: is the P picked without the S behind it?", remove_s, REFERENCE_P_S, None),
        Edit("P x4", "the P train (P to S onset) 4x louder: is the P too weak?", lambda x: scale_window(x, _ip(), _is(), 4.0), REFERENCE_P_S, REFERENCE_S_S),
        Edit("S x1/4", "the S wave and coda at 1/4: does the P depend on how strong the S is?", lambda x: scale_window(x, _is(), None, 0.25), REFERENCE_P_S, REFERENCE_S_S),
    ]
    for k in slow_factors:
        rows.append(
            Edit(
                f"slower x{k:g}",
                f"time dilated {k:g}x about the P onset (frequencies / {k:g}, S-P x {k:g}): is the P too high in frequency?",
                lambda x, k=k: slow_down(x, k),
                REFERENCE_P_S,
                REFERENCE_P_S + k * sp,
            )
        )
    return tuple(rows)


def edited_stream(stream, edit: Edit):
    """A copy of the three-component ``stream`` with ``edit`` applied to each component."""
    out = stream.copy()
    for tr in out:
        if tr.stats.sampling_rate != RECORDING_RATE:
            raise ValueError(f"the edits are defined on the {RECORDING_RATE:g} Hz recording, got {tr.stats.sampling_rate} Hz")
        tr.data = edit.apply(tr.data.astype(np.float64))
    return out


@dataclass
class ProbeRow:
    """One edit and what the model picked on it (times relative to the edit's references)."""

    edit: Edit
    report: PickReport

    def _rel(self, t: float | None, ref: float | None) -> float | None:
        return None if t is None or ref is None else t - ref

    @property
    def _s_ref(self) -> float | None:
        """The edit's S reference, or its P onset where the edit removed the S."""
        return self.edit.s_ref_s if self.edit.s_ref_s is not None else self.edit.p_ref_s

    @property
    def p_residual_s(self) -> float | None:
        return self._rel(self.report.p_time_s, self.edit.p_ref_s)

    @property
    def s_residual_s(self) -> float | None:
        """The S pick against the edit's S reference, or against the P onset where S was removed."""
        return self._rel(self.report.s_time_s, self._s_ref)

    def format(self) -> str:
        def f(v: float | None) -> str:
            return "none" if v is None else f"{v:+.3f}"

        r = self.report
        s_what = "S" if self.edit.s_ref_s is not None else "S (vs the P onset)"
        return (
            f"{self.edit.name:<12} P pick {f(self.p_residual_s)} (peak {f(self._rel(r.p_peak_s, self.edit.p_ref_s))}, p {r.max_p_prob:.2f}) | "
            f"{s_what} pick {f(self.s_residual_s)} (peak {f(self._rel(r.s_peak_s, self._s_ref))}, p {r.max_s_prob:.2f})"
        )


def probe(model, stream=None, slow_factors: tuple[float, ...] = (1.5, 2.0)) -> list[ProbeRow]:
    """Pick every edit of the recording with ``model`` (its ``default_args`` thresholds, as
    `realcheck.pick_recording`); residuals in seconds against each edit's references."""
    st = recording_stream() if stream is None else stream
    return [ProbeRow(e, pick_recording(model, stream=edited_stream(st, e))) for e in edits(slow_factors)]
