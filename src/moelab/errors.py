"""One error type for everything a user can get wrong (configs, files, checkpoints, devices).

The CLI and the seed scripts catch it and print its message alone, so users see what is wrong and
how to fix it instead of a traceback.
"""

from __future__ import annotations


class MoelabError(Exception):
    """A user-facing error: its message names what is wrong and how to fix it."""


class ConfigError(MoelabError, ValueError):
    """A configuration key or value is wrong."""


class CheckpointError(MoelabError):
    """A checkpoint or weights file is missing, corrupt, untrusted or does not fit the model."""


class DataError(MoelabError):
    """A data file or folder is missing, empty, corrupt or inconsistent with the config."""


class NonFiniteLossError(MoelabError):
    """Training produced a NaN/Inf loss; the last good checkpoint is left untouched."""


def check_finite_loss(step: int, fix: str, where: str = "", **losses: float) -> None:
    """Raise `NonFiniteLossError` naming the step (and ``where``, e.g. the epoch and batch) and the
    values when any loss is NaN/Inf. Both applications' training steps call this one check.

    Raising inside the training step stops Lightning before the next checkpoint is written, so the
    last good checkpoint on disk stays as it was.
    """
    import math

    if not all(math.isfinite(v) for v in losses.values()):
        values = ", ".join(f"{k}={v}" for k, v in losses.items())
        at = f"at step {step} ({where}): {values}" if where else f"at step {step} ({values})"
        raise NonFiniteLossError(f"the loss became non-finite {at}; training stopped: {fix}")


class TrainingInterrupted(Exception):
    """Training was stopped by a signal (SIGTERM from a scheduler or ``kill``, Ctrl-C).

    Not a `MoelabError`: nothing was wrong with the input. Its message names the newest checkpoint
    and how to continue from it; ``exit_code`` is the shell's convention for the signal (143 for
    SIGTERM, 130 for SIGINT), so a job script or scheduler never mistakes a stopped run for a
    finished one (Lightning alone exits 0 after SIGTERM).
    """

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
