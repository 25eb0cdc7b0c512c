"""`fit_or_report`: what a training run stopped by SIGTERM or Ctrl-C tells its user.

Lightning stops gracefully on both: on SIGTERM (a scheduler's preemption or time limit, ``kill``)
it finishes the current batch and raises ``SIGTERMException``, a ``SystemExit`` without a code, so
the process exits with status 0 as if training had finished; on Ctrl-C it tears down and calls
``sys.exit(1)``. Either way it prints no word on what was saved. Both applications' training
functions run ``trainer.fit`` through `fit_or_report`, which turns both into `TrainingInterrupted`:
one line naming the newest checkpoint and the command option that continues from it, with exit
status 143 (SIGTERM) or 130 (SIGINT), the shell's convention.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import SIGTERMException

from moelab.errors import TrainingInterrupted

SIGTERM_EXIT, SIGINT_EXIT = 143, 130


def between_epochs(trainer: pl.Trainer) -> bool:
    """Whether the trainer stopped after an epoch's last batch was processed and before the next
    epoch's first (Lightning's epoch progress: every started epoch processed)."""
    epochs = trainer.fit_loop.epoch_progress.current
    return epochs.processed == epochs.started


def fit_or_report(trainer: pl.Trainer, fit: Callable[[], object], newest: Callable[[], Path | None], resume_hint: str) -> None:
    """Run ``fit`` (a call of ``trainer.fit``); if a signal stops it, raise `TrainingInterrupted`.

    Args:
        trainer (`pl.Trainer`): the trainer ``fit`` runs, read for where training stopped.
        fit (`Callable`): runs the training.
        newest (`Callable`): the newest checkpoint this run can continue from, or None; called after
            the stop, so it sees a checkpoint written on the way out.
        resume_hint (`str`): how to continue, with ``{path}`` for the checkpoint, e.g.
            ``"--resume {path}"``.
    """
    try:
        fit()
        return
    except SIGTERMException:
        signal_name, code = "SIGTERM", SIGTERM_EXIT
    except SystemExit:
        if not trainer.interrupted:  # not Lightning's Ctrl-C shutdown
            raise
        signal_name, code = "Ctrl-C (SIGINT)", SIGINT_EXIT
    path = newest()
    where = (
        f"the newest checkpoint is '{path}'; continue with {resume_hint.format(path=path)}"
        if path is not None
        else "no checkpoint had been written yet; run the same command again to start over"
    )
    at = f"at the end of epoch {trainer.current_epoch}" if between_epochs(trainer) else f"in epoch {trainer.current_epoch + 1}"
    raise TrainingInterrupted(f"training stopped by {signal_name} {at}, after step {trainer.global_step}: {where}", code)
