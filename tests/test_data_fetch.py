"""`moelab data fetch` against a local HTTP server (127.0.0.1, stopped after each test) serving tiny
files in the real formats: verified downloads land where `data.root` reads them, a corrupt file is
refused and leaves nothing behind, an interrupted download resumes with HTTP Range, offline is one
clear error naming the file, its URL and where to put it."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import socket
import struct
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from moelab.diffusion.config import load_config
from moelab.diffusion.data import dataset_tensors
from moelab.diffusion.fetch import SOURCES, fetch
from moelab.errors import DataError


class Server:
    """Serves ``files`` (name -> bytes) with Range support; ``cut`` (name -> n) sends only the first n
    bytes of the first full request for that name and drops the connection. Records every request."""

    def __init__(self, files: dict[str, bytes], cut: dict[str, int] | None = None) -> None:
        self.files, self.cut, self.requests = files, dict(cut or {}), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                outer.requests.append((name, rng))
                if name not in outer.files:
                    self.send_error(404)
                    return
                data = outer.files[name]
                start = int(rng.split("=")[1].rstrip("-")) if rng else 0
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if not rng and name in outer.cut:
                    body = body[: outer.cut.pop(name)]  # then the connection closes: an interrupted transfer
                self.wfile.write(body)
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = 5
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/files/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def idx_gz(arr: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return gzip.compress(header + arr.astype(np.uint8).tobytes(), mtime=0)


def mnist_files(seed: int = 0) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (12, 28, 28)),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, 12),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (5, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, 5),
    }
    return {k: idx_gz(v) for k, v in arrays.items()}, arrays


def cifar_archive(n: int = 3, evil: bool = False) -> tuple[bytes, dict]:
    rng = np.random.default_rng(1)
    buf, batches = io.BytesIO(), {}
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            d = {b"labels": [int(v) for v in rng.integers(0, 10, n)], b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
            blob = pickle.dumps(d, protocol=2)
            info = tarfile.TarInfo(f"{'../' if evil else ''}cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            batches[name] = d
    return buf.getvalue(), batches


def mnist_cfg(root: Path, dataset: str = "mnist"):
    return load_config({"model": {"channel_mults": [1], "image_size": 28, "in_channels": 1},
                        "data": {"dataset": dataset, "root": str(root)}})


def test_official_sources_are_torchvisions():
    assert [f for f, _ in SOURCES["mnist"].files] == [f for f, _ in SOURCES["fashion_mnist"].files]
    assert dict(SOURCES["mnist"].files)["train-images-idx3-ubyte.gz"] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert dict(SOURCES["fashion_mnist"].files)["t10k-labels-idx1-ubyte.gz"] == "bb300cfdad3c16e7a12a480ee83cd310"
    assert SOURCES["cifar10"].files == (("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),)
    assert SOURCES["cifar10"].base_url + "cifar-10-python.tar.gz" == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_fetch_idx_files_are_what_data_root_reads(tmp_path, dataset):
    files, arrays = mnist_files()
    lines = []
    with Server(files) as srv:
        root = fetch(dataset, tmp_path / "d", base_url=srv.url, checksums={k: md5(v) for k, v in files.items()}, log=lines.append)
        assert sorted(n for n, _ in srv.requests) == sorted(files) and len(lines) == 4
        x, y = dataset_tensors(mnist_cfg(root, dataset), "train")
        torch.testing.assert_close(x[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte.gz"]).float() / 255 * 2 - 1)
        assert y.tolist() == arrays["train-labels-idx1-ubyte.gz"].tolist()
        assert len(dataset_tensors(mnist_cfg(root, dataset), "test")[1]) == 5
        assert sorted(p.name for p in root.iterdir()) == sorted(files)  # no .part or temp files left
        fetch(dataset, root, base_url=srv.url, checksums={k: md5(v) for k, v in files.items()}, log=lines.append)
        assert len(srv.requests) == 4 and all(": present" in ln for ln in lines[4:])  # verified, not downloaded again


def test_fetch_cifar_extracts_atomically_into_the_folder_data_reads(tmp_path):
    archive, batches = cifar_archive()
    with Server({"cifar-10-python.tar.gz": archive}) as srv:
        root = fetch("cifar10", tmp_path, base_url=srv.url, checksums={"cifar-10-python.tar.gz": md5(archive)})
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    cfg = load_config({"model": {"channel_mults": [1], "image_size": 32, "in_channels": 3},
                       "data": {"dataset": "cifar10", "root": str(root)}})
    x, y = dataset_tensors(cfg, "train")
    assert x.shape == (15, 3, 32, 32) and y[:3].tolist() == batches["data_batch_1"][b"labels"]
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32)
    torch.testing.assert_close(x[0], torch.from_numpy(first).float() / 255 * 2 - 1)


def test_unsafe_archive_entry_is_not_extracted(tmp_path):
    archive, _ = cifar_archive(evil=True)
    with Server({"cifar-10-python.tar.gz": archive}) as srv:
        with pytest.raises(DataError, match=r"unsafe entry '\.\./cifar-10-batches-py/data_batch_1'"):
            fetch("cifar10", tmp_path / "d", base_url=srv.url, checksums={"cifar-10-python.tar.gz": md5(archive)})
    assert not (tmp_path / "cifar-10-batches-py").exists() and not (tmp_path / "d" / "cifar-10-batches-py").exists()
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["cifar-10-python.tar.gz"]  # no temp folder left


def test_corrupt_download_is_refused_and_leaves_nothing(tmp_path):
    files, _ = mnist_files()
    sums = {k: md5(v) for k, v in files.items()}
    bad = dict(files)
    raw = bytearray(files["train-labels-idx1-ubyte.gz"])
    raw[len(raw) // 2] ^= 0xFF  # one byte differs
    bad["train-labels-idx1-ubyte.gz"] = bytes(raw)
    with Server(bad) as srv:
        with pytest.raises(DataError, match=rf"'train-labels-idx1-ubyte.gz' from '{srv.url}train-labels-idx1-ubyte.gz' has MD5 "
                                            rf"{md5(bad['train-labels-idx1-ubyte.gz'])}, expected {sums['train-labels-idx1-ubyte.gz']}"):
            fetch("mnist", tmp_path, base_url=srv.url, checksums=sums)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-images-idx3-ubyte.gz"]  # the good one before it only


def test_interrupted_download_resumes_with_range(tmp_path):
    files, arrays = mnist_files()
    sums = {k: md5(v) for k, v in files.items()}
    name = "train-images-idx3-ubyte.gz"
    with Server(files, cut={name: 1000}) as srv:
        with pytest.raises(DataError, match=rf"download of '{srv.url}{name}' was interrupted after 1000 bytes.*run the same command again to resume"):
            fetch("mnist", tmp_path, base_url=srv.url, checksums=sums)
        assert not (tmp_path / name).exists() and (tmp_path / f"{name}.part").stat().st_size == 1000
        fetch("mnist", tmp_path, base_url=srv.url, checksums=sums)
        assert srv.requests[:2] == [(name, None), (name, "bytes=1000-")]  # the rest only, not the whole file again
    assert (tmp_path / name).read_bytes() == files[name] and not list(tmp_path.glob("*.part"))
    x, _ = dataset_tensors(mnist_cfg(tmp_path), "train")
    assert x.shape == (12, 1, 28, 28)


def test_offline_is_one_error_naming_file_url_and_destination(tmp_path, capfd, monkeypatch):
    from moelab.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/mirror/"
    with pytest.raises(DataError, match=rf"cannot reach '{url}cifar-10-python.tar.gz' .*put it at '{tmp_path}/cifar-10-python.tar.gz'"):
        fetch("cifar10", tmp_path, base_url=url)
    monkeypatch.setenv("MOELAB_DATA_BASE_URL", url)  # the mirror can also come from the environment
    assert main(["data", "fetch", "mnist", "--root", str(tmp_path / "m"), "--no-progress"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot reach '{url}train-images-idx3-ubyte.gz'")
    assert f"put it at '{tmp_path}/m/train-images-idx3-ubyte.gz'" in err and "t10k-labels-idx1-ubyte.gz" in err
    assert not list((tmp_path / "m").iterdir())


def test_bad_base_url_timeout_and_root_are_one_error(tmp_path, capfd):
    from moelab.cli import main
    from moelab.errors import ConfigError

    with pytest.raises(ConfigError, match="--base-url / \\$MOELAB_DATA_BASE_URL 'notaurl' is not a URL"):
        fetch("mnist", tmp_path, base_url="notaurl")
    with pytest.raises(ConfigError, match="--timeout 0 must be a positive number of seconds"):
        fetch("mnist", tmp_path, base_url="file:///nowhere/", timeout=0)
    (tmp_path / "f").write_text("x")
    assert main(["data", "fetch", "mnist", "--root", str(tmp_path / "f" / "m"), "--no-progress"]) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: --root ") and "which is a file" in err and "Traceback" not in err
