"""EQTransformer's "second event" augmentation, which SeisBench's generate module does not provide.

Mousavi et al. (2020) trained EQTransformer with a down-scaled copy of the event pasted into the
quiet part of the window after it, so the model learns that a window can hold several events.
It works on labels already made (``y`` and ``detections``), which it shifts and adds alongside.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class DuplicateEvent:
    """Paste a copy of the event, scaled by ``1/u`` with ``u ~ U(inv_scale)``, after its end.

    The event is where ``state[detection_key][0] > 0.5``; labels in ``label_keys`` and the
    detection are shifted by the same offset, added and capped at 1. Expects ``(C, N)`` arrays.
    """

    def __init__(
        self,
        inv_scale: tuple[float, float] = (1.0, 10.0),
        key: str = "X",
        label_keys: Sequence[str] = ("y",),
        detection_key: str = "detections",
        gap: int = 20,
    ) -> None:
        self.inv_scale, self.key, self.gap = inv_scale, key, gap
        self.label_keys, self.detection_key = list(label_keys), detection_key

    def __call__(self, state_dict: dict) -> None:
        x, metadata = state_dict[self.key]
        detection = state_dict[self.detection_key][0]
        n = x.shape[-1]
        if detection.shape[-1] != n:
            raise ValueError(f"DuplicateEvent: '{self.detection_key}' has {detection.shape[-1]} samples, '{self.key}' {n}")
        on = np.flatnonzero(detection[0] > 0.5)
        if on.size == 0:
            return
        start, end = int(on[0]), int(on[-1]) + 1
        if end + self.gap >= n:
            return
        second = np.random.randint(end + self.gap, n)
        length = min(end - start, n - second)
        scale = 1.0 / np.random.uniform(*self.inv_scale)
        x = x.copy()
        x[:, second : second + length] += x[:, start : start + length] * scale
        state_dict[self.key] = (x, metadata)
        shift = second - start
        for key in [*self.label_keys, self.detection_key]:
            y, meta = state_dict[key]
            y = y.copy()
            y[:, shift:] += y[:, :-shift]
            state_dict[key] = (np.minimum(y, 1), meta)


class SourceIndex:
    """Put each trace's data source, as an index into ``names``, into the batch (``state[key]``).

    The source is the trace's ``column`` metadata (``trace_domain`` in the data sets
    `moelab.seismic.synth` pools from several presets); a trace whose source is missing or not in
    ``names`` gets -1 (unknown). What a source-aware SeisMoE (``router_sources``) routes on.
    """

    def __init__(self, names: Sequence[str], column: str = "trace_domain", key: str = "source", data_key: str = "X") -> None:
        self.index = {n: i for i, n in enumerate(names)}
        self.column, self.key, self.data_key = column, key, data_key

    def __call__(self, state_dict: dict) -> None:
        _, metadata = state_dict[self.data_key]
        name = metadata.get(self.column) if metadata is not None else None
        if isinstance(name, (list, tuple, np.ndarray)):  # a metadata column kept per sample of a batch window
            name = name[0] if len(name) else None
        state_dict[self.key] = (np.int64(self.index.get(name, -1) if isinstance(name, str) else -1), None)
