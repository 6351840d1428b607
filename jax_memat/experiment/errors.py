"""The expected failures of a run, each with the exit code the CLIs end with.

Every error a user can cause or meet (a bad config, a workdir that holds
something else, missing data, too little memory or disk, a diverged loss, a
signal) is one of these classes; the command-line entry points turn them into
one message and the documented exit code (``jax_memat.cli``). Anything else
is a bug and keeps its traceback.

| exit code | meaning |
|---|---|
| 0 | success (also: the run had already finished; nothing was rewritten) |
| 1 | unexpected error (a bug: the traceback is printed) |
| 2 | bad input: config, flags or arguments |
| 3 | the workdir: another run's files, in use by another process, a corrupt or
      unreadable file, not writable |
| 4 | the dataset was not found |
| 5 | resources: too little memory for the run, disk full or a file-size limit |
| 6 | the loss or gradient became NaN/Inf |
| 128 + N | stopped by signal N (130: SIGINT / Ctrl-C, 143: SIGTERM) |
"""

from __future__ import annotations

import signal


class RunError(Exception):
    """Base of the expected failures; ``exit_code`` is what the CLIs exit with."""

    exit_code = 1


class ConfigError(ValueError, RunError):
    """The config (or a CLI argument) is invalid; the message lists each problem."""

    exit_code = 2


class WorkdirError(RuntimeError, RunError):
    """The workdir cannot be used as asked; the message says why and what was kept."""

    exit_code = 3


class WorkdirConflictError(WorkdirError):
    """The workdir holds files of a different run (or a run's files without its config)."""


class WorkdirLockedError(WorkdirError):
    """Another live process holds the workdir's lock."""


class CorruptFileError(WorkdirError):
    """A file of the workdir is truncated or unreadable; the message names it."""


class ResourceError(RuntimeError, RunError):
    """Too little memory or disk for what was asked; the message gives the estimate."""

    exit_code = 5


class NonFiniteLossError(FloatingPointError, RunError):
    """The training loss or gradient became NaN or Inf."""

    exit_code = 6


class RunInterrupted(RunError):
    """A signal (SIGINT, SIGTERM) stopped the run at a safe point.

    Attributes:
      signum: the signal number; the exit code is ``128 + signum``.
    """

    def __init__(self, signum: int, message: str = ""):
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(message or f"Stopped by {signal_name(self.signum)}.")


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for 15, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
