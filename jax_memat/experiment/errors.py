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

import errno
import signal

EXIT_BAD_INPUT = 2
EXIT_WORKDIR = 3
EXIT_DATA = 4
EXIT_RESOURCES = 5
EXIT_INTERRUPTED_SIGINT = 130

_FULL_DISK = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_WORKDIR = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST}


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


class OtherProcessError(RunError):
    """Another process of a multi-process run failed a check; this one stops with it.

    Attributes:
      exit_code: the failed process's exit code.
    """

    def __init__(self, process: int, exit_code: int, message: str):
        self.process = int(process)
        self.exit_code = int(exit_code)
        super().__init__(f"process {process} of the run stopped: {message}")


def exit_code(err: BaseException) -> int | None:
    """The documented exit code of an expected failure; None for a bug."""
    from jax_memat.data import DatasetNotFoundError

    if isinstance(err, RunError):
        return err.exit_code
    if isinstance(err, DatasetNotFoundError):
        return EXIT_DATA
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED_SIGINT
    if isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err)[:200]:
        return EXIT_RESOURCES
    if isinstance(err, OSError):
        if err.errno in _FULL_DISK:
            return EXIT_RESOURCES
        if err.errno in _WORKDIR or isinstance(err, FileNotFoundError):
            return EXIT_WORKDIR
        return None
    if isinstance(err, ValueError):
        return EXIT_BAD_INPUT  # the library's argument checks
    return None
