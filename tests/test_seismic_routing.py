"""SeisMoE routing by metadata group (`moelab.seismic.routing`): exact counts, the report, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("seisbench")

import seisbench.data as sbd  # noqa: E402

from moelab.errors import ConfigError, DataError  # noqa: E402
from moelab.seismic import synth  # noqa: E402
from moelab.seismic.evaluate import generate_targets, load_targets  # noqa: E402
from moelab.seismic.routing import format_routing_report, routing_report, trace_groups, usage_by_group  # noqa: E402


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A small generated mixture (three presets, 100 and 200 Hz) loaded at 100 Hz, with its targets."""
    root = tmp_path_factory.mktemp("routing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = synth.make_dataset(root / "mix", n_traces=24, seed=5, domain="mixed_like", n_samples=2500)
        ds = sbd.WaveformDataset(path, sampling_rate=100, component_order="ZNE", dimension_order="NCW")
    targets = load_targets(generate_targets(ds, root / "targets", seed=1, task1_window_s=10.0, task23_window_s=5.0))
    return ds, targets


def _module():
    from moelab.seismic.lit import SeisMoELit

    return SeisMoELit(base_model=None, num_experts=4, num_experts_per_token=2, in_samples=1001)


def test_counts_per_group_are_windows_times_tokens_times_k(mixed):
    """Each group's assignments are its windows x tokens per window x k: routing is per token, so the
    total over one group holding every trace fixes tokens x k, and each group's total must be a
    multiple of it by exactly its window count. The counters are left cleared."""
    ds, targets = mixed
    train = ds.get_split("train")
    windows = targets["task1"][targets["task1"]["trace_split"] == "train"]
    groups = trace_groups(ds.metadata, "trace_domain")
    module = _module()
    counts = usage_by_group(module, train, windows, groups, batch_size=8)
    one = usage_by_group(module, train, windows, dict.fromkeys(groups, "all"), batch_size=8)
    per_group = windows["trace_name"].map(groups).value_counts()
    assert set(counts) == {"transformer_d0.ff", "transformer_d.ff"} and set(one["transformer_d0.ff"]) == {"all"}
    for layer, by_group in counts.items():
        assert set(by_group) == set(per_group.index) and len(by_group) >= 2
        total = int(one[layer]["all"].sum())
        assert total % len(windows) == 0 and total > 0
        per_window = total // len(windows)  # tokens x k
        for g, c in by_group.items():
            assert c.shape == (4,) and int(c.sum()) == per_group[g] * per_window
    assert all(int(m.usage.counts.sum()) == 0 for m in module.model.moe_layers())

    report = routing_report(counts)
    for layer, r in report.items():
        np.testing.assert_allclose(np.sum(r["shares"], axis=1), 1.0, atol=1e-3)
        assert r["assignments"] == [int(counts[layer][g].sum()) for g in r["groups"]]
        assert 0.0 <= r["mutual_information"] <= 1.0
    text = format_routing_report(report, "trace_domain")
    assert "transformer_d.ff" in text and all(g in text for g in per_group.index)


def test_routing_errors_name_the_problem(mixed):
    from moelab.seismic.lit import EQTransformerLit

    ds, targets = mixed
    windows = targets["task23"][targets["task23"]["trace_split"] == "train"]
    with pytest.raises(ConfigError, match="no column 'station'"):
        trace_groups(ds.metadata, "station")
    with pytest.raises(ConfigError, match="no MoE layers"):
        usage_by_group(EQTransformerLit(in_samples=1001), ds.get_split("train"), windows, trace_groups(ds.metadata, "trace_domain"))
    with pytest.raises(DataError, match="without a group"):
        usage_by_group(_module(), ds.get_split("train"), windows, {})
    with pytest.raises(DataError, match="no 'source_distance_km' value"):
        trace_groups(pd.DataFrame({"trace_name": ["a", "b"], "source_distance_km": [1.0, None]}), "source_distance_km")
