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
from moelab.diffusion.evaluate import (
    METRIC_COLUMNS, Evaluator, classifier_features, evaluate_model, format_table, frechet_distance,
)
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
    got = frechet_distance(classifier_features(evaluator.classifier), real, fake)
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
    # a cache the disk refuses (full, read-only) costs a retraining next time, not the evaluation
    import errno
    import os

    import moelab.checkpoint

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(moelab.checkpoint.os, "fsync", full)
    with pytest.warns(UserWarning, match=r"the evaluation classifier was not cached \(could not write .*No space left on device"):
        model = load_or_train_classifier(x[:80], y[:80], 10, cache_dir=tmp_path)
    assert len(calls) == 4 and not model.training


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
        self.in_channels, self.image_size, self.num_classes = x.shape[1], x.shape[-1], 10  # what the sampler reads

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


# --- standard FID (Inception-v3 weights file in torch-fidelity's format, random values; never downloaded) ---
@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A weights file laid out as torch-fidelity's weights-inception-2015-12-05-6726825d.pth: a plain
    state dict with FeatureExtractorInceptionV3's 566 keys, here holding random values."""
    from moelab.checkpoint import atomic_save
    from moelab.diffusion.inception import FIDInceptionV3

    g = torch.Generator().manual_seed(0)
    net = FIDInceptionV3()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:  # random affine; statistics measured on random images so that features do not vanish
            m.weight.uniform_(0.5, 1.5, generator=g)
            m.bias.normal_(0.0, 0.2, generator=g)
            m.momentum = None
            nn.Module.train(m, True)
        net(torch.randint(0, 256, (2, 3, 16, 16), generator=g, dtype=torch.uint8))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    atomic_save(state, path)
    return path, state


def test_inception_weights_load_and_give_2048_features(inception_file, evaluator):
    from moelab.diffusion.evaluate import inception_features
    from moelab.diffusion.inception import load_inception

    path, state = inception_file
    assert len(state) == 566 and sum(v.numel() for k, v in state.items() if "num_batches" not in k) - sum(
        v.numel() for k, v in state.items() if "running" in k
    ) == 23_834_568 + 8 * 2049  # torchvision's Inception-v3 without aux head; the FID graph's fc is 1008-way
    net = load_inception(path)  # the users' path: evaluate --inception-weights
    loaded = net.state_dict() if not hasattr(net, "net") else net.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    real, labels = evaluator.real_images[:2], evaluator.real_labels[:2]
    feats = inception_features(net)(real)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    spread = float(((feats[0] - feats[1]) ** 2).sum())  # trace of the two images' feature covariance x 2
    assert spread > 1.0  # the random weights give features that tell images apart
    same = Evaluator(evaluator.classifier, real, labels, inception=net).score(real, labels)["fid"]
    assert abs(same) < 1e-3 * spread  # a set against itself: 0 up to the eigen-solver's rounding


def test_tf1_resize_matches_tensorflow_sampling_grid():
    from moelab.diffusion.inception import resize_bilinear_tf1

    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = resize_bilinear_tf1(x, 8)  # TF1, align_corners=False: source = i * 4 / 8, no half-pixel shift
    assert y[0, 0, 0, :].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0]
    assert y[0, 0, :, 0].tolist() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 12.0]


def test_builtin_inception_equals_torch_fidelity_when_installed(inception_file):
    pytest.importorskip("torch_fidelity", reason="torch-fidelity (moelab[fid], needs a matching torchvision) not importable")
    from moelab.diffusion.inception import load_inception

    path, _ = inception_file
    x = torch.randint(0, 256, (2, 3, 28, 28), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    lib, ours = load_inception(path, backend="torch-fidelity"), load_inception(path, backend="builtin")
    torch.testing.assert_close(ours(x), lib(x), rtol=1e-4, atol=1e-5)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("case,message", [
    ("missing", r"Inception weights '.*nothing.pth' does not exist: download https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"),
    ("corrupt", r"Inception weights '.*corrupt.pth' are corrupt or not a PyTorch file .*weights-inception-2015-12-05-6726825d.pth"),
    ("pickle", r"Inception weights '.*evil.pth' were refused: not a plain tensor file"),
    ("wrong", r"Inception weights '.*wrong.pth' do not fit the FID Inception-v3 \(missing 565 keys.*unexpected 0.*1 shape mismatches: fc.weight"),
])
def test_bad_inception_weights_one_clear_error(tmp_path, capfd, case, message):
    from moelab.checkpoint import atomic_save
    from moelab.cli import main
    from moelab.diffusion.inception import load_inception
    from moelab.errors import CheckpointError

    path = tmp_path / {"missing": "nothing.pth", "corrupt": "corrupt.pth", "pickle": "evil.pth", "wrong": "wrong.pth"}[case]
    if case == "corrupt":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    elif case == "pickle":
        torch.save({"fc.weight": _Evil()}, path)
    elif case == "wrong":
        atomic_save({"fc.weight": torch.zeros(3, 2048)}, path)
    with pytest.raises(CheckpointError, match=message):
        load_inception(path)
    assert "pwned" not in capfd.readouterr().out
    # the CLI reads the weights before the checkpoint: one line, exit status 2, nothing executed
    assert main(["diffusion", "evaluate", "--checkpoint", str(tmp_path / "unused.pth"), "--inception-weights", str(path)]) == 2
    out = capfd.readouterr()
    assert "pwned" not in out.out and out.err.count("\n") == 1 and out.err.startswith("error: Inception weights")
