"""`run_guarded`: how every moelab command and script reports a user error.

A `MoelabError` (bad config, missing file, checkpoint that does not fit, ...) is printed as one
line, ``error: ...``, with exit status 2, never a traceback; moelab's INFO log lines (which
config aliases were mapped, ...) are shown as plain lines (`show_info_logs`). It lives apart from `moelab.cli` so
that the application CLIs and the repository's scripts can use it without importing the
top-level CLI (which imports them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator

from moelab.errors import MoelabError, TrainingInterrupted


def run_guarded(fn: Callable[[], int | None]) -> int:
    """Run ``fn`` and turn user errors into one clear line on stderr and exit status 2, and a stopped
    training run (`TrainingInterrupted`) into one line naming its newest checkpoint, with the
    signal's exit status."""
    try:
        return int(fn() or 0)
    except MoelabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        if os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0":  # once per run, not per DDP rank
            print(f"interrupted: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (it may be replaced later)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def show_info_logs() -> None:
    """Print moelab's INFO log lines as plain lines on stderr (once, however often it is called)."""
    logger = logging.getLogger("moelab")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Keep Lightning's INFO banner (devices, tips) out of the output while a Trainer that is an
    implementation detail runs -- the evaluation classifier's training, prediction over evaluation
    windows -- so that a command prints its own results, not four banner lines per call.
    Warnings still show."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
