"""The upcycle-and-fine-tune quality workflow (moelab.seismic.quality) runs end to end, writes its
tables, and scores every model on thresholds chosen on dev. Model-vs-model claims are made by
bench/seismoe_quality.py over seeds, never here."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("seisbench")
pytest.importorskip("obspy")

from moelab.errors import ConfigError  # noqa: E402
from moelab.seismic import quality  # noqa: E402
from moelab.seismic.config import validate  # noqa: E402

LAST = re.compile(r"^seismoe_quality: mcc moe-eqt=[+-]\d\.\d{3} p_mae moe/eqt=\d+\.\d{2} s_mae moe/eqt=\d+\.\d{2} det_auc moe-eqt=[+-]\d\.\d{3}$")


def tiny(out) -> quality.QualitySettings:
    return quality.QualitySettings(
        out=out, seeds=(0,), traces=40, trace_seconds=20.0, in_samples=1001, batch_size=8,
        base_epochs=1, ft_epochs=1, variants=("eqt_ft", "moe_frozen"),
    )


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    s = tiny(tmp_path_factory.mktemp("quality"))
    lines: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        last = quality.run(s, echo=lines.append)
    return s, last, lines


def test_runs_end_to_end_and_writes_its_tables(done):
    s, last, lines = done
    assert LAST.match(last), last
    md = (s.out / "quality.md").read_text()
    assert md.rstrip().endswith(last)
    for d in s.domains:
        assert f"tested on {d}" in md
    doc = json.loads((s.out / "results.json").read_text())
    assert doc["seeds_done"] == [0]
    for v in s.variants:
        assert f"| {v} |" in md
        for d in s.domains:
            assert len(doc["results"][v][d]) == len(s.seeds)
            folder = s.out / "weights" / f"{v}_s0" / f"eval_{d}"
            assert (folder / "results.csv").is_file() and (folder / "test_task1.csv").is_file()
    # the P-only GEOFON-like domain has no S windows: no phase MCC, reported as n/a, not as 0
    assert "n/a" in md.split("tested on geofon_like")[1]


def test_every_model_picks_the_real_event_at_its_dev_thresholds(done):
    """The issue's real-signal check runs after the benchmark training, for the base and every model
    and seed, as `moelab seismic pick` would on the exported model (thresholds tuned on dev)."""
    from moelab.seismic.export import read_results
    from moelab.seismic.model import load_trained
    from moelab.seismic.realcheck import pick_recording

    s, last, lines = done
    doc = json.loads((s.out / "results.json").read_text())
    real = doc["real_event"]
    assert set(real["variants"]) == set(s.variants) and all(len(r) == len(s.seeds) for r in real["variants"].values())
    ckpt = s.out / "weights" / "eqt_ft_s0" / "model.ckpt"
    row = read_results(ckpt.parent / f"eval_{s.domains[1]}" / "results.csv")
    model = load_trained(ckpt)
    expected = pick_recording(model, p_threshold=float(row["P_threshold"]), s_threshold=float(row["S_threshold"]))
    got = real["variants"]["eqt_ft"][0]
    assert got["n_picks"] == expected.n_picks and got["max_p_prob"] == pytest.approx(expected.max_p_prob, abs=1e-6)
    assert got["p_residual_s"] == (None if expected.p_residual_s is None else pytest.approx(expected.p_residual_s, abs=1e-9))
    md = (s.out / "quality.md").read_text()
    assert "Real event (loc_RJOB20050801145719850" in md and "| base EQTransformer (stead_like) |" in md
    summary = [line for line in md.splitlines() if line][-2]  # just above the last line
    assert summary == quality.real_event_line(real, s.variants) and summary.startswith("real_event: P and S within 0.3 s")
    assert sum(line.startswith("  real event, P / S residual (s): ") for line in lines) == 1 + len(s.variants) * len(s.seeds)


def test_real_event_counts_a_seed_only_when_both_phases_are_within_tolerance(tmp_path):
    def rep(p, s_):
        return {"p_residual_s": p, "s_residual_s": s_}

    real = {"base": rep(0.1, -0.2), "variants": {"eqt_ft": [rep(0.3, 0.0), rep(0.31, 0.0), rep(None, 0.1)], "moe_full": [rep(-0.05, -0.3), rep(0.0, 0.5), rep(0.2, 0.2)]}}
    real["variants"]["eqt_ft"][2].update(p_peak_s=31.17, max_p_prob=0.167)  # under the threshold: where it peaked
    assert quality.real_event_line(real, ["eqt_ft", "moe_full"]) == "real_event: P and S within 0.3 s of the reference: eqt_ft 1/3 seeds, moe_full 2/3 seeds (base: yes)"
    s = quality.QualitySettings(out=tmp_path, seeds=(0, 1, 2), domains=("A", "B", "C"), variants=("eqt_ft", "moe_full"), headline="moe_full")
    table = quality.format_real_event(s, real)
    assert "| eqt_ft | +0.300 / +0.000 | +0.310 / +0.000 | none (peak +0.535, p 0.17) / +0.100 | 1 of 3 |" in table
    assert "| base EQTransformer (A) | +0.100 / -0.200 | | | yes |" in table


def test_thresholds_come_from_dev(done):
    """The detection threshold applied to test is the F1-optimal one of the dev predictions."""
    from sklearn.metrics import precision_recall_curve

    s, _, _ = done
    doc = json.loads((s.out / "results.json").read_text())
    stats = doc["results"]["eqt_ft"]["ethz_like"][0]
    dev = pd.read_csv(s.out / "weights" / "eqt_ft_s0" / "eval_ethz_like" / "dev_task1.csv")
    prec, rec, thr = precision_recall_curve(dev["trace_type"] == "earthquake", dev["score_detection"].fillna(0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = (2 * prec * rec / (prec + rec))[:-1]
    assert stats["det_threshold"] == pytest.approx(float(thr[int(np.nanargmax(f1))]))


def test_upcycled_variants_start_from_the_base_weights(done):
    s, _, _ = done
    base = s.out / "weights" / "base_eqt" / "model.ckpt"
    for v in quality.VARIANTS:
        raw = quality.variant_config(s, v, base, s.out / "data" / "ethz_like", 3)
        cfg = validate(raw)
        assert cfg.seed == 3 and cfg.model == ("EQTransformer" if v in quality.DENSE_VARIANTS else "SeisMoE")
        assert cfg.model_args["base_model"] == (None if v == "moe_scratch" else str(base))
        assert cfg.model_args.get("freeze_non_moe", False) is (v == "moe_frozen")
        assert cfg.model_args.get("freeze_non_ffn", False) is (v == "eqt_ffn")
    raw = quality._config(s, "x", "EQTransformer", s.out / "data" / "geofon_like", 0, 1, {})
    assert raw["model_args"]["detection_fixed_window"] == 2000  # P-only picks, as pick-benchmark trains GEOFON


def test_breakdown_by_metadata_column_of_a_finished_run(done):
    """`moelab.seismic.breakdown` on the finished run: per group of test traces, both models' figures
    at the pooled dev thresholds (the group holding every event gives the pooled P and S MAE), and
    the SeisMoE's routing by group; written to OUT/by_<column>.md."""
    from moelab.seismic.breakdown import breakdown

    s, _, _ = done
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = breakdown(s.out, "", by="trace_category", echo=lambda _: None)
    assert (s.out / "by_trace_category.md").read_text() == text
    doc = json.loads((s.out / "results.json").read_text())
    b = s.domains[1]
    event = "earthquake_regional"  # ethz_like's category; the rest of its traces are noise
    for v in ("eqt_ft", s.headline):
        pooled = doc["results"][v][b][0]
        row = next(line for line in text.splitlines() if line.startswith(f"| {event} (") and f"| {v} |" in line)
        assert f"| {pooled['test_P_mae_s']:.3f} | {pooled['test_S_mae_s']:.3f} |" in row  # one seed: no spread
    assert "| noise (0 P windows) |" in text
    assert "Routing of moe_frozen by trace_category" in text and "| 0 |" in text and "transformer_d.ff MI" in text


def test_summary_line_compares_means_over_seeds():
    def r(mcc, p, s_, auc):
        return {"test_phase_mcc": mcc, "test_P_mae_s": p, "test_S_mae_s": s_, "test_det_auc": auc, "test_S_n": 5}

    results = {
        "eqt_ft": {"B": [r(0.8, 0.2, 0.4, 0.99), r(0.9, 0.4, 0.2, 0.97)]},
        "moe_frozen": {"B": [r(0.85, 0.15, 0.3, 0.98), r(0.95, 0.3, 0.3, 0.96)]},
    }
    line = quality.summary_line(results, "moe_frozen", "B")
    assert line == "seismoe_quality: mcc moe-eqt=+0.050 p_mae moe/eqt=0.75 s_mae moe/eqt=1.00 det_auc moe-eqt=-0.010"


def test_paired_differences_are_taken_seed_by_seed(tmp_path):
    def r(mcc, p, s_, auc):
        return {"test_phase_mcc": mcc, "test_P_mae_s": p, "test_S_mae_s": s_, "test_det_auc": auc, "test_S_n": 5}

    results = {
        "eqt_ft": {d: [r(0.8, 0.2, 0.4, 0.99), r(0.9, 0.4, 0.2, 0.97)] for d in "ABC"},
        "moe_full": {d: [r(0.85, 0.15, 0.3, 0.98), r(0.93, 0.3, 0.32, 0.96)] for d in "ABC"},
    }
    diffs = quality.paired_differences(results, "moe_full", "B", "phase_mcc")
    assert diffs == pytest.approx([0.05, 0.03])
    base = {d: r(0.7, 0.5, 0.5, 0.9) for d in "ABC"}
    s = quality.QualitySettings(out=tmp_path, seeds=(0, 1), domains=("A", "B", "C"), variants=("eqt_ft", "moe_full"), headline="moe_full")
    tables = quality.format_tables(s, results, base)
    # the in-domain row of differences: mean ± sample std of (moe - eqt) per seed, signed
    assert "| moe_full | -0.010 ± 0.000 | +0.040 ± 0.014 | -0.075 ± 0.035 | +0.010 ± 0.156 |" in tables
    assert tables.index("paired by seed") < tables.index("Cross-domain")
    # and its interval row: two seeds, t(0.975, 1) = 12.706; MCC +0.040 ± 0.014 -> [-0.087, +0.167]
    assert "| moe_full | [-0.010, -0.010] worse (spread, CI) | [-0.087, +0.167] better (spread) |" in tables
    assert "minus eqt_ffn" not in tables
    # the guide's recipe against its dense control (same frozen trunk), paired by seed too
    results["eqt_ffn"] = {d: [r(0.84, 0.16, 0.31, 0.98), r(0.91, 0.35, 0.3, 0.97)] for d in "ABC"}
    results["moe_frozen"] = results.pop("moe_full")
    assert quality.paired_differences(results, "moe_frozen", "B", "phase_mcc", "eqt_ffn") == pytest.approx([0.01, 0.02])
    s = quality.QualitySettings(out=tmp_path, seeds=(0, 1), domains=("A", "B", "C"), variants=("eqt_ft", "eqt_ffn", "moe_frozen"))
    tables = quality.format_tables(s, results, base)
    part = tables.split("minus eqt_ffn")[1].split("Cross-domain")[0]
    assert "| moe_frozen | -0.005 ± 0.007 | +0.015 ± 0.007 | -0.030 ± 0.028 | +0.005 ± 0.021 |" in part


def test_merge_combines_runs_on_disjoint_seeds_in_seed_order(tmp_path):
    """Two processes, one seed set each: the merged tables are those of one run over all seeds."""
    import json
    from dataclasses import asdict

    def r(mcc):
        return {"test_phase_mcc": mcc, "test_P_mae_s": 0.2, "test_S_mae_s": 0.3, "test_det_auc": 0.99, "test_S_n": 5}

    s = quality.QualitySettings(out=tmp_path, seeds=(0, 1, 2), domains=("A", "B", "C"), variants=("eqt_ft", "moe_full"), headline="moe_full")
    settings = {k: (str(v) if k == "out" else v) for k, v in asdict(s).items()}
    base = {d: r(0.7) for d in "ABC"}
    mcc = {"eqt_ft": {0: 0.80, 1: 0.90, 2: 0.85}, "moe_full": {0: 0.81, 1: 0.95, 2: 0.83}}

    def pick(v, seed):  # a real-event report whose P residual names its variant and seed
        return {"p_residual_s": seed / 10 + (v == "moe_full") / 100, "s_residual_s": 0.0}

    def doc(seeds, tag):
        res = {v: {d: [r(mcc[v][seed]) for seed in seeds] for d in "ABC"} for v in mcc}
        real = {"base": pick("base", 0), "variants": {v: [pick(v, seed) for seed in seeds] for v in mcc}}
        return {"settings": {**settings, "seeds": seeds, "tag": tag}, "seeds_done": seeds, "base": base, "results": res, "real_event": real}

    (tmp_path / "results_a.json").write_text(json.dumps(doc([2], "_a")))
    (tmp_path / "results_b.json").write_text(json.dumps(doc([0, 1], "_b")))
    last = quality.merge([tmp_path / "results_a.json", tmp_path / "results_b.json"], tmp_path, "_ab")
    whole = {v: {d: [r(mcc[v][seed]) for seed in (0, 1, 2)] for d in "ABC"} for v in mcc}
    assert last == quality.summary_line(whole, "moe_full", "B")
    written = (tmp_path / "quality_ab.md").read_text()
    real = {"base": pick("base", 0), "variants": {v: [pick(v, seed) for seed in (0, 1, 2)] for v in mcc}}
    tables = quality.format_tables(s, whole, base) + quality.format_real_event(s, real) + "\n" + quality.real_event_line(real, s.variants) + "\n"
    assert written == tables + "\n" + last + "\n"
    merged = json.loads((tmp_path / "results_ab.json").read_text())
    assert merged["seeds_done"] == [0, 1, 2] and merged["results"] == json.loads(json.dumps(whole))
    assert merged["real_event"] == json.loads(json.dumps(real))
    # results written before the benchmark made the real-event check merge without it
    for name in ("results_a.json", "results_b.json"):
        old = json.loads((tmp_path / name).read_text())
        del old["real_event"]
        (tmp_path / f"old_{name}").write_text(json.dumps(old))
    assert quality.merge([tmp_path / "old_results_a.json", tmp_path / "old_results_b.json"], tmp_path, "_old") == last
    assert "real_event" not in json.loads((tmp_path / "results_old.json").read_text())

    with pytest.raises(ConfigError, match="appear in more than one"):
        quality.merge([tmp_path / "results_a.json", tmp_path / "results_a.json"], tmp_path, "_x")
    other = doc([1], "_c")
    other["settings"]["ft_epochs"] = 99
    (tmp_path / "results_c.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match=r"other settings .*\(ft_epochs\)"):
        quality.merge([tmp_path / "results_a.json", tmp_path / "results_c.json"], tmp_path, "_x")
    with pytest.raises(ConfigError, match=r"cannot read .*; give results\*.json files written by this benchmark"):
        quality.merge([tmp_path / "missing.json"], tmp_path, "_x")
    # a run written before --ft-schedule existed had the constant rate: it merges with a constant run, not a cosine one
    before = doc([1], "_f")
    del before["settings"]["ft_schedule"]
    (tmp_path / "results_f.json").write_text(json.dumps(before))
    quality.merge([tmp_path / "results_a.json", tmp_path / "results_f.json"], tmp_path, "_af")
    cosine = doc([0], "_g")
    cosine["settings"]["ft_schedule"] = "cosine"
    (tmp_path / "results_g.json").write_text(json.dumps(cosine))
    with pytest.raises(ConfigError, match=r"other settings .*\(ft_schedule\)"):
        quality.merge([tmp_path / "results_f.json", tmp_path / "results_g.json"], tmp_path, "_x")
    # the same base scored by a later evaluation that records more columns (the heads') still merges;
    # a base that scores otherwise on a shared metric does not
    later = doc([1], "_d")
    later["base"] = {d: {**r(0.7), "test_S_mae_s": float("nan"), "P_ceiling": 0.68} for d in "ABC"}
    earlier = doc([0], "_e")
    earlier["base"] = {d: {**r(0.7), "test_S_mae_s": float("nan")} for d in "ABC"}
    (tmp_path / "results_d.json").write_text(json.dumps(later))
    (tmp_path / "results_e.json").write_text(json.dumps(earlier))
    quality.merge([tmp_path / "results_e.json", tmp_path / "results_d.json"], tmp_path, "_de")
    later["base"]["B"]["test_det_auc"] = 0.98
    (tmp_path / "results_d.json").write_text(json.dumps(later))
    with pytest.raises(ConfigError, match="scored another base model"):
        quality.merge([tmp_path / "results_e.json", tmp_path / "results_d.json"], tmp_path, "_x")


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown domain"):
        quality.QualitySettings(out=tmp_path, domains=("stead_like", "ethz", "geofon_like")).check()
    with pytest.raises(ConfigError, match="must include eqt_ft"):
        quality.QualitySettings(out=tmp_path, variants=("moe_frozen",)).check()
    with pytest.raises(ConfigError, match="shorter than the model window"):
        quality.QualitySettings(out=tmp_path, trace_seconds=5.0, in_samples=1001).check()


def test_cli_reaches_the_benchmark(capsys):
    from moelab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["seismic", "quality", "--help"])
    assert e.value.code == 0 and "--ft-epochs" in capsys.readouterr().out


def test_levers_reach_the_model_and_optimizer():
    """The config levers the benchmark varies (issue 14 item 3) are accepted and take effect."""
    from moelab.seismic import harness

    raw = {
        "model": "SeisMoE", "data": "STEAD",
        "model_args": {"base_model": None, "in_samples": 1001, "num_experts": 6, "num_experts_per_token": 1,
                       "moe_loss_coef": 0.0, "detach_router_input": False, "router_lr": 1e-2, "lr": 1e-3},
    }
    module = harness.build_module(validate(raw))
    assert module.model.num_experts == 6 and module.model.num_experts_per_token == 1
    assert all(not layer.detach_router_input for layer in module.model.moe_layers())
    groups = module.configure_optimizers().param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    n_router = sum(1 for n, p in module.named_parameters() if ".router." in n)
    assert len(groups[1]["params"]) == n_router == 4  # weight + bias of both routers
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in module.parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="router_lr must be > 0"):
        validate({**raw, "model_args": {**raw["model_args"], "router_lr": 0}})
    # expert_lr: the routed experts' parameters form their own group (after the routers')
    both = harness.build_module(validate({**raw, "model_args": {**raw["model_args"], "expert_lr": 3e-3}}))
    groups = both.configure_optimizers().param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-2, 3e-3]
    names = {id(p): n for n, p in both.named_parameters()}
    assert all(".experts." in names[id(p)] for p in groups[2]["params"])
    assert len(groups[2]["params"]) == 2 * 6 * 4  # 2 layers x 6 experts x (2 weights + 2 biases)
    assert not any(".experts." in names[id(p)] for g in groups[:2] for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in both.parameters() if p.requires_grad)
    alone = harness.build_module(validate({**raw, "model_args": {**raw["model_args"], "router_lr": None, "expert_lr": 3e-3}}))
    assert [g["lr"] for g in alone.configure_optimizers().param_groups] == [1e-3, 3e-3]
    with pytest.raises(ConfigError, match="expert_lr must be > 0"):
        validate({**raw, "model_args": {**raw["model_args"], "expert_lr": -1e-3}})


def test_a_tag_keeps_lever_runs_apart_and_shares_eqt_ft(tmp_path):
    s = quality.QualitySettings(out=tmp_path, tag="_noise", moe_args={"num_experts": 4, "upcycle_noise": 0.01, "shared_expert": True})
    s.check()
    base, data = tmp_path / "base.ckpt", tmp_path / "data" / "ethz_like"
    for v in quality.DENSE_VARIANTS:  # the untagged dense runs are reused by every lever
        assert quality.variant_config(s, v, base, data, 1)["name"] == f"{v}_s1"
    for v in ("moe_frozen", "moe_full", "moe_scratch"):
        raw = quality.variant_config(s, v, base, data, 1)
        assert raw["name"] == f"{v}_noise_s1"
        cfg = validate(raw)
        assert cfg.model_args["upcycle_noise"] == 0.01 and cfg.model_args["shared_expert"] is True
    with pytest.raises(ConfigError, match="tag 'a/b' may hold only"):
        quality.QualitySettings(out=tmp_path, tag="a/b").check()


def test_base_seed_and_redo_reach_the_base_config_and_default_to_the_earlier_base(tmp_path):
    import argparse

    args = quality.add_args(argparse.ArgumentParser()).parse_args(["--out", str(tmp_path), "--base-seed", "3", "--base-redo", "50"])
    s = quality.settings_from_args(args)
    raw = quality.base_config(s, tmp_path / "data" / "stead_like")
    assert raw["seed"] == 3 and raw["model_args"]["redo_every"] == 50 and validate(raw).model_args["redo_every"] == 50
    plain = quality.base_config(quality.QualitySettings(out=tmp_path), tmp_path / "data" / "stead_like")
    assert "redo_every" not in plain["model_args"] and plain["seed"] == 0  # a base trained before the flag is reused as it is
    with pytest.raises(ConfigError, match="redo_every must be >= 1"):
        quality.QualitySettings(out=tmp_path / "q", base_redo=0).check()


def test_ft_schedule_reaches_every_run_on_b_and_not_the_base(tmp_path):
    import argparse

    args = quality.add_args(argparse.ArgumentParser()).parse_args(["--out", str(tmp_path), "--ft-schedule", "cosine"])
    s = quality.settings_from_args(args)
    s.check()
    base, data = tmp_path / "base.ckpt", tmp_path / "data" / "ethz_like"
    for v in quality.VARIANTS:
        assert validate(quality.variant_config(s, v, base, data, 0)).model_args["lr_schedule"] == "cosine", v
    assert "lr_schedule" not in quality.base_config(s, tmp_path / "data" / "stead_like")["model_args"]
    plain = quality.QualitySettings(out=tmp_path)
    for v in quality.VARIANTS:  # runs trained before the flag keep matching their configs
        assert "lr_schedule" not in quality.variant_config(plain, v, base, data, 0)["model_args"], v
    with pytest.raises(ConfigError, match="lr_schedule must be one of constant, linear, cosine, got 'cosin'"):
        quality.QualitySettings(out=tmp_path / "q", ft_schedule="cosin").check()


def test_done_run_reports_the_heads_of_every_model(done):
    _, _, lines = done
    heads = [ln for ln in lines if "P head:" in ln]
    assert len(heads) == 3  # base + one line per variant and seed
    assert all("last-layer channels live" in ln and "ceiling" in ln for ln in heads)


def test_a_run_stopped_early_is_resumed_not_reused(done, tmp_path):
    import shutil

    import torch

    s, _, _ = done
    src = s.out / "weights" / "eqt_ft_s0"
    raw = json.loads((src / "config.json").read_text())
    assert quality.run_state(src, raw) == ("done", src / "model.ckpt")  # finished: reused
    folder = tmp_path / "eqt_ft_s0"
    shutil.copytree(src, folder)
    longer = {**raw, "max_epochs": raw["max_epochs"] + 1}
    (folder / "config.json").write_text(json.dumps(longer))
    assert quality.run_state(folder, longer) == ("stopped", folder / "last.ckpt")  # killed before its last epoch
    other = {**longer, "seed": 9, "model_args": {**longer["model_args"], "lr_schedule": "cosine"}}
    with pytest.raises(ConfigError, match=r"holds a run of another config \(it differs in seed, model_args.lr_schedule\); give this recipe its own --out"):
        quality.run_state(folder, other)  # another recipe never trains over a finished run
    ckpt = torch.load(folder / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] + 1 == raw["max_epochs"]
    (folder / "last.ckpt").unlink()
    assert quality.run_state(folder, longer)[0] == "done"  # runs from before last.ckpt existed: reused as before
    (folder / "config.json").write_text(json.dumps(longer)[:20])  # cut short (a disk full, a copy stopped)
    with pytest.raises(ConfigError, match=f"cannot read '{folder / 'config.json'}' .*move the folder '{folder}' away"):
        quality.run_state(folder, longer)


def test_moe_args_and_flags_are_checked_before_any_data_or_training(tmp_path):
    with pytest.raises(ConfigError, match=r"variant moe_frozen .*unknown model_args key 'num_expert' for SeisMoE \(did you mean 'num_experts'\?\)"):
        quality.QualitySettings(out=tmp_path / "q", moe_args={"num_expert": 8}).check()
    with pytest.raises(ConfigError, match="num_experts_per_token=3 exceeds num_experts=2"):
        quality.QualitySettings(out=tmp_path / "q", moe_args={"num_experts": 2, "num_experts_per_token": 3}).check()
    with pytest.raises(ConfigError, match=r"--moe-args must be a JSON object of SeisMoE model_args.*got \[1\]"):
        quality.QualitySettings(out=tmp_path / "q", moe_args=[1]).check()
    with pytest.raises(ConfigError, match="variant eqt_ft .*model_args.lr must be > 0"):
        quality.QualitySettings(out=tmp_path / "q", ft_lr=-1.0).check()
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="--out '.*f' is a file"):
        quality.QualitySettings(out=tmp_path / "f").check()
    assert not (tmp_path / "q").exists()


def test_missing_real_recording_fails_before_any_data_or_training(tmp_path, monkeypatch):
    """The real-event check runs after each training; without ObsPy's test data the run stops at
    once with the one error naming the file, not hours later."""
    from moelab.errors import DataError
    from moelab.seismic import realcheck

    monkeypatch.setattr(realcheck, "RECORDING", "no_such_recording")
    with pytest.raises(DataError, match="ObsPy's test recording .*no_such_recording.z' is missing"):
        quality.run(tiny(tmp_path / "q"), echo=lambda _: None)
    assert not (tmp_path / "q").exists()


def test_merge_and_threads_errors_are_config_errors(tmp_path):
    import argparse

    (tmp_path / "r.json").write_text('{"a": 1}')
    with pytest.raises(ConfigError, match="r.json. lacks settings, seeds_done, base, results"):
        quality.merge([tmp_path / "r.json"], tmp_path, "")
    args = quality.add_args(argparse.ArgumentParser()).parse_args(["--threads", "0", "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="--threads 0 must be at least 1"):
        quality.main_from_args(args)


# ------------------------------------------------------------------------------------ WiSE-FT
def test_wise_interpolation_is_exact_at_its_ends_and_linear_between():
    import torch

    from moelab.errors import CheckpointError
    from moelab.seismic.wise import interpolate

    g = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(3, 4, generator=g), "bn.num_batches_tracked": torch.tensor(7)}
    ft = {"w": torch.randn(3, 4, generator=g), "bn.num_batches_tracked": torch.tensor(19)}
    assert torch.equal(interpolate(start, ft, 0.0)["w"], start["w"]) and torch.equal(interpolate(start, ft, 1.0)["w"], ft["w"])
    half = interpolate(start, ft, 0.5)
    torch.testing.assert_close(half["w"], (start["w"] + ft["w"]) / 2, rtol=0, atol=1e-7)
    assert int(half["bn.num_batches_tracked"]) == 19  # counters are the fine-tuned model's, not averaged
    with pytest.raises(ConfigError, match=r"alpha must be in \[0, 1\]"):
        interpolate(start, ft, 1.5)
    with pytest.raises(CheckpointError, match="only fine-tuned: \\['extra'\\]"):
        interpolate(start, {**ft, "extra": torch.zeros(1)}, 0.5)
    with pytest.raises(CheckpointError, match="'w' is \\(3, 4\\) in the start point but \\(4, 3\\)"):
        interpolate(start, {**ft, "w": ft["w"].T}, 0.5)


def test_wise_start_point_is_the_runs_own_start(done):
    """The rebuilt start of a fine-tuning is where it began: the base exactly for EQTransformer; for
    SeisMoE trained with ``freeze_non_moe`` every frozen weight equals the fine-tuned one, and only
    router and experts moved; rebuilding twice gives the same weights (seeded upcycling)."""
    import torch

    from moelab.seismic.weights import read_lightning_file
    from moelab.seismic.wise import start_state

    s, _, _ = done
    w = s.out / "weights"
    base = read_lightning_file(w / "base_eqt" / "model.ckpt")["state_dict"]
    eqt = start_state(json.loads((w / "eqt_ft_s0" / "config.json").read_text()))
    assert eqt.keys() == base.keys() and all(torch.equal(eqt[k], base[k]) for k in base)
    cfg = json.loads((w / "moe_frozen_s0" / "config.json").read_text())
    start, again = start_state(cfg), start_state(cfg)
    ft = read_lightning_file(w / "moe_frozen_s0" / "model.ckpt")["state_dict"]
    assert all(torch.equal(start[k], again[k]) for k in start)
    moved = [k for k in ft if not torch.equal(start[k], ft[k])]
    assert moved and all(".ff.router." in k or ".ff.experts." in k for k in moved), moved
    with pytest.raises(ConfigError, match="trained from scratch"):
        start_state({**cfg, "model_args": {**cfg["model_args"], "base_model": None}})


def test_wise_bench_at_alpha_one_reproduces_the_run(done, tmp_path, capsys, monkeypatch):
    """``bench/wise_ft.py`` at alpha 1 writes the fine-tuned weights back unchanged, so the harness
    scores them exactly as the run was scored and the real event is picked the same."""
    import runpy
    import sys
    from pathlib import Path

    s, _, _ = done
    run = s.out / "weights" / "eqt_ft_s0"
    monkeypatch.setattr(sys, "argv", ["wise_ft.py", str(run), "--alpha", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(Path(__file__).parents[1] / "bench" / "wise_ft.py"), run_name="__main__")
    assert exc.value.code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"wise_ft: alpha=1 real event (\d)/1 \(fine-tuned \1/1\) mcc wise-ft=[+-]0\.000 p_mae wise/ft=1\.00 s_mae wise/ft=1\.00", last), last
    written = tmp_path / f"{run.parent.parent.name}_{run.name}_a1"
    assert (written / "model.ckpt").is_file() and json.loads((written / "config.json").read_text()) == json.loads((run / "config.json").read_text())
