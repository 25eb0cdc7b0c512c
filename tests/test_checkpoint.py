"""Atomic checkpoint writes and weights_only loads (shared by both applications)."""

import errno
import os
import pickle

import pytest
import torch

from moelab.checkpoint import AtomicCheckpointIO, atomic_save, safe_load
from moelab.errors import CheckpointError


class Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_atomic_save_roundtrip_and_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "ck.pth"
    atomic_save({"w": torch.arange(5.0), "epoch": 3}, path)
    out = safe_load(path)
    assert out["epoch"] == 3 and torch.equal(out["w"], torch.arange(5.0))
    assert os.listdir(path.parent) == ["ck.pth"]
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ck.pth"
    atomic_save({"v": 1}, path)

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(CheckpointError, match=r"could not write '.*ck\.pth' \(0\.0 MB\): No space left on device; its previous "
                       r"version is untouched\. Free space or choose another folder"):
        atomic_save({"v": 2}, path)
    with pytest.raises(CheckpointError, match=r"could not write '.*new\.pth' .*: No space left on device; nothing was written"):
        atomic_save({"v": 2}, tmp_path / "new.pth")
    monkeypatch.undo()
    assert safe_load(path)["v"] == 1
    assert os.listdir(tmp_path) == ["ck.pth"]


def test_save_into_an_unwritable_place_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"could not write '.*file/sub/ck\.pth': Not a directory; choose a writable folder"):
        atomic_save({"v": 1}, tmp_path / "file" / "sub" / "ck.pth")


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_pickle_payload_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    obj = {"state_dict": {}, "x": Payload(str(marker))}
    if writer == "torch":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    with pytest.raises(CheckpointError, match="refused: it contains Python objects"):
        safe_load(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content,message",
    [(None, "does not exist"), (b"", "is empty"), (b"garbage bytes", "corrupt or not a PyTorch file")],
)
def test_bad_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "ck.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        safe_load(path)


def test_truncated_checkpoint_is_corrupt(tmp_path):
    path = tmp_path / "ck.pth"
    atomic_save({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="corrupt"):
        safe_load(path)


def test_lightning_checkpoint_io_plugin(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"a": torch.ones(2)}, "epoch": 1}, tmp_path / "x.ckpt")
    assert io.load_checkpoint(tmp_path / "x.ckpt")["epoch"] == 1
