"""Honest offline evaluation of a class-conditional diffusion model.

* conditional accuracy: the share of samples that a classifier trained on the real *training*
  images assigns to the class they were generated for (chance = 1 / num_classes);
* Fréchet distance between generated and real *held-out* images in that classifier's feature space
  (torchmetrics' `FrechetInceptionDistance` with the classifier as feature extractor), and the
  standard FID (the same metric on the 2048-d Inception-v3 features of torch-fidelity's weights
  file, `moelab.diffusion.inception`) when a local weights file is given (never downloaded);
* wall-clock time per sample.
The held-out split never trains anything, so the numbers are not flattered by memorisation.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moelab.diffusion.classifier import ImageClassifier
from moelab.errors import ConfigError, DataError

HELD_OUT_SPLIT = "test"


class FeatureExtractor(nn.Module):
    """Images in [-1, 1] -> features, in torchmetrics' custom-feature FID interface (``num_features``).

    ``prepare`` maps the images to what ``net`` reads (the Inception nets read uint8 RGB).
    """

    def __init__(self, net: nn.Module, num_features: int, prepare: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        self.net = net
        self.num_features = num_features
        self.prepare = prepare

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        self.net.eval()
        x = self.prepare(x) if self.prepare is not None else x.float()
        fn = getattr(self.net, "features", self.net)
        return fn(x)


def classifier_features(classifier: ImageClassifier) -> FeatureExtractor:
    """The evaluation classifier's penultimate features (the Fréchet distance in its space)."""
    return FeatureExtractor(classifier, classifier.feature_dim)


def inception_features(inception: nn.Module) -> FeatureExtractor:
    """2048-d Inception pool features of images quantised to uint8 RGB, as the standard FID reads them."""
    from moelab.diffusion.inception import NUM_FEATURES, to_uint8_rgb

    return FeatureExtractor(inception, NUM_FEATURES, to_uint8_rgb)


def fid_metric(extractor: FeatureExtractor, real: Tensor, batch_size: int = 256) -> Any:
    """torchmetrics' ``FrechetInceptionDistance`` on ``extractor`` with the ``real`` statistics loaded once.

    ``reset()`` then clears only the generated side, so repeated scoring (every evaluation during
    training) does not recompute the real features.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.shape[0] < 2:
        raise DataError("the Fréchet distance needs at least 2 real images")
    # sync_on_compute=False: the whole set is scored in one process (rank 0 under DDP), never a collective
    fid = FrechetInceptionDistance(feature=extractor, reset_real_features=False, sync_on_compute=False)
    for xb in real.split(batch_size):
        fid.update(xb, real=True)
    return fid


def fake_distance(metric: Any, fake: Tensor, batch_size: int = 256) -> float:
    """Fréchet distance of ``fake`` images to the real statistics held by ``metric`` (from `fid_metric`)."""
    if fake.shape[0] < 2:
        raise DataError("the Fréchet distance needs at least 2 generated images")
    metric.reset()
    for xb in fake.split(batch_size):
        metric.update(xb, real=False)
    return float(metric.compute())


def frechet_distance(extractor: FeatureExtractor, real: Tensor, fake: Tensor, batch_size: int = 256) -> float:
    """Fréchet distance between the feature Gaussians of ``real`` and ``fake`` images (torchmetrics)."""
    if fake.shape[0] < 2:
        raise DataError("the Fréchet distance needs at least 2 generated images")
    return fake_distance(fid_metric(extractor, real, batch_size), fake, batch_size)


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
        self._metrics: dict[str, Any] = {}  # feature space -> FID metric holding the real statistics

    def _distance(self, space: str, images: Tensor) -> float:
        if space not in self._metrics:
            ext = classifier_features(self.classifier) if space == "classifier" else inception_features(self.inception)  # type: ignore[arg-type]
            self._metrics[space] = fid_metric(ext, self.real_images)
        return fake_distance(self._metrics[space], images)

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
            from moelab.diffusion.inception import load_inception

            inception = load_inception(inception_weights)
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
            "frechet_distance": self._distance("classifier", images),
            "num_samples": int(labels.numel()),
            "num_real": int(self.real_images.shape[0]),
        }
        if self.inception is not None:
            out["fid"] = self._distance("inception", images)
        return out

    def reference(self, train_images: Tensor) -> float:
        """Fréchet distance between real training and real held-out images: the floor a model can reach."""
        return frechet_distance(classifier_features(self.classifier), self.real_images, train_images.float())


def check_eval_settings(config: Any, per_class: int = 100, sampler: str = "dpm++", steps: int | None = 20,
                        batch_size: int = 250, **_: Any) -> None:
    """Refuse bad sampling settings of an evaluation up front (`compare` and the demo call this
    before training, so a typo costs seconds, not a training run)."""
    from moelab.diffusion.sample import make_scheduler

    if per_class < 1:
        raise ConfigError(f"--per-class {per_class} must be >= 1")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    make_scheduler(config, sampler, steps)  # unknown sampler, steps outside the training schedule


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

    check_eval_settings(config, per_class, sampler, steps, batch_size)
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
    """`evaluate_model` on a training checkpoint (EMA weights by default).

    The Inception weights are read first, so a wrong ``--inception-weights`` fails before any
    sampling or classifier training.
    """
    from moelab.diffusion.checkpoints import load_model

    inception = None
    if inception_weights is not None:
        from moelab.diffusion.inception import load_inception

        inception = load_inception(inception_weights)
    model, config = load_model(checkpoint, ema=ema)
    ev = Evaluator.for_config(config, cache_dir)
    ev.inception = inception
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
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    line = lambda cells: "  ".join(str(x).rjust(w) for x, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def write_json(obj: Any, path: str | Path) -> Path:
    """Pretty JSON, written atomically."""
    from moelab.checkpoint import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes((json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), path)
    return path
