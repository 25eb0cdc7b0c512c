"""Evaluation: the classifier judge is sane on real and on noise images, the Fréchet distance matches
a scipy reference, the classifier cache is reused, and evaluate_model wires sampling to scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg
from torch import nn

import moelab.diffusion.classifier as clf_mod
from moelab.diffusion.classifier import classifier_for, load_or_train_classifier, train_classifier
from moelab.diffusion.config import load_config
from moelab.diffusion.data import dataset_tensors
from moelab.diffusion.evaluate import Evaluator, evaluate_model, format_table, frechet_distance, METRIC_COLUMNS
from moelab.diffusion.sample import grid_labels
from moelab.errors import DataError




@pytest.fixture(scope="module")
def cfg():
    return load_config({"extends": "digits.yaml", "model": {"image_size": 8, "channel_mults": [1]}})


@pytest.fixture(scope="module")
def evaluator(cfg, tmp_path_factory):
    return Evaluator.for_config(cfg, cache_dir=tmp_path_factory.mktemp("clf_cache"))


def test_real_held_out_images_score_at_least_095(cfg, evaluator):
    x, y = dataset_tensors(cfg, "test")
    res = evaluator.score(x, y)
    assert res["accuracy"] >= 0.95
    assert res["num_samples"] == len(y) == 360
    assert set(res["per_class_accuracy"]) == set(range(10))
    assert res["frechet_distance"] < 1e-6 * max(1.0, abs(res["frechet_distance"])) + 1e-3  # identical sets


def test_pure_noise_scores_near_chance(cfg, evaluator):
    labels = grid_labels(range(10), 30)  # labels spread evenly over the classes
    noise = torch.randn((len(labels), 1, 8, 8), generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    res = evaluator.score(noise, labels)
    assert 0.0 <= res["accuracy"] <= 0.3
    train_x, _ = dataset_tensors(cfg, "train")
    assert res["frechet_distance"] > 10 * evaluator.reference(train_x)


def test_frechet_distance_matches_scipy_reference(evaluator):
    real = evaluator.real_images
    fake = (real[:200] + 0.3 * torch.randn((200, *real.shape[1:]), generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    got = frechet_distance(evaluator.classifier, evaluator.classifier.feature_dim, real, fake)
    _, f1 = evaluator.classifier.predict(real)
    _, f2 = evaluator.classifier.predict(fake)
    f1, f2 = f1.double().numpy(), f2.double().numpy()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    ref = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert got == pytest.approx(ref, rel=1e-3)
    assert got > 0


def test_classifier_is_cached_and_reused(cfg, tmp_path, monkeypatch):
    x, y = dataset_tensors(cfg, "train")
    x, y = x[:100], y[:100]
    calls = []
    real_train = clf_mod.train_classifier

    def counting(*a, **k):
        calls.append(1)
        return real_train(*a, **{**k, "epochs": 1})

    monkeypatch.setattr(clf_mod, "train_classifier", counting)
    a = load_or_train_classifier(x, y, 10, cache_dir=tmp_path)
    b = load_or_train_classifier(x, y, 10, cache_dir=tmp_path)
    assert len(calls) == 1
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    (cached,) = tmp_path.glob("classifier-*.pt")
    cached.write_bytes(b"not a checkpoint")  # a damaged cache entry is retrained, not trusted
    load_or_train_classifier(x, y, 10, cache_dir=tmp_path)
    assert len(calls) == 2
    load_or_train_classifier(x[:90], y[:90], 10, cache_dir=tmp_path)  # other data -> other key
    assert len(calls) == 3


def test_classifier_training_is_deterministic(cfg):
    x, y = dataset_tensors(cfg, "train")
    a = train_classifier(x[:128], y[:128], 10, seed=5, epochs=2)
    b = train_classifier(x[:128], y[:128], 10, seed=5, epochs=2)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


class Oracle(nn.Module):
    """Stand-in generator whose eps pushes x towards a real test image of the requested class."""

    def __init__(self, cfg, sched_alphas):
        super().__init__()
        x, y = dataset_tensors(cfg, "test")
        self.protos = torch.stack([x[y == c][0] for c in range(10)] + [torch.zeros_like(x[0])])
        self.abar = sched_alphas

    def forward(self, x, t, c):
        a = self.abar[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.protos[c]) / (1 - a).sqrt(), []


def test_evaluate_model_samples_times_and_scores(cfg, evaluator):
    from moelab.diffusion.noise import training_scheduler

    model = Oracle(cfg, training_scheduler(cfg).alphas_cumprod)
    res = evaluate_model(model, cfg, evaluator, per_class=3, sampler="ddim", steps=10, guidance=1.0, seed=0)
    assert res["num_samples"] == 30
    assert res["accuracy"] >= 0.9  # the oracle reproduces real digits of the right class
    assert res["seconds_per_sample"] > 0
    assert res["sampler"] == "ddim" and res["steps"] == 10
    table = format_table([res], METRIC_COLUMNS)
    assert "accuracy" in table and f"{res['accuracy']:.4f}" in table


def test_score_rejects_mismatched_inputs(evaluator):
    with pytest.raises(DataError, match="labels"):
        evaluator.score(torch.zeros(3, 1, 8, 8), [0, 1])
    with pytest.raises(DataError, match="shape"):
        evaluator.score(torch.zeros(2, 1, 16, 16), [0, 1])


def test_classifier_for_uses_only_the_training_split(cfg, tmp_path, monkeypatch):
    seen = []
    import moelab.diffusion.data as data_mod

    real = data_mod.dataset_tensors

    def spy(config, split):
        seen.append(split)
        x, y = real(config, split)
        return x[:64], y[:64]

    monkeypatch.setattr(data_mod, "dataset_tensors", spy)
    monkeypatch.setattr(clf_mod, "train_classifier", lambda x, y, n, seed=0: clf_mod.ImageClassifier(x.shape[1], n))
    classifier_for(cfg, cache_dir=tmp_path)
    assert seen == ["train"]


def test_fid_inception_loads_local_weights_and_scores(evaluator, tmp_path):
    from moelab.checkpoint import atomic_save
    from moelab.diffusion.inception import FIDInceptionV3
    from moelab.errors import CheckpointError

    net = FIDInceptionV3()
    # torchvision's Inception-v3 without aux head has 23,834,568 parameters; the FID graph's fc is 1008-way
    assert sum(p.numel() for p in net.parameters()) == 23_834_568 + 8 * 2049
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    atomic_save(state, tmp_path / "pt_inception.pth")
    loaded = FIDInceptionV3.from_weights(tmp_path / "pt_inception.pth")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    atomic_save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="does not fit"):
        FIDInceptionV3.from_weights(tmp_path / "wrong.pth")

    real, labels = evaluator.real_images[:4], evaluator.real_labels[:4]
    ev = Evaluator(evaluator.classifier, real, labels, inception=loaded)
    res = ev.score(real.flip(-1), labels)
    assert "fid" in res and np.isfinite(res["fid"]) and res["fid"] > 0
