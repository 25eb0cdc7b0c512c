"""Image data for MoEFsDiC: scikit-learn digits (offline default), MNIST / Fashion-MNIST idx
files, CIFAR-10 python batches and image folders (one subfolder per class).

Every loader returns native-resolution uint8 images ``[N, C, h, w]`` and int64 labels; the
dataset maps them to float32 in [-1, 1] at ``model.image_size`` (resize or centre-pad). Problems
with files or their agreement with the config raise a `DataError` saying what to fix.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from moelab.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SPLITS = ("train", "test")


# --- the dataset ---------------------------------------------------------------------------------
class ImageDataset(Dataset):
    """Native uint8 images kept in memory, mapped to ``[C, size, size]`` float32 in [-1, 1] on access."""

    def __init__(self, images: Tensor, labels: Tensor, image_size: int, fit: str = "resize", max_value: float = 255.0) -> None:
        self.images, self.labels = images, labels
        self.image_size, self.fit, self.max_value = image_size, fit, max_value

    def __len__(self) -> int:
        return self.images.shape[0]

    def transform(self, raw: Tensor) -> Tensor:
        """``[N, C, h, w]`` raw -> ``[N, C, size, size]`` in [-1, 1]."""
        x = raw.float() / self.max_value * 2.0 - 1.0
        h, w = x.shape[-2:]
        s = self.image_size
        if (h, w) == (s, s):
            return x
        if self.fit == "pad" and h <= s and w <= s:
            top, left = (s - h) // 2, (s - w) // 2
            return F.pad(x, (left, s - w - left, top, s - h - top), value=-1.0)
        return F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True).clamp_(-1.0, 1.0)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.transform(self.images[i : i + 1])[0], self.labels[i]

    def tensors(self) -> tuple[Tensor, Tensor]:
        return self.transform(self.images), self.labels.clone()


# --- loaders -------------------------------------------------------------------------------------
def _stratified_split(images: np.ndarray, labels: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The fixed 80/20 stratified split (seed 0) used for sets that ship without a test split."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    strat = labels if counts[counts > 0].min() >= 2 and len(labels) >= 10 else None
    tr, te = train_test_split(idx, test_size=0.2, random_state=0, stratify=strat)
    keep = np.sort(tr if split == "train" else te)
    return images[keep], labels[keep]


def load_digits_raw(split: str) -> tuple[np.ndarray, np.ndarray, float]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.uint8)[:, None]  # values 0..16
    imgs, labels = _stratified_split(images, d.target.astype(np.int64), split)
    return imgs, labels, 16.0


def _open_maybe_gz(root: Path, name: str) -> bytes:
    for cand in (root / name, root / f"{name}.gz"):
        if cand.exists():
            try:
                data = cand.read_bytes()
                return gzip.decompress(data) if cand.suffix == ".gz" else data
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                raise DataError(f"'{cand}' cannot be read ({e}); download it again") from None
    raise DataError(
        f"'{root / name}' (or '{name}.gz') not found: data.root must be the folder holding the MNIST-format files "
        f"{', '.join(IDX_FILES['train'] + IDX_FILES['test'])} (optionally .gz)"
    )


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """Parse an idx file (magic 0x0000 08 <ndim>, big-endian int32 dims, uint8 payload)."""
    if len(data) < 8:
        raise DataError(f"idx file '{name}' is empty or truncated ({len(data)} bytes); download it again")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or ndim not in (1, 3):
        raise DataError(f"'{name}' is not a uint8 idx file (bad magic number); expected the MNIST file format")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"idx file '{name}' is truncated in its header; download it again")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    size = int(np.prod(dims))
    if len(data) - header != size:
        raise DataError(f"idx file '{name}' holds {len(data) - header} bytes of data but its header says {size}; the file is corrupt")
    if size == 0:
        raise DataError(f"idx file '{name}' contains no images; download it again")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_idx_raw(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, float]:
    img_name, lbl_name = IDX_FILES[split]
    images = parse_idx(_open_maybe_gz(root, img_name), img_name)
    labels = parse_idx(_open_maybe_gz(root, lbl_name), lbl_name)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"'{img_name}' must hold [N, H, W] images and '{lbl_name}' [N] labels")
    if len(images) != len(labels):
        raise DataError(f"'{img_name}' has {len(images)} images but '{lbl_name}' has {len(labels)} labels")
    return images[:, None].copy(), labels.astype(np.int64), 255.0


class _CifarUnpickler(pickle.Unpickler):
    """Allows exactly what a CIFAR-10 batch needs: a dict of bytes/str/lists/ints and numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            d = _CifarUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        if str(e).startswith("refused"):
            raise DataError(
                f"CIFAR-10 batch '{path}' contains Python objects other than CIFAR-10 data ({e}); it was not loaded. "
                "Use the original files from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
            ) from None
        raise DataError(f"CIFAR-10 batch '{path}' is corrupt or not a CIFAR-10 python batch ({e}); download it again") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DataError(f"CIFAR-10 batch '{path}' is corrupt or not a CIFAR-10 python batch ({e}); download it again") from None
    if not isinstance(d, dict):
        raise DataError(f"CIFAR-10 batch '{path}' must be a pickled dict with 'data' and 'labels'")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    data, labels = d.get("data"), d.get("labels", d.get("fine_labels"))
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DataError(f"CIFAR-10 batch '{path}': 'data' must be a uint8 array [N, 3072]; the file is corrupt")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data) or len(data) == 0:
        raise DataError(f"CIFAR-10 batch '{path}': 'labels' must list one label per image (got {len(labels) if labels is not None else 'none'})")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def load_cifar_raw(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, float]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    missing = [n for n in names if not (root / n).exists()]
    if missing:
        raise DataError(
            f"CIFAR-10 files {missing} not found in '{root}': data.root must be the 'cifar-10-batches-py' folder "
            "(data_batch_1..5, test_batch) from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
        )
    parts = [_cifar_batch(root / n) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), 255.0


def _read_folder(root: Path, in_channels: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder '{root}' has no class subfolders: put images in '{root}/<class name>/*.png'")
    if in_channels not in (1, 3):
        raise DataError(f"image folders are read as grayscale or RGB: set model.in_channels to 1 or 3 (got {in_channels})")
    mode = "L" if in_channels == 1 else "RGB"
    images, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert(mode).resize((image_size, image_size), Image.BICUBIC)
                    arr = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise DataError(f"image '{f}' cannot be read ({type(e).__name__}: {e}); remove or replace it") from None
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise DataError(f"image folder '{root}' contains no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class subfolders")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_folder_raw(root: Path, split: str, in_channels: int, image_size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """``root/train/<class>/`` + ``root/test/<class>/`` if present, else ``root/<class>/`` split 80/20."""
    if (root / "train").is_dir() and (root / split).is_dir():
        images, labels = _read_folder(root / split, in_channels, image_size)
        return images, labels, 255.0
    images, labels = _read_folder(root, in_channels, image_size)
    imgs, lbls = _stratified_split(images, labels, split)
    return imgs, lbls, 255.0


# --- public API ----------------------------------------------------------------------------------
def _raw(config: Mapping[str, Any], split: str) -> tuple[np.ndarray, np.ndarray, float]:
    data, model = config["data"], config["model"]
    name = data["dataset"]
    if name == "digits":
        return load_digits_raw(split)
    root = Path(data["root"]).expanduser()
    if not root.exists():
        raise DataError(f"data folder '{root}' does not exist: set data.root to the folder holding the {name} files")
    if not root.is_dir():
        raise DataError(f"data.root '{root}' is a file: set it to the folder holding the {name} files")
    if name in ("mnist", "fashion_mnist"):
        return load_idx_raw(root, split)
    if name == "cifar10":
        return load_cifar_raw(root, split)
    return load_folder_raw(root, split, model["in_channels"], model["image_size"])


def load_split(config: Mapping[str, Any], split: str) -> ImageDataset:
    """Dataset of (image float32 [C, H, W] in [-1, 1], label int64) for ``split`` "train" or "test"."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, not {split!r}")
    images, labels, max_value = _raw(config, split)
    model, data = config["model"], config["data"]
    if data["subset"] is not None:
        images, labels = images[: data["subset"]], labels[: data["subset"]]
    if len(images) == 0:
        raise DataError(f"the {split} split of {data['dataset']} is empty")
    if images.shape[1] != model["in_channels"]:
        raise DataError(
            f"{data['dataset']} images have {images.shape[1]} channel(s) but model.in_channels={model['in_channels']}: "
            f"set model.in_channels: {images.shape[1]}"
        )
    if labels.min() < 0 or labels.max() >= model["num_classes"]:
        raise DataError(
            f"{data['dataset']} has label ids up to {labels.max()} but model.num_classes={model['num_classes']}: "
            f"set model.num_classes to at least {labels.max() + 1}"
        )
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), model["image_size"], data["fit"], max_value)


def dataset_tensors(config: Mapping[str, Any], split: str) -> tuple[Tensor, Tensor]:
    """All images of a split as one tensor ``[N, C, H, W]`` in [-1, 1] and labels ``[N]``."""
    return load_split(config, split).tensors()
