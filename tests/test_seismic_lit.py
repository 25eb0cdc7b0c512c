"""SeisMoELit / EQTransformerLit: loss composition, gradients under freezing, the pick-benchmark
data pipeline on a SeisBench-format data set, a Lightning fit and checkpoint round trip."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("seisbench")
import lightning.pytorch as pl  # noqa: E402
import seisbench.data as sbd  # noqa: E402
import seisbench.generate as sbg  # noqa: E402

from moelab.checkpoint import AtomicCheckpointIO  # noqa: E402
from moelab.errors import ConfigError  # noqa: E402
from moelab.moe import MoELayer  # noqa: E402
from moelab.seismic.lit import EQTransformerLit, SeisMoELit  # noqa: E402

N = 600


def _batch(b: int = 2, n: int = N, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(b, 3, n)
    y[:, 0, n // 4] = 1.0
    y[:, 1, n // 2] = 1.0
    det = torch.zeros(b, 1, n)
    det[:, 0, n // 4 : 3 * n // 4] = 1.0
    return {"X": torch.randn(b, 3, n, generator=g), "y": y, "detections": det,
            "window_borders": torch.tensor([[0, n], [n // 8, n // 2]][:b])}


def test_training_loss_is_weighted_bce_plus_moe_term():
    torch.manual_seed(0)
    lit = SeisMoELit(num_experts=4, num_experts_per_token=2, moe_loss_coef=0.02, in_samples=N)
    batch = _batch()
    lit.eval()  # deterministic (dropout off) so the reference below sees the same forward
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss = lit.training_step(batch, 0)
    det, p, s = lit.model(batch["X"])
    aux = lit.model.get_moe_loss()
    ref = (0.05 * F.binary_cross_entropy(det, batch["detections"][:, 0]) + 0.40 * F.binary_cross_entropy(p, batch["y"][:, 0])
           + 0.55 * F.binary_cross_entropy(s, batch["y"][:, 1]))
    assert torch.isfinite(loss) and float(aux.detach()) > 0
    assert torch.allclose(loss, ref + 0.02 * aux, atol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in lit.model.transformer_d0.ff.router.parameters())
    assert lit.model.bi_lstm_stack.members[0].conv.weight.grad is not None  # full training: trunk learns too


def _step_keeps_frozen_batchnorm(lit) -> None:
    """One training step + backward of a module with a frozen trunk: the frozen BatchNorm layers stay
    in eval mode and their running statistics do not move; the trained FFN / MoE layers train."""
    bn = lit.model.res_cnn_stack.members[0].norm1
    before = bn.running_mean.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        lit.train()
        assert not bn.training and lit.model.transformer_d0.ff.training and lit.model.transformer_d.ff.training
        loss = lit.training_step(_batch(), 0)
    loss.backward()
    assert torch.equal(bn.running_mean, before)


def _fit_keeps_frozen_batchnorm(make) -> None:
    """The same through ``Trainer.fit`` of a fresh module (``make()``), with a sanity-check
    validation first: Lightning 2.x never calls ``.train()`` on the module (it restores each
    submodule's mode after validation), so the frozen BatchNorm layers must be put in eval mode by
    the module's own hook, or their statistics drift while the trunk's weights stay (found by
    `moelab.seismic.wise`'s start-point test)."""
    from torch.utils.data import DataLoader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a frozen, randomly initialised trunk
        lit = make()

    frozen = {n: m for n, m in lit.model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters())}
    assert frozen
    before = {f"{n}.{b}": t.clone() for n, m in frozen.items() for b, t in m.named_buffers()}
    ffn = lit.model.transformer_d.ff
    trained_before = [p.detach().clone() for p in ffn.parameters()]
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(lit, DataLoader([_batch(seed=i) for i in range(2)], batch_size=None), DataLoader([_batch(seed=9)], batch_size=None))
    after = {f"{n}.{b}": t for n, m in frozen.items() for b, t in m.named_buffers()}
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert any(not torch.equal(a, p) for a, p in zip(trained_before, ffn.parameters(), strict=True))  # the FFN / MoE layer trained


def test_freeze_non_moe_trains_only_experts_and_routers_and_keeps_batchnorm_stats():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lit = SeisMoELit(num_experts=4, num_experts_per_token=2, freeze_non_moe=True, in_samples=N)
    report = lit.trainable_report()
    assert (report.total, report.trainable, report.tensors) == (402_511, 34_056, 36)
    _step_keeps_frozen_batchnorm(lit)
    moe_params = {id(p) for m in lit.model.modules() if isinstance(m, MoELayer) for p in m.parameters()}
    for name, p in lit.model.named_parameters():
        if id(p) in moe_params:
            assert p.requires_grad
        else:
            assert p.grad is None and not p.requires_grad, name
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lit.model.transformer_d.ff.parameters())
    opt = lit.configure_optimizers()
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == 34_056
    _fit_keeps_frozen_batchnorm(lambda: SeisMoELit(num_experts=4, num_experts_per_token=2, freeze_non_moe=True, in_samples=N))


def test_freeze_non_ffn_trains_exactly_the_layers_seismoe_makes_experts_of():
    """The dense control of freeze_non_moe: only transformer_d0.ff / transformer_d.ff train, frozen
    BatchNorm statistics stay, and SeisMoE's MoE layers hold E copies of exactly these parameters."""
    from moelab.seismic.model import MOE_BLOCKS

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lit = EQTransformerLit(freeze_non_ffn=True, in_samples=N)
    _step_keeps_frozen_batchnorm(lit)
    trainable = {n for n, p in lit.model.named_parameters() if p.requires_grad}
    assert trainable == {f"{b}.ff.{lin}.{t}" for b in MOE_BLOCKS for lin in ("lin1", "lin2") for t in ("weight", "bias")}
    for name, p in lit.model.named_parameters():
        assert (p.grad is not None and float(p.grad.abs().sum()) > 0) if name in trainable else p.grad is None, name
    ffn = sum(p.numel() for n, p in lit.model.named_parameters() if n in trainable)
    assert ffn == 8_480 and sum(p.numel() for g in lit.configure_optimizers().param_groups for p in g["params"]) == ffn
    _fit_keeps_frozen_batchnorm(lambda: EQTransformerLit(freeze_non_ffn=True, in_samples=N))
    moe = SeisMoELit(num_experts=4, num_experts_per_token=2, freeze_non_moe=True, in_samples=N, base_model=None)
    experts = sum(p.numel() for n, p in moe.model.named_parameters() if p.requires_grad and ".router." not in n)
    assert experts == 4 * ffn  # upcycled: E copies of the dense FFN, plus the routers
    with pytest.raises(ConfigError, match="for SeisMoE use freeze_non_moe"):
        SeisMoELit(num_experts=4, freeze_non_ffn=True, in_samples=N)


def test_eqtransformer_lit_has_the_same_interface():
    torch.manual_seed(0)
    moe, dense = SeisMoELit(in_samples=N), EQTransformerLit(in_samples=N)
    batch = _batch()
    for lit in (moe, dense):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = lit.training_step(batch, 0)
        assert torch.isfinite(loss)
        score_det, score_ps, p_sample, s_sample = lit.predict_step(batch)
        assert score_det.shape == score_ps.shape == p_sample.shape == s_sample.shape == (2,)
        assert 0 <= int(p_sample[1]) < N // 2 - N // 8  # relative to the window start
        for aug in (lit.get_train_augmentations(), lit.get_val_augmentations(), lit.get_eval_augmentations()):
            assert len(aug) > 0
    assert not any(isinstance(m, MoELayer) for m in dense.modules())
    with pytest.raises(ConfigError):
        SeisMoELit(moe_loss_coef=-1)
    with pytest.raises(ConfigError):
        EQTransformerLit(loss_weights=(1.0, 1.0))


def test_predict_step_matches_pick_benchmark_loop():
    torch.manual_seed(0)
    lit = EQTransformerLit(in_samples=N).eval()
    batch = _batch()
    with torch.no_grad():
        det, p, s = lit.model(batch["X"])
        got = lit.predict_step(batch)
    for i, (a, b) in enumerate(batch["window_borders"].tolist()):
        assert torch.isclose(got[0][i], det[i, a:b].max())
        assert torch.isclose(got[1][i], p[i, a:b].max() / s[i, a:b].max())
        assert int(got[2][i]) == int(p[i, a:b].argmax()) and int(got[3][i]) == int(s[i, a:b].argmax())


def _tiny_dataset(path, n_traces: int = 8, n: int = 1500) -> sbd.WaveformDataset:
    rng = np.random.default_rng(0)
    with sbd.WaveformDataWriter(path / "metadata.csv", path / "waveforms.hdf5") as writer:
        writer.data_format = {"dimension_order": "CW", "component_order": "ZNE", "measurement": "velocity",
                              "unit": "counts", "instrument_response": "not restituted"}
        for i in range(n_traces):
            x = rng.normal(size=(3, n)).astype(np.float32)
            p, s = 300 + 20 * i, 600 + 25 * i
            x[:, p:] += 5 * rng.normal(size=(3, n - p)) * np.exp(-np.arange(n - p) / 300)
            writer.add_trace({"trace_name": f"t{i}", "trace_sampling_rate_hz": 100, "split": "train" if i < 6 else "dev",
                              "trace_p_arrival_sample": p, "trace_s_arrival_sample": s}, x)
    return sbd.WaveformDataset(path, sampling_rate=100)


def test_fit_with_seisbench_generators_and_restore_checkpoint(tmp_path):
    torch.manual_seed(0)
    np.random.seed(0)
    data = _tiny_dataset(tmp_path / "data")
    lit = SeisMoELit(num_experts=4, num_experts_per_token=2, in_samples=N, lr=1e-3)
    train = sbg.GenericGenerator(data.train())
    train.add_augmentations(lit.get_train_augmentations())
    val = sbg.GenericGenerator(data.dev())
    val.add_augmentations(lit.get_val_augmentations())
    sample = train[0]
    assert sample["X"].shape == (3, N) and sample["y"].shape == (3, N) and sample["detections"].shape == (1, N)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=pl.loggers.CSVLogger(tmp_path / "logs"),
        default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()], enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(lit, torch.utils.data.DataLoader(train, batch_size=3), torch.utils.data.DataLoader(val, batch_size=2))
    metrics = trainer.logged_metrics
    for key in ("train_loss_epoch", "val_loss", "val_det_loss", "train_moe_loss", "val_moe_loss",
                "train_moe/transformer_d0.ff/entropy", "val_moe/transformer_d.ff/max_share"):
        assert key in metrics and torch.isfinite(torch.as_tensor(metrics[key])), key
    # validation counts are logged separately and the training counts restored afterwards
    assert sum(lit.model.moe_usage()["transformer_d0.ff"]["counts"]) == 2 * 6 * 5  # k * traces * positions
    ckpt = next((tmp_path / "logs").rglob("*.ckpt"))
    back = SeisMoELit.from_checkpoint(ckpt).eval()
    lit.eval()
    x = torch.randn(2, 3, N)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(lit(x), back(x), strict=True))
    assert back.model.num_experts == 4 and back.hparams["moe_loss_coef"] == 0.01
    # Lightning's own loader rebuilds the same module from the stored hyper-parameters
    again = SeisMoELit.load_from_checkpoint(ckpt, weights_only=True).eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(lit(x), again(x), strict=True))


def test_duplicate_event_pastes_a_scaled_copy_and_shifts_labels():
    from moelab.seismic.augment import DuplicateEvent

    np.random.seed(3)
    n = 1000
    x = np.zeros((3, n), dtype=np.float32)
    x[:, 100:200] = 1.0
    y = np.zeros((3, n), dtype=np.float32)
    y[0, 100], y[1, 150] = 1.0, 1.0
    det = np.zeros((1, n), dtype=np.float32)
    det[0, 100:200] = 1.0
    state = {"X": (x, {}), "y": (y, {}), "detections": (det, {})}
    DuplicateEvent(inv_scale=(2.0, 2.0))(state)
    x2, y2, det2 = state["X"][0], state["y"][0], state["detections"][0]
    p_labels = np.flatnonzero(y2[0])
    assert len(p_labels) == 2 and p_labels[0] == 100
    shift = int(p_labels[1]) - 100
    assert shift >= 120  # pasted at least `gap` samples after the event's end (200)
    end = min(200 + shift, n)
    assert np.allclose(x2[:, 100 + shift : end], 0.5)  # scaled by 1/2
    assert np.allclose(x2[:, 100:200], 1.0) and np.allclose(x[:, 100:200], 1.0)  # original event, input not modified
    if 150 + shift < n:
        assert y2[1, 150 + shift] == 1.0
    assert det2[0, 100 + shift] == 1.0 and det2.max() == 1.0


def test_warns_when_detection_labels_would_be_empty():
    import pandas as pd

    lit = EQTransformerLit(in_samples=N)
    geofon_like = pd.DataFrame({"trace_P_arrival_sample": [100, 200, 300, np.nan], "trace_S_arrival_sample": [400, np.nan, np.nan, np.nan]})
    msg = lit.detection_label_warning(geofon_like)
    assert msg is not None and "67%" in msg and "detection_fixed_window" in msg
    stead_like = pd.DataFrame({"trace_p_arrival_sample": [100, 200], "trace_s_arrival_sample": [400, 500]})
    assert lit.detection_label_warning(stead_like) is None
    fixed = EQTransformerLit(in_samples=N, detection_fixed_window=2000)
    assert fixed.detection_label_warning(geofon_like) is None


def test_non_finite_loss_stops_training_and_keeps_last_checkpoint(tmp_path):
    import hashlib

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from moelab.checkpoint import AtomicCheckpointIO, safe_load
    from moelab.errors import NonFiniteLossError

    torch.manual_seed(0)
    good = [_batch(seed=i) for i in range(2)]
    lit = SeisMoELit(num_experts=4, num_experts_per_token=2, in_samples=N)

    def trainer(epochs: int) -> pl.Trainer:
        ck = ModelCheckpoint(dirpath=tmp_path, filename="last", save_top_k=-1, enable_version_counter=False)
        return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                          enable_model_summary=False, callbacks=[ck], plugins=[AtomicCheckpointIO()])

    from torch.utils.data import DataLoader

    trainer(1).fit(lit, DataLoader(good, batch_size=None))
    path = tmp_path / "last.ckpt"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    bad = [dict(good[0], X=torch.full_like(good[0]["X"], float("nan")))]
    with pytest.raises(NonFiniteLossError, match=r"non-finite at step 2 \(loss=nan\).*lower model_args.lr"):
        trainer(2).fit(lit, DataLoader(bad, batch_size=None), ckpt_path=str(path))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert safe_load(path)["global_step"] == 2


def test_redo_every_recycles_dormant_decoder_channels_once_per_optimizer_step(monkeypatch):
    """redo_every=2 with two batches per optimizer step: recycling runs at steps 2 and 4 only, on the
    module's optimizer, and what it recycled is logged per head."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    import moelab.seismic.dormant as dormant

    calls = []
    real = dormant.recycle_dormant

    def spy(model, x, **kw):
        calls.append(kw["optimizer"])
        return real(model, x, **kw)

    monkeypatch.setattr(dormant, "recycle_dormant", spy)
    torch.manual_seed(0)
    lit = EQTransformerLit(in_samples=N, redo_every=2)
    assert EQTransformerLit(in_samples=N).redo_every is None  # off unless asked for
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, accumulate_grad_batches=2)
    trainer.fit(lit, DataLoader([_batch(seed=i) for i in range(10)], batch_size=None))
    assert trainer.global_step == 5
    assert len(calls) == 2 and all(isinstance(o, torch.optim.Adam) for o in calls)  # steps 2 and 4
    assert {"train_recycled_detection", "train_recycled_P", "train_recycled_S"} <= set(trainer.logged_metrics)
    assert float(sum(trainer.logged_metrics[f"train_recycled_{h}"] for h in ("detection", "P", "S"))) > 0  # a fresh model has dead channels
