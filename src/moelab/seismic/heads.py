"""How high each EQTransformer output head can go: dead last-layer channels cap a head's probability.

Each of EQTransformer's three heads (detection, P, S) ends in a decoder whose last convolution has
8 ReLU channels, read by one linear convolution and a sigmoid. A channel whose ReLU never fires
passes no gradient and stays dead; at initialisation the decoder's input barely varies in time, so
channels start either always on or always off, and training kills more. When every live channel
only lowers the logit, the head can output at most ``sigmoid(bias)`` -- about 0.5. A P head in that
state places the onset by lifting its inhibition there, a plateau about a second wide just under
0.5 instead of a peak near 1: its onsets are a coin toss within that second and, on a new kind of
recording, its probability falls under any dev-tuned threshold. Fine-tuning cannot revive a dead
ReLU, so a base trained into this state passes it to every model fine-tuned from it (SeisMoE
upcycled from it included). `head_health` measures it on real windows, for a model trained from
scratch to be checked before it is used as a base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["HeadHealth", "decoder_chains", "event_windows", "head_health", "health_stats", "healths_from_stats"]

#: EQTransformer's output heads in the order of its outputs (detection, P, S).
HEADS: tuple[str, ...] = ("detection", "P", "S")
#: The `HeadHealth` fields that an evaluation's ``results.csv`` carries, as ``<head>_<field>`` columns.
STAT_FIELDS: tuple[str, ...] = ("channels", "live", "lifting", "ceiling", "peak")


@dataclass(frozen=True)
class HeadHealth:
    """One head's last decoder layer on a batch of windows.

    Args:
        head: ``detection``, ``P`` or ``S``.
        channels: ReLU channels of the head's last decoder convolution.
        live: how many of them fire (> 0) somewhere on the windows.
        lifting: live channels whose output-convolution kernel sums to more than 0: those that can
            raise the logit. None: the head cannot rise above ``sigmoid(bias)``.
        ceiling: the highest probability the head can reach with activations within the ranges
            seen on the windows, ``sigmoid(bias + sum over channels of max(kernel sum, 0) x the
            channel's largest activation)``. Exact for activations constant over the kernel's
            span (11 samples), which the decoder, upsampling 128-fold by repetition, nearly makes them.
        peak: the highest probability the head put out on the windows.
    """

    head: str
    channels: int
    live: int
    lifting: int
    ceiling: float
    peak: float

    def format(self) -> str:
        return (
            f"{self.head} head: {self.live} of {self.channels} last-layer channels live, {self.lifting} of them lifting, "
            f"ceiling {self.ceiling:.2f}, peak {self.peak:.2f}"
        )

    @property
    def capped(self) -> bool:
        """No live channel can raise the logit: the head cannot output more than ``sigmoid(bias)``,
        whatever the input, and fine-tuning cannot change that (a dead ReLU gets no gradient)."""
        return self.lifting == 0

    def warning(self) -> str:
        """What a capped head means for its user, and the remedy."""
        return (
            f"warning: the {self.head} head cannot output more than {self.ceiling:.2f}: none of the {self.live} live channels of its "
            f"last decoder layer can raise the logit ({self.channels - self.live} never fire). It stays under that value whatever "
            "the input (a P or S head then marks an onset by a plateau, not a peak), and every model fine-tuned from this one "
            "inherits it; train the base from scratch again with model_args.head_prior (e.g. 0.01), see moelab.seismic.heads"
        )


def decoder_chains(model: nn.Module) -> list[tuple[str, list[nn.Conv1d]]]:
    """Per head of an EQTransformer (or SeisMoE): its decoder convolutions in order (each followed by
    a ReLU), then the output convolution that reads the last one (followed by the sigmoid)."""
    decoders = [model.decoder_d, *model.pick_decoders]
    convs = [model.conv_d, *model.pick_convs]
    return [(name, [*dec.convs, conv]) for name, dec, conv in zip(HEADS, decoders, convs, strict=True)]


@torch.no_grad()
def head_health(model: nn.Module, x: Tensor) -> list[HeadHealth]:
    """`HeadHealth` of the detection, P and S heads of an EQTransformer (or SeisMoE) on windows ``x``
    (batch, channels, in_samples), normalised as the model is trained; the model is put in eval mode.

    Windows holding P and S onsets are what show whether a head can rise: give dev windows of events.
    """
    model.eval()
    chains = decoder_chains(model)
    acts: dict[str, Tensor] = {}
    hooks = [convs[-2].register_forward_hook(lambda _m, _i, out, name=name: acts.__setitem__(name, out.relu())) for name, convs in chains]
    try:
        outputs = model(x)
    finally:
        for h in hooks:
            h.remove()
    report = []
    for (name, convs), prob in zip(chains, outputs, strict=True):
        conv = convs[-1]
        h = acts[name]  # (batch, channels, samples) of the last decoder layer, after its ReLU
        top = h.amax(dim=(0, 2))  # each channel's largest activation; 0 for a dead channel
        gain = conv.weight[0].sum(dim=-1)  # each channel's effect on the logit, summed over the kernel
        lift = (gain.clamp(min=0) * top).sum()
        bias = float(conv.bias[0]) if conv.bias is not None else 0.0
        report.append(
            HeadHealth(
                head=name,
                channels=int(h.shape[1]),
                live=int((top > 0).sum()),
                lifting=int(((top > 0) & (gain > 0)).sum()),
                ceiling=1.0 / (1.0 + math.exp(-(bias + float(lift)))),
                peak=float(prob.max()),
            )
        )
    return report


def event_windows(ds, in_samples: int, n: int = 64, split: str = "dev") -> Tensor:
    """Up to ``n`` windows of ``in_samples`` around the P onsets of ``split`` traces of SeisBench
    data set ``ds`` (P in the middle where the trace allows), detrended and peak-normalised per
    channel as training and evaluation normalise them: the input `head_health` reads a head's range from."""
    import numpy as np
    from scipy.signal import detrend

    from moelab.errors import DataError

    md = ds.metadata
    if "split" not in md:
        raise DataError(f"the data set has no 'split' column to take '{split}' windows from")
    has_p = md["trace_p_arrival_sample"].notna() if "trace_p_arrival_sample" in md else False
    rows = np.flatnonzero(((md["split"] == split) & has_p).to_numpy())[:n]
    if len(rows) == 0:
        raise DataError(f"the data set has no '{split}' traces with a P pick (trace_p_arrival_sample) to read the heads on")
    out = []
    for i in rows:
        x, meta = ds.get_sample(int(i))
        start = int(min(max(0, int(meta["trace_p_arrival_sample"]) - in_samples // 2), max(0, x.shape[-1] - in_samples)))
        w = np.zeros((x.shape[0], in_samples), dtype=np.float32)
        cut = x[:, start : start + in_samples]
        w[:, : cut.shape[-1]] = cut
        w = detrend(w, axis=-1)
        w /= np.abs(w).max(axis=-1, keepdims=True) + 1e-10
        out.append(w.astype(np.float32))
    return torch.from_numpy(np.stack(out))


def health_stats(report: list[HeadHealth]) -> dict[str, float]:
    """``report`` as flat ``<head>_<field>`` numbers (`STAT_FIELDS`), the columns an evaluation's
    ``results.csv`` carries; `healths_from_stats` reads them back."""
    return {f"{h.head}_{f}": float(getattr(h, f)) for h in report for f in STAT_FIELDS}


def healths_from_stats(stats: dict[str, float]) -> list[HeadHealth]:
    """The `HeadHealth` of each head whose `health_stats` columns ``stats`` holds (none for results
    written before evaluations looked at the heads)."""
    out = []
    for head in HEADS:
        values = [stats.get(f"{head}_{f}") for f in STAT_FIELDS]
        if all(v is not None and v == v for v in values):  # present and not NaN
            channels, live, lifting, ceiling, peak = values
            out.append(HeadHealth(head, int(channels), int(live), int(lifting), float(ceiling), float(peak)))
    return out
