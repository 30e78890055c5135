"""The exceptions that the commands turn into one line and an exit status.

A user's mistake (exit status 2) is a ``UserError``, ``ConfigError``, ``DataError`` or
``CheckpointError``; each message names the flag, field, file or folder that is wrong.
``NonFiniteLossError`` (exit status 1) and ``Stopped`` (130 or 143) end a run that can
be resumed.
"""

from __future__ import annotations

import signal


class UserError(ValueError):
    """A mistake in what the user asked for (a flag, a path); the message names it."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


class DataError(ValueError):
    """A data file is missing or malformed, or a download failed; the message names it."""


class CheckpointError(ValueError):
    """A workdir cannot be used (another config, nothing saved, a damaged file); the
    message names the file or folder and says why."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the stage and the epoch."""


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a run; the message says where, ``signum`` which."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum
