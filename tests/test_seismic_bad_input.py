"""Bad user input on the seismic side: every case raises a moelab error whose message says what is
wrong and how to fix it; the entry scripts print ``error: ...`` and exit with status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("seisbench")

import torch  # noqa: E402

from moelab.checkpoint import atomic_save  # noqa: E402
from moelab.errors import CheckpointError, ConfigError, DataError, MoelabError  # noqa: E402
from moelab.seismic import harness, synth  # noqa: E402
from moelab.seismic.config import check_accelerator, load_config, validate  # noqa: E402
from moelab.seismic.data import check_window, open_dataset, resolve_data  # noqa: E402



REPO = Path(__file__).resolve().parents[1]
OK = {"model": "SeisMoE", "data": "STEAD", "model_args": {"base_model": None, "num_experts": 4, "num_experts_per_token": 2}}


def with_(**changes):
    raw = json.loads(json.dumps(OK))
    for key, value in changes.items():
        if key.startswith("ma_"):
            raw["model_args"][key[3:]] = value
        else:
            raw[key] = value
    return raw


CONFIG_CASES = [
    ("unknown model", with_(model="SeisMOE"), "unknown model 'SeisMOE' (did you mean 'SeisMoE'?)"),
    ("model missing", {"data": "STEAD"}, "missing required key 'model'"),
    ("misspelled top key", with_(modle_args={}), "unknown key 'modle_args' (did you mean 'model_args'?)"),
    ("misspelled model arg", with_(ma_num_expert=4), "unknown model_args key 'num_expert' for SeisMoE (did you mean 'num_experts'?)"),
    ("MoE arg for EQTransformer", {"model": "EQTransformer", "data": "STEAD", "model_args": {"num_experts": 4}}, "EQTransformer has no experts"),
    ("string where number", with_(ma_num_experts="4"), "model_args.num_experts must be an integer (experts per MoE layer"),
    ("bool where number", with_(ma_lr=True), "model_args.lr must be a number (Adam learning rate > 0), got true"),
    ("wrong batch_size type", with_(batch_size=1.5), "'batch_size' must be an integer (traces per batch), got 1.5"),
    ("num_experts < 1", with_(ma_num_experts=0), "num_experts must be >= 1, got 0"),
    ("k > num_experts", with_(ma_num_experts=2, ma_num_experts_per_token=3), "num_experts_per_token=3 exceeds num_experts=2"),
    ("negative coef", with_(ma_moe_loss_coef=-0.1), "moe_loss_coef must be >= 0"),
    ("negative lr", with_(ma_lr=-1e-3), "model_args.lr must be > 0"),
    ("freeze without base", with_(ma_freeze_non_moe=True), "freeze_non_moe is true but base_model is null"),
    ("dense freeze without base", {"model": "EQTransformer", "data": "STEAD", "model_args": {"freeze_non_ffn": True}},
     "freeze_non_ffn is true but base_model is null"),
    ("dense freeze for SeisMoE", with_(ma_freeze_non_ffn=True), "SeisMoE's feed-forward networks are MoE layers: use freeze_non_moe"),
    ("unknown trainer arg", with_(trainer_args={"max_epoch": 3}), "unknown trainer_args key 'max_epoch' (did you mean 'max_epochs'?)"),
    ("harness-owned trainer arg", with_(trainer_args={"callbacks": []}), "trainer_args.callbacks is set by the harness"),
    ("unknown gate", with_(ma_gate="topk_softmx"), "gate 'topk_softmx' is unknown (did you mean 'topk_softmax'?)"),
    ("training_fraction range", with_(training_fraction=0), "'training_fraction' must be in (0, 1]"),
    ("config not an object", [1, 2], "a config must be a JSON object"),
]


@pytest.mark.parametrize("raw,message", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config_errors(raw, message):
    with pytest.raises(ConfigError) as e:
        validate(raw, source="cfg.json")
    assert message in str(e.value)


def test_good_config_and_shipped_configs_validate():
    cfg = validate(OK)
    assert cfg.experiment_name == "SeisMoE_STEAD"
    for name in ("stead_seismoe", "ethz_seismoe", "stead_eqtransformer", "demo_seismoe", "demo_eqtransformer"):
        assert load_config(REPO / "configs" / f"{name}.json").model in ("SeisMoE", "EQTransformer")
    guide = json.loads((REPO / "configs" / "stead_seismoe.json").read_text())
    assert guide == {"model": "SeisMoE", "data": "STEAD", "model_args": {"base_model": "stead", "num_experts": 4, "num_experts_per_token": 2, "moe_loss_coef": 0.01, "freeze_non_moe": False, "lr": 1e-3}}


def test_config_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "SeisMoE",, }')
    with pytest.raises(ConfigError, match="is not valid JSON: .* line 1"):
        load_config(bad)


def test_unknown_data_name():
    with pytest.raises(ConfigError, match=r"unknown data 'ETHX' \(did you mean 'ETHZ'\?\)"):
        resolve_data("ETHX")


def test_missing_data_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist; create one with `moelab seismic make-dataset"):
        resolve_data(str(tmp_path / "nothing_here"))


def test_folder_without_metadata(tmp_path):
    (tmp_path / "waveforms.hdf5").write_bytes(b"")
    with pytest.raises(DataError, match="has no metadata.csv, so it is not a SeisBench data set"):
        open_dataset(resolve_data(str(tmp_path)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synth.make_dataset(tmp_path_factory.mktemp("bad") / "ds", n_traces=9, seed=1, n_samples=1500)


def test_empty_and_corrupt_hdf5(tiny, tmp_path):
    import shutil

    for content, message in ((b"", r"is empty \(0 bytes\)"), (b"this is not hdf5" * 10, "is corrupt or not an HDF5 file")):
        d = tmp_path / f"c{len(content)}"
        d.mkdir()
        shutil.copy(tiny / "metadata.csv", d / "metadata.csv")
        (d / "waveforms.hdf5").write_bytes(content)
        with pytest.raises(DataError, match=message):
            open_dataset(resolve_data(str(d)))


def test_traces_shorter_than_window(tiny):
    ds = open_dataset(resolve_data(str(tiny)))
    with pytest.raises(DataError, match=r"at most 1500 samples, shorter than the model window in_samples=6000; set model_args.in_samples <= 1500"):
        check_window(ds, 6000, str(tiny))


def test_gpu_request_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the request is valid")
    with pytest.raises(ConfigError, match="asks for a CUDA GPU but none is available"):
        check_accelerator("cuda")
    with pytest.raises(ConfigError, match="trainer_args.accelerator 'gpu' asks for a CUDA GPU"):
        validate(with_(trainer_args={"accelerator": "gpu"}))


# ----------------------------------------------------------------------------- checkpoints for eval
def _ckpt(path: Path, module, keep_arch: bool = True) -> Path:
    hp = dict(module.hparams) if keep_arch else {}
    atomic_save({"state_dict": module.state_dict(), "hyper_parameters": hp}, path)
    return path


@pytest.fixture(scope="module")
def seismoe8(tmp_path_factory):
    from moelab.seismic.lit import SeisMoELit

    return SeisMoELit(base_model=None, num_experts=8, num_experts_per_token=2, in_samples=1001)


def test_eval_missing_checkpoint(tmp_path):
    cfg = validate(OK)
    with pytest.raises(CheckpointError, match="does not exist .*train it first: python benchmark/train.py"):
        harness.load_for_eval(cfg, tmp_path / "SeisMoE_STEAD" / "model.ckpt")


def test_eval_checkpoint_of_other_model(tmp_path, seismoe8):
    cfg = validate({"model": "EQTransformer", "data": "STEAD", "model_args": {"in_samples": 1001}})
    path = _ckpt(tmp_path / "m.ckpt", seismoe8)
    with pytest.raises(CheckpointError, match="holds a SeisMoE .* but the config .* says model 'EQTransformer'"):
        harness.load_for_eval(cfg, path)


def test_eval_checkpoint_architecture_mismatch(tmp_path, seismoe8):
    cfg = validate(with_(ma_in_samples=1001))  # 4 experts
    with pytest.raises(CheckpointError, match="num_experts: checkpoint 8, config 4"):
        harness.load_for_eval(cfg, _ckpt(tmp_path / "a.ckpt", seismoe8))
    # without stored architecture the parameter shapes give it away
    with pytest.raises(CheckpointError, match=r"does not fit the SeisMoE .*shape mismatch\(es\): model\..*checkpoint \(8"):
        harness.load_for_eval(cfg, _ckpt(tmp_path / "b.ckpt", seismoe8, keep_arch=False))


def test_eval_checkpoint_missing_keys(tmp_path, seismoe8):
    cfg = validate(with_(ma_num_experts=8, ma_in_samples=1001))
    sd = {k: v for k, v in seismoe8.state_dict().items() if "pick_decoders" not in k}
    atomic_save({"state_dict": sd, "hyper_parameters": {}}, tmp_path / "c.ckpt")
    with pytest.raises(CheckpointError, match=r"key\(s\) missing from the checkpoint: model.pick_decoders"):
        harness.load_for_eval(cfg, tmp_path / "c.ckpt")


def test_eval_refuses_pickled_and_non_lightning_files(tmp_path):
    cfg = validate(OK)
    atomic_save({"state_dict": {"w": torch.zeros(1000)}}, tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])  # a half-written file
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch file"):
        harness.load_for_eval(cfg, tmp_path / "cut.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="is not a Lightning checkpoint"):
        harness.load_for_eval(cfg, tmp_path / "plain.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": {}, "x": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="was refused"):
        harness.load_for_eval(cfg, tmp_path / "evil.ckpt")


def test_errors_are_moelab_errors():
    assert issubclass(ConfigError, MoelabError) and issubclass(DataError, MoelabError)


# ----------------------------------------------------------------------------- entry scripts
def _run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_train_script_bad_config_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "SeisMoE", "data": "STEAD", "model_args": {"num_experts": 2, "num_experts_per_token": 5}}))
    r = _run([str(REPO / "benchmark" / "train.py"), str(bad)], cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "num_experts_per_token=5 exceeds num_experts=2" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_eval_script_missing_checkpoint_and_gpu(tmp_path):
    r = _run([str(REPO / "benchmark" / "eval.py"), "--model_path", "weights/SeisMoE_STEAD/model.ckpt", "--config", str(REPO / "configs" / "stead_seismoe.json")], cwd=tmp_path)
    assert r.returncode == 2 and "error: checkpoint 'weights/SeisMoE_STEAD/model.ckpt' does not exist" in r.stderr
    assert "Traceback" not in r.stderr
    if not torch.cuda.is_available():
        r = _run([str(REPO / "benchmark" / "train.py"), str(REPO / "configs" / "demo_seismoe.json"), "--device", "cuda"], cwd=tmp_path)
        assert r.returncode == 2 and "asks for a CUDA GPU but none is available" in r.stderr


# ----------------------------------------------------------------------------- sweep fixes
def test_tpu_or_mps_request_without_one():
    import importlib.util

    if importlib.util.find_spec("torch_xla") is None:
        with pytest.raises(ConfigError, match="--device 'tpu' asks for a TPU but torch_xla is not installed"):
            check_accelerator("tpu")
    if not torch.backends.mps.is_available():
        with pytest.raises(ConfigError, match="asks for Apple MPS but it is not available"):
            check_accelerator("mps")


def test_limit_batches_above_one_must_be_whole():
    from moelab.seismic.cli import _batches

    assert _batches(2.0) == 2 and _batches(0.5) == 0.5
    with pytest.raises(ConfigError, match=r"limit_\*_batches=1.5: give a whole number of batches"):
        _batches(1.5)


def _diffusion_checkpoint(path: Path) -> Path:
    torch.save({"state_dict": {"model.time_embed.mlp.0.weight": torch.zeros(2, 2)}, "optimizer_states": [],
                "hyper_parameters": {"config": {"model": {}, "moe": {}, "diffusion": {}}}}, path)
    return path


def test_diffusion_checkpoint_is_named_as_such(tmp_path):
    from moelab.seismic.weights import build_eqtransformer

    ck = _diffusion_checkpoint(tmp_path / "checkpoint_epoch_1.pth")
    with pytest.raises(CheckpointError, match="is a MoEFsDiC \\(image diffusion\\) checkpoint, not a SeisMoE/EQTransformer one"):
        harness.load_for_eval(validate(OK), ck)
    with pytest.raises(CheckpointError, match="is a MoEFsDiC \\(image diffusion\\) checkpoint"):
        build_eqtransformer(ck)  # what pick/export's --model_path goes through


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    from moelab.seismic.weights import build_eqtransformer

    torch.save({"a": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match=r"does not fit EQTransformer\(\{\}\) \(\d+ key\(s\) missing from the checkpoint: encoder.*1 unexpected key\(s\): a\)"):
        build_eqtransformer(tmp_path / "plain.pt")


def test_resume_checkpoint_is_checked_before_lightning(tmp_path, seismoe8):
    cfg = validate(with_(ma_num_experts=8, ma_in_samples=1001))
    module = harness.build_module(cfg)
    with pytest.raises(CheckpointError, match="MoEFsDiC \\(image diffusion\\) checkpoint"):
        harness._check_resume(_diffusion_checkpoint(tmp_path / "d.pth"), module, cfg)
    with pytest.raises(CheckpointError, match=r"is not a full training checkpoint \(no optimizer_states, loops"):
        harness._check_resume(_ckpt(tmp_path / "w.ckpt", seismoe8), module, cfg)
    four = harness.build_module(validate(with_(ma_in_samples=1001)))  # 4 experts
    atomic_save({"state_dict": four.state_dict(), "optimizer_states": [], "loops": {}, "pytorch-lightning_version": "2"}, tmp_path / "f.ckpt")
    with pytest.raises(CheckpointError, match=r"--resume '.*f.ckpt' does not fit the SeisMoE of .*shape mismatch"):
        harness._check_resume(tmp_path / "f.ckpt", module, cfg)


def test_unreadable_results_csv(tmp_path):
    from moelab.seismic.export import read_results

    (tmp_path / "results.csv").write_bytes(b"\x9c\x00\xff" * 20)
    with pytest.raises(DataError, match="evaluation results '.*results.csv' are unreadable"):
        read_results(tmp_path / "results.csv")


def test_cli_output_paths_and_splits_are_checked_first(tmp_path, capsys):
    from moelab.cli import main

    (tmp_path / "f").write_text("x")
    demo = str(REPO / "configs" / "demo_seismoe.json")
    cases = [
        (["seismic", "eval", "--model_path", "m.ckpt", "--config", demo, "--sets", "dev,tst"], "unknown split(s) tst; use train, dev and/or test"),
        (["seismic", "eval", "--model_path", "m.ckpt", "--config", demo, "--output", str(tmp_path / "f")], "--output '"),
        (["seismic", "targets", str(tmp_path), str(tmp_path / "f")], "output '"),
        (["seismic", "make-dataset", "--out", str(tmp_path / "f" / "ds")], "which is a file, not a folder"),
        (["seismic", "export", "--model_path", "m.ckpt", "--out", str(tmp_path / "f" / "m")], "which is a file, not a folder"),
        (["seismic", "train", demo, "--weights_dir", str(tmp_path / "f")], "--weights_dir '"),
        (["seismic", "make-dataset", "--out", str(tmp_path / "ds"), "--source-metadata", str(tmp_path)], "is a folder: pass a STEAD-format"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, (argv, err)
