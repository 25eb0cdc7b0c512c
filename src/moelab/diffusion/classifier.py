"""The judge of generated images: a small CNN trained on the real training split.

Conditional accuracy (does the classifier see the class a sample was generated for?) and the
Fréchet distance in its penultimate feature space both need a classifier that was never shown the
held-out split it is later compared against. It is trained once per data set with Lightning
(deterministically, from a fixed seed) and cached on disk keyed by a hash of the training tensors,
so every evaluation of every checkpoint of one data set uses the very same judge.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.checkpoint import atomic_save, safe_load
from moelab.errors import CheckpointError, DataError
from moelab.guard import quiet_lightning

ARCH_VERSION = 1  # bump when the classifier or its training recipe changes, so old caches are not reused


def default_cache_dir() -> Path:
    """``$MOELAB_CACHE/classifiers`` or ``~/.cache/moelab/classifiers``."""
    root = os.environ.get("MOELAB_CACHE") or Path.home() / ".cache" / "moelab"
    return Path(root) / "classifiers"


class ImageClassifier(nn.Module):
    """conv-conv-pool ×2 → FC feature layer (the Fréchet features) → linear class head."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, feature_dim: int = 64) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
            )

        self.body = nn.Sequential(block(in_channels, w), nn.MaxPool2d(2), block(w, 2 * w), nn.AdaptiveAvgPool2d(2))
        self.feature = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(8 * w, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))
        self.num_classes, self.feature_dim = num_classes, feature_dim

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``[B, feature_dim]`` (images in [-1, 1])."""
        return self.feature(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 512) -> tuple[Tensor, Tensor]:
        """(predicted classes, features) for ``x`` in eval mode, batched."""
        self.eval()
        preds, feats = [], []
        for xb in x.split(batch_size):
            f = self.features(xb.float())
            feats.append(f)
            preds.append(self.head(f).argmax(-1))
        return torch.cat(preds), torch.cat(feats)


class _ClassifierLit:  # built lazily so that importing this module does not import Lightning
    @staticmethod
    def build(model: ImageClassifier, lr: float, epochs: int):  # noqa: ANN205
        import lightning.pytorch as pl

        class ClassifierLit(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
                x, y = batch
                # one-pixel random translation: the generated digits are not perfectly centred either
                shift = torch.randint(-1, 2, (2,)).tolist()
                x = torch.roll(F.pad(x, (1, 1, 1, 1), value=-1.0), shifts=shift, dims=(2, 3))[..., 1:-1, 1:-1]
                return F.cross_entropy(self.model(x), y)

            def configure_optimizers(self):  # noqa: ANN201
                opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=1e-4)
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
                return [opt], [sched]

        return ClassifierLit()


def train_classifier(
    images: Tensor, labels: Tensor, num_classes: int, seed: int = 0, epochs: int = 20, batch_size: int = 128, lr: float = 3e-3
) -> ImageClassifier:
    """Train an `ImageClassifier` on real images with Lightning, deterministically for a given seed."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    if images.shape[0] < num_classes:
        raise DataError(f"only {images.shape[0]} training images: too few to train the evaluation classifier")
    pl.seed_everything(seed, workers=True, verbose=False)
    model = ImageClassifier(images.shape[1], num_classes)
    lit = _ClassifierLit.build(model, lr, epochs)
    loader = DataLoader(
        TensorDataset(images.float(), labels.long()), batch_size=batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(seed), drop_last=images.shape[0] > batch_size,
    )
    with quiet_lightning():  # the judge's training is an implementation detail
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        )
        trainer.fit(lit, loader)
    return model.eval()


def dataset_key(images: Tensor, labels: Tensor) -> str:
    """Hash of the exact training tensors (and the classifier recipe version)."""
    h = hashlib.sha256(f"v{ARCH_VERSION}:{tuple(images.shape)}:".encode())
    h.update(images.detach().cpu().float().contiguous().numpy().tobytes())
    h.update(labels.detach().cpu().long().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def load_or_train_classifier(
    images: Tensor, labels: Tensor, num_classes: int, cache_dir: str | Path | None = None, seed: int = 0
) -> ImageClassifier:
    """The cached classifier for these training tensors, training (and caching) it if needed."""
    from moelab.validation import check_output

    cache = check_output("--cache-dir", cache_dir, folder=True) if cache_dir is not None else default_cache_dir()
    path = cache / f"classifier-{dataset_key(images, labels)}-s{seed}.pt"
    if path.exists():
        try:
            blob = safe_load(path)
            model = ImageClassifier(int(blob["in_channels"]), int(blob["num_classes"]))
            model.load_state_dict(blob["state_dict"])
            return model.eval()
        except (CheckpointError, KeyError, RuntimeError):
            pass  # a stale or damaged cache entry is simply retrained and overwritten
    model = train_classifier(images, labels, num_classes, seed=seed)
    try:
        atomic_save(
            {"state_dict": model.state_dict(), "in_channels": images.shape[1], "num_classes": num_classes, "version": ARCH_VERSION},
            path,
        )
    except CheckpointError as e:  # the classifier is trained and usable; only the cache is lost
        warnings.warn(f"the evaluation classifier was not cached ({e}); it is retrained next time: set MOELAB_CACHE "
                      "or --cache-dir to a writable folder", stacklevel=2)
    return model


def classifier_for(config: dict, cache_dir: str | Path | None = None, seed: int = 0) -> ImageClassifier:
    """The evaluation classifier of ``config``'s data set, trained on its training split only."""
    from moelab.diffusion.data import dataset_tensors

    images, labels = dataset_tensors(config, "train")
    return load_or_train_classifier(images, labels, config["model"]["num_classes"], cache_dir, seed)
