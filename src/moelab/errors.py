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
