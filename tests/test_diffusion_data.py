"""Image loaders on files written here in the exact on-disk formats (idx, CIFAR-10 batches, folders)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from moelab.diffusion.config import load_config
from moelab.diffusion.data import dataset_tensors, load_split
from moelab.errors import DataError

#: Opt-in check on the real MNIST files: set MOELAB_MNIST_ROOT to the folder holding them.
MNIST_ROOT = os.environ.get("MOELAB_MNIST_ROOT")


def cfg(dataset, root="", **model):
    return load_config({"model": {"channel_mults": [1], "image_size": 8, "in_channels": 1, **model},
                        "data": {"dataset": dataset, "root": str(root)}})


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def write_mnist(root: Path, n_train=12, n_test=5, gz=False, seed=0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        lbls = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(root / f"{split}-images-idx3-ubyte", imgs, gz)
        write_idx(root / f"{split}-labels-idx1-ubyte", lbls, gz)
        out[split] = (imgs, lbls)
    return out["train"]


def write_cifar(root: Path, n=4, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, n)],
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"a.png"] * n}
        with open(root / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
        batches[name] = d
    return batches


def test_digits_fixed_stratified_split():
    c = load_config({"model": {"channel_mults": [1], "image_size": 16, "in_channels": 1}, "data": {"dataset": "digits", "fit": "pad"}})
    xtr, ytr = dataset_tensors(c, "train")
    xte, yte = dataset_tensors(c, "test")
    assert (len(ytr), len(yte)) == (1437, 360) and xtr.shape == (1437, 1, 16, 16)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert float(xtr.min()) == -1.0 and float(xtr.max()) == 1.0
    assert (xtr[:, :, :4].eq(-1).all()) and (xtr[:, :, 12:].eq(-1).all())  # 8x8 centred in 16x16
    share = torch.bincount(yte, minlength=10).float() / len(yte)
    assert float((share - 0.1).abs().max()) < 0.01  # stratified
    from sklearn.datasets import load_digits

    d = load_digits()
    raw = torch.from_numpy(d.images[0]).float() / 16 * 2 - 1
    assert any(torch.equal(img[0, 4:12, 4:12], raw) for img in xtr[:20]) or any(torch.equal(img[0, 4:12, 4:12], raw) for img in xte[:20])
    assert torch.equal(dataset_tensors(c, "train")[1], ytr)  # same split every time
    resized = load_split(load_config(c, {"data.fit": "resize"}), "train")[0][0]
    assert resized.shape == (1, 16, 16) and not resized[:, :4].eq(-1).all()


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    imgs, lbls = write_mnist(tmp_path / "mnist", gz=gz)
    c = cfg("mnist", tmp_path / "mnist", image_size=28)
    x, y = dataset_tensors(c, "train")
    assert x.shape == (12, 1, 28, 28) and torch.equal(y, torch.from_numpy(lbls.astype(np.int64)))
    torch.testing.assert_close(x[:, 0], torch.from_numpy(imgs).float() / 255 * 2 - 1)
    assert len(load_split(c, "test")) == 5
    assert load_split(cfg("fashion_mnist", tmp_path / "mnist", image_size=16), "train")[0][0].shape == (1, 16, 16)


def test_cifar_batches(tmp_path):
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    c = cfg("cifar10", tmp_path, image_size=32, in_channels=3)  # parent folder also accepted
    x, y = dataset_tensors(c, "train")
    assert x.shape == (20, 3, 32, 32)
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32)
    torch.testing.assert_close(x[0], torch.from_numpy(first).float() / 255 * 2 - 1)
    assert y[:4].tolist() == batches["data_batch_1"][b"labels"]
    assert load_split(cfg("cifar10", tmp_path / "cifar-10-batches-py", image_size=16, in_channels=3), "test")[0][0].shape == (3, 16, 16)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_refuses_pickled_code(tmp_path, capsys):
    root = tmp_path / "cifar-10-batches-py"
    write_cifar(root)
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [1]}, f, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_3.*Python objects other than CIFAR-10 data.*refused to load .*print"):
        load_split(cfg("cifar10", root, image_size=32, in_channels=3), "train")
    assert "pwned" not in capsys.readouterr().out


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in (("cat", 6), ("dog", 4)):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 12, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("ignored")
    c = cfg("image_folder", tmp_path / "imgs", image_size=8, in_channels=3, num_classes=2)
    xtr, ytr = dataset_tensors(c, "train")
    xte, yte = dataset_tensors(c, "test")
    assert len(ytr) + len(yte) == 10 and xtr.shape[1:] == (3, 8, 8)
    assert sorted(torch.cat([ytr, yte]).tolist()) == [0] * 6 + [1] * 4  # class ids by sorted folder name
    gray = dataset_tensors(cfg("image_folder", tmp_path / "imgs", image_size=8, in_channels=1, num_classes=2), "train")[0]
    assert gray.shape[1] == 1


def test_real_mnist_if_present():
    found = sorted(Path(MNIST_ROOT).glob("**/train-images-idx3-ubyte*")) if MNIST_ROOT else []
    if not found:
        pytest.skip("real MNIST files absent: set MOELAB_MNIST_ROOT to a folder holding train-images-idx3-ubyte[.gz] to run this check")
    root = found[0].parent
    x, y = dataset_tensors(cfg("mnist", root, image_size=32), "train")
    assert x.shape == (60000, 1, 32, 32) and int(y.max()) == 9
