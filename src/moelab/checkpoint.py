"""Checkpoint files that are never half-written and never run pickled code when loaded.

`atomic_save` writes to a temporary file in the destination folder, fsyncs it and renames it over
the target, so a crash (even SIGKILL) leaves either the old file or the complete new one.
`safe_load` always uses ``torch.load(weights_only=True)``: a file carrying a pickle payload is
refused with a `CheckpointError` before anything in it is executed.
`AtomicCheckpointIO` plugs both into Lightning's Trainer.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from moelab.errors import CheckpointError

PathLike = str | os.PathLike


def atomic_write_bytes(data: bytes, path: PathLike) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    A write the system refuses (disk full, no permission, read-only file system) is a
    `CheckpointError` naming the file and the cause, not a traceback from inside the trainer; the
    temp file is removed and whatever ``path`` held before is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(f"could not write '{path}': {e.strerror or e}; choose a writable folder") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            kept = "its previous version is untouched" if path.exists() else "nothing was written"
            raise CheckpointError(
                f"could not write '{path}' ({len(data) / 2**20:.1f} MB): {e.strerror or e}; {kept}. Free space or "
                "choose another folder, then continue from the newest checkpoint"
            ) from None
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` that never leaves a partial file at ``path``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(buf.getvalue(), path)


def safe_load(path: PathLike, map_location: Any = "cpu") -> Any:
    """Load a torch file without executing pickled code; every failure is a `CheckpointError`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist: check the path")
    if path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a folder: pass the checkpoint file inside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint '{path}' is empty (0 bytes): use an earlier checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _weights_only_detail(str(e))
        with open(path, "rb") as f:
            is_pickle = f.read(1) == b"\x80"  # a raw pickle stream (PROTO opcode), not a torch zip file
        if "GLOBAL" not in detail and not is_pickle:
            raise CheckpointError(
                f"checkpoint '{path}' is corrupt or not a PyTorch file ({detail}); use an earlier checkpoint"
            ) from None
        raise CheckpointError(
            f"checkpoint '{path}' was refused: it contains Python objects that would have to be executed to "
            f"load it ({detail}; loading uses weights_only=True). Only load files you trust; re-save it as a "
            "plain state_dict of tensors."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt or not a PyTorch file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "use an earlier checkpoint"
        ) from None


def check_state_dict(expected: Mapping[str, Any], state: Mapping[str, Any], what: str, fix: str) -> None:
    """Raise a `CheckpointError` naming the keys and shapes in which ``state`` differs from ``expected``.

    ``what`` says which file does not fit which model, ``fix`` what the user should do instead.
    """
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return

    def few(items: list[str]) -> str:
        return ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")

    parts = []
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {few(shapes)}")
    if missing:
        parts.append(f"{len(missing)} key(s) missing from the checkpoint: {few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {few(unexpected)}")
    raise CheckpointError(f"{what} ({'; '.join(parts)}); {fix}")


def load_error_detail(error: BaseException, limit: int = 300) -> str:
    """The informative part of torch's ``load_state_dict`` error, on one line (its first line only
    names the module class; the missing/unexpected keys and size mismatches follow)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    return "; ".join(lines)[:limit] or type(error).__name__


def _weights_only_detail(message: str) -> str:
    """The informative line of torch's long weights_only error (e.g. the blocked global)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln or "invalid load key" in ln:
            return ln.rstrip(".")
    return lines[-1][:200] if lines else "unreadable"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic writes, ``weights_only=True`` reads with clear errors."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: PathLike, storage_options: Any = None) -> None:
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path: PathLike, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return safe_load(path, map_location=map_location if map_location is not None else "cpu")
