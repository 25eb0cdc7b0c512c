"""Honest offline evaluation of a class-conditional diffusion model.

* conditional accuracy: the share of samples that a classifier trained on the real *training*
  images assigns to the class they were generated for (chance = 1 / num_classes);
* Fréchet distance between generated and real *held-out* images in that classifier's feature space
  (torchmetrics' `FrechetInceptionDistance` with the classifier as feature extractor), and the true
  FID with Inception-v3 features when a local weights file is given (never downloaded);
* wall-clock time per sample.
The held-out split never trains anything, so the numbers are not flattered by memorisation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moelab.diffusion.classifier import ImageClassifier
from moelab.errors import ConfigError, DataError

HELD_OUT_SPLIT = "test"


class _FeatureExtractor(nn.Module):
    """Adapts a feature function to torchmetrics' custom-feature FID interface (``num_features``)."""

    def __init__(self, net: nn.Module, num_features: int) -> None:
        super().__init__()
        self.net = net
        self.num_features = num_features

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        self.net.eval()
        return self.net.features(x.float())  # type: ignore[operator]


def frechet_distance(features_net: nn.Module, num_features: int, real: Tensor, fake: Tensor, batch_size: int = 256) -> float:
    """Fréchet distance between the feature Gaussians of ``real`` and ``fake`` images."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise DataError("the Fréchet distance needs at least 2 real and 2 generated images")
    fid = FrechetInceptionDistance(feature=_FeatureExtractor(features_net, num_features), reset_real_features=False)
    for xb in real.split(batch_size):
        fid.update(xb, real=True)
    for xb in fake.split(batch_size):
        fid.update(xb, real=False)
    return float(fid.compute())


class Evaluator:
    """Scores generated images against the real held-out split with a fixed classifier."""

    def __init__(
        self,
        classifier: ImageClassifier,
        real_images: Tensor,
        real_labels: Tensor,
        inception: nn.Module | None = None,
    ) -> None:
        self.classifier = classifier.eval()
        self.real_images = real_images.float()
        self.real_labels = real_labels.long()
        self.inception = inception

    @classmethod
    def for_config(
        cls, config: dict, cache_dir: str | Path | None = None, inception_weights: str | Path | None = None
    ) -> "Evaluator":
        """Classifier from the training split (cached), reference images from the held-out split."""
        from moelab.diffusion.classifier import classifier_for
        from moelab.diffusion.data import dataset_tensors

        clf = classifier_for(config, cache_dir)
        images, labels = dataset_tensors(config, HELD_OUT_SPLIT)
        inception = None
        if inception_weights is not None:
            from moelab.diffusion.inception import FIDInceptionV3

            inception = FIDInceptionV3.from_weights(inception_weights)
        return cls(clf, images, labels, inception)

    def score(self, images: Tensor, labels: Sequence[int] | Tensor) -> dict[str, Any]:
        """Accuracy (overall and per class) and Fréchet distance(s) of ``images`` generated for ``labels``."""
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if images.shape[0] != labels.numel():
            raise DataError(f"{images.shape[0]} images but {labels.numel()} labels")
        if images.shape[1:] != self.real_images.shape[1:]:
            raise DataError(
                f"generated images have shape {tuple(images.shape[1:])} but the data set's are "
                f"{tuple(self.real_images.shape[1:])}: evaluate with the model's own config"
            )
        pred, _ = self.classifier.predict(images)
        correct = (pred == labels).double()
        per_class = {int(c): float(correct[labels == c].mean()) for c in labels.unique()}
        out: dict[str, Any] = {
            "accuracy": float(correct.mean()),
            "per_class_accuracy": per_class,
            "frechet_distance": frechet_distance(self.classifier, self.classifier.feature_dim, self.real_images, images),
            "num_samples": int(labels.numel()),
            "num_real": int(self.real_images.shape[0]),
        }
        if self.inception is not None:
            out["fid"] = frechet_distance(self.inception, self.inception.num_features, self.real_images, images)
        return out

    def reference(self, train_images: Tensor) -> float:
        """Fréchet distance between real training and real held-out images: the floor a model can reach."""
        return frechet_distance(self.classifier, self.classifier.feature_dim, self.real_images, train_images.float())


def evaluate_model(
    model: nn.Module,
    config: dict,
    evaluator: Evaluator,
    per_class: int = 100,
    sampler: str = "dpm++",
    steps: int | None = 20,
    guidance: float = 1.0,
    seed: int = 0,
    batch_size: int = 250,
) -> dict[str, Any]:
    """Sample ``per_class`` images of every class, time it, and score them."""
    from moelab.diffusion.sample import canonical_sampler, grid_labels, timed_sample

    if per_class < 1:
        raise ConfigError(f"--per-class {per_class} must be >= 1")
    labels = grid_labels(range(config["model"]["num_classes"]), per_class)
    images, spp = timed_sample(
        model, config, labels, sampler=sampler, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size
    )
    res = evaluator.score(images, labels)
    res.update(
        sampler=canonical_sampler(sampler), steps=steps, guidance=guidance, seed=seed, seconds_per_sample=spp,
    )
    return res


def evaluate_checkpoint(
    checkpoint: str | Path, ema: bool = True, cache_dir: str | Path | None = None,
    inception_weights: str | Path | None = None, **kw: Any,
) -> dict[str, Any]:
    """`evaluate_model` on a training checkpoint (EMA weights by default)."""
    from moelab.diffusion.checkpoints import load_model

    model, config = load_model(checkpoint, ema=ema)
    ev = Evaluator.for_config(config, cache_dir, inception_weights)
    res = evaluate_model(model, config, ev, **kw)
    res["checkpoint"] = str(checkpoint)
    res["ema"] = ema
    return res


METRIC_COLUMNS = [
    ("accuracy", "accuracy", "{:.4f}"),
    ("frechet_distance", "Fréchet (clf)", "{:.3f}"),
    ("fid", "FID", "{:.2f}"),
    ("seconds_per_sample", "s/sample", "{:.4f}"),
    ("num_samples", "samples", "{}"),
]


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]], names: Sequence[str] | None = None) -> str:
    """A plain-text table: one row per result dict, columns present in at least one row."""
    cols = [c for c in columns if any(c[0] in r for r in rows)]
    header = (["model"] if names else []) + [c[1] for c in cols]
    body = []
    for i, r in enumerate(rows):
        cells = [names[i]] if names else []
        cells += [c[2].format(r[c[0]]) if r.get(c[0]) is not None else "-" for c in cols]
        body.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(x).rjust(w) for x, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def write_json(obj: Any, path: str | Path) -> Path:
    """Pretty JSON, written atomically."""
    from moelab.checkpoint import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes((json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), path)
    return path
