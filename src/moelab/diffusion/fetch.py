"""`fetch`: download MNIST, Fashion-MNIST or CIFAR-10 into the folder `data.root` reads.

The files, their official URLs and MD5 checksums are torchvision's (``torchvision.datasets.MNIST``,
``FashionMNIST``, ``CIFAR10``), so a folder fetched here is the data set every paper uses. Every
file is downloaded to ``<name>.part``, verified, then renamed into place: a file under its final
name is always complete and correct. An interrupted download leaves its ``.part`` file, and the
next run asks the server only for the missing bytes (HTTP ``Range``). A file whose checksum does
not match is removed and reported; nothing half-written stays behind. CIFAR-10's archive is
extracted into a temporary folder that is renamed to ``cifar-10-batches-py`` when complete.

Offline (no route to the server) the error names the file, its URL and where to put a copy
fetched elsewhere; a copy put there is verified and used without any download.

The server and the checksums can be replaced (``base_url=`` / ``$MOELAB_DATA_BASE_URL``,
``checksums=``) for a mirror, and for the tests' local server.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from moelab.errors import ConfigError, DataError
from moelab.validation import check_output

BASE_URL_ENV = "MOELAB_DATA_BASE_URL"
CHUNK = 1 << 20


class UnreachableError(DataError):
    """The server could not be reached at all (offline, DNS, refused): nothing was downloaded."""


@dataclass(frozen=True)
class Source:
    """One downloadable data set: where its files live and what they must hash to."""

    base_url: str
    files: tuple[tuple[str, str], ...]  # (file name, md5)
    archive_folder: str | None = None  # tar.gz files are extracted; this folder must result


SOURCES: dict[str, Source] = {
    "mnist": Source(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        (
            ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        ),
    ),
    "fashion_mnist": Source(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        (
            ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        ),
    ),
    "cifar10": Source(
        "https://www.cs.toronto.edu/~kriz/",
        (("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        archive_folder="cifar-10-batches-py",
    ),
}
#: Where `moelab data fetch` puts each set when no --root is given (MNIST and Fashion-MNIST share file names).
DEFAULT_ROOTS = {"mnist": "data/mnist", "fashion_mnist": "data/fashion_mnist", "cifar10": "data"}


def md5_of(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)  # the published checksums are MD5: integrity, not security
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _offline_hint(url: str, dest: Path) -> str:
    return f"download {url} on a machine with internet and put it at '{dest}'; the next run verifies it and downloads nothing"


def download(url: str, dest: Path, md5: str, timeout: float = 60.0, progress: Callable[[int, int | None], None] | None = None) -> str:
    """Download ``url`` to ``dest`` through ``dest.part`` (resumed with HTTP Range), verify, rename.

    Returns ``"present"`` when ``dest`` already held the right bytes, ``"resumed"`` or
    ``"downloaded"`` otherwise. Raises `DataError` when the server cannot be reached (the
    ``.part`` file is kept for resuming) or the checksum does not match (it is removed).
    """
    if dest.is_file() and md5_of(dest) == md5:
        return "present"
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "moelab-fetch"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    status = "resumed" if have else "downloaded"
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            if have and resp.status != 206:  # the server ignored Range: start over
                have, status = 0, "downloaded"
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with part.open("ab" if have else "wb") as f:
                got = have
                while block := resp.read(CHUNK):
                    f.write(block)
                    got += len(block)
                    if progress is not None:
                        progress(got, total)
                f.flush()
                os.fsync(f.fileno())
            if total is not None and got < total:
                raise http.client.IncompleteRead(b"", total - got)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the .part file is already whole
            pass
        else:
            raise DataError(f"downloading '{url}' failed: HTTP {e.code} {e.reason}; {_offline_hint(url, dest)}") from None
    except (http.client.IncompleteRead, ConnectionError, socket.timeout, TimeoutError) as e:
        done = part.stat().st_size if part.is_file() else 0
        raise DataError(
            f"the download of '{url}' was interrupted after {done} bytes ({type(e).__name__}); run the same command "
            f"again to resume from '{part}'"
        ) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UnreachableError(f"cannot reach '{url}' ({reason}): offline? {_offline_hint(url, dest)}") from None
    got_md5 = md5_of(part)
    if got_md5 != md5:
        part.unlink()
        raise DataError(
            f"'{dest.name}' from '{url}' has MD5 {got_md5}, expected {md5}: the download is corrupt (removed, nothing "
            "was written under its name); run again, or check that the mirror serves the official file"
        )
    os.replace(part, dest)  # the content was fsynced; a re-downloadable file needs no directory fsync
    return status


def _safe_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for m in members:
        p = Path(m.name)
        if p.is_absolute() or ".." in p.parts or not (m.isfile() or m.isdir()):
            raise DataError(f"archive '{archive}' holds an unsafe entry '{m.name}' (absolute, '..' or a link); it was not extracted")
    return members


def extract_tar(archive: Path, root: Path, folder: str) -> Path:
    """Extract ``archive`` so that ``root/folder`` appears complete or not at all."""
    target = root / folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.", dir=root))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(tmp, members=_safe_members(tar, archive))
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"archive '{archive}' cannot be extracted ({e}); delete it and fetch again") from None
        if not (tmp / folder).is_dir():
            raise DataError(f"archive '{archive}' does not contain the folder '{folder}/'; it is not the expected data set")
        old = None
        if target.exists():
            old = root / f".{folder}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp / folder, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fetch(
    name: str,
    root: str | Path | None = None,
    *,
    base_url: str | None = None,
    checksums: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    log: Callable[[str], None] | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> Path:
    """Download (or verify) data set ``name`` into ``root``; return the folder to use as ``data.root``.

    Args:
        name: ``mnist``, ``fashion_mnist`` or ``cifar10`` (the `data.dataset` names).
        root: destination folder (default: `DEFAULT_ROOTS`).
        base_url: server folder holding the files (default ``$MOELAB_DATA_BASE_URL``, else the
            official one); a mirror, or a local server in tests.
        checksums: MD5 per file name, replacing the official ones (for a mirror's own files).
        timeout: seconds to wait for the server before giving up.
        log: receives one line per file (what was done).
        progress: called as ``(file name, bytes so far, total or None)`` while downloading.
    """
    if name not in SOURCES:
        raise DataError(f"unknown data set '{name}' to fetch; use one of: {', '.join(SOURCES)}")
    src = SOURCES[name]
    base = base_url or os.environ.get(BASE_URL_ENV) or src.base_url
    if urllib.parse.urlsplit(base).scheme not in ("http", "https", "ftp", "file"):
        raise ConfigError(f"--base-url / ${BASE_URL_ENV} '{base}' is not a URL: give e.g. https://mirror.example.org/mnist/ or file:///srv/mirror/")
    if not timeout > 0:
        raise ConfigError(f"--timeout {timeout} must be a positive number of seconds")
    if not base.endswith("/"):
        base += "/"
    root = Path(root if root is not None else DEFAULT_ROOTS[name]).expanduser()
    check_output("--root", root, folder=True)  # a file, or a path under one
    root.mkdir(parents=True, exist_ok=True)
    sums = dict(src.files)
    if checksums:
        unknown = sorted(set(checksums) - set(sums))
        if unknown:
            raise DataError(f"checksums given for files {unknown} that {name} does not have; its files: {', '.join(sums)}")
        sums.update(checksums)
    for fname, md5 in sums.items():
        dest = root / fname
        complete = src.archive_folder is not None and (root / src.archive_folder).is_dir() and dest.is_file()
        try:
            status = download(
                base + fname, dest, md5, timeout,
                progress=(lambda got, total, f=fname: progress(f, got, total)) if progress is not None else None,
            )
        except UnreachableError as e:
            if len(sums) == 1:
                raise
            raise UnreachableError(f"{e} (the same for each of {name}'s files: {', '.join(sums)}, all under {base})") from None
        if src.archive_folder is not None and not (status == "present" and complete):
            extract_tar(dest, root, src.archive_folder)
            status += f", extracted to {root / src.archive_folder}"
        if log is not None:
            log(f"{dest}: {status} (MD5 {md5} verified)")
    return root
