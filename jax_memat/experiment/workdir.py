"""A run's workdir: atomic writes, an exclusive lock, and a read-only survey.

A user's work is never lost to a fault of the run:

- every file is written to a temporary file in the same folder and renamed
  over the old one (``atomic_write``), so a failed write (disk full, a
  file-size limit, a kill) leaves the previous version intact;
- ``metrics.jsonl`` grows by whole lines, each appended with one ``write``
  and flushed to disk; a torn last line (a kill mid-write) is dropped with a
  warning on the next start;
- ``WorkdirLock`` holds an exclusive ``flock`` on ``<workdir>/.lock`` while a
  run uses the workdir and says who holds it; the kernel drops the lock when
  its process dies, so a killed run never blocks the next one;
- ``survey_workdir`` reads what is there (config, checkpoints, metrics,
  labels, report) without writing anything, and the loop decides from all of
  it whether the workdir is new, resumable, finished, or something to refuse.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import os
import re
import socket
import sys

import numpy as np
from absl import logging

from jax_memat.experiment.errors import CorruptFileError, WorkdirError, WorkdirLockedError
from jax_memat.fileio import atomic_write

CONFIG_FILE = "config.json"
LABELS_FILE = "labels.npz"
METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "final_report.json"
PLOT_FILE = "learning_curves.png"
LOCK_FILE = ".lock"
CHECKPOINTS_DIR = "checkpoints"
PER_EXAMPLE_DIR = "per_example"
# Files and folders a run writes; a workdir holding any of them holds a run.
RUN_FILES = (
    CONFIG_FILE,
    LABELS_FILE,
    METRICS_FILE,
    REPORT_FILE,
    CHECKPOINTS_DIR,
    PER_EXAMPLE_DIR,
)
# Orbax names a finished step folder by its number alone.
_STEP_DIR = re.compile(r"^\d+$")


# --------------------------------------------------------------------------- writes


def write_json(path: str, obj: object) -> None:
    """Writes ``obj`` as indented JSON, atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def save_npz(path: str, **arrays: np.ndarray) -> None:
    """``np.savez_compressed`` to ``path``, atomically."""
    with atomic_write(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def append_line(path: str, line: str) -> None:
    """Appends one line with a single ``write`` and flushes it to disk.

    A failed write (disk full) can leave a partial line at the end; readers
    (``read_jsonl``) drop a torn last line with a warning.
    """
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(errno.ENOSPC, f"only {written} of {len(data)} bytes written", path)
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- reads


def read_json(path: str) -> dict:
    """Reads a JSON object; a truncated or invalid file raises ``CorruptFileError`` naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(
            f"{path} is corrupt ({err}); it was probably cut short by a failed write. Move it "
            "away (or restore it from a copy) and run again."
        ) from None


def read_jsonl(path: str) -> tuple[list[dict], bool]:
    """The rows of a JSON-lines file and whether a torn last line was dropped.

    Returns:
      ``(rows, torn)``: ``torn`` is True when the last line was incomplete or
      invalid (a write cut short); it is left out of ``rows``.

    Raises:
      CorruptFileError: a line other than the last is invalid; names the line.
    """
    if not os.path.exists(path):
        return [], False
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    last_line = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows, torn = [], False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        last = i == last_line
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if last:
                torn = True
                break
            raise CorruptFileError(
                f"{path}, line {i + 1}, is corrupt ({err}); only the last line of this file can "
                "be cut short by a failed write. Repair or remove that line and run again."
            ) from None
        if last and not data.endswith(b"\n"):
            # Valid JSON but no newline: the write may have stopped right here.
            torn = True
            break
        rows.append(row)
    return rows, torn


# --------------------------------------------------------------------------- the lock


class WorkdirLock:
    """An exclusive, process-scoped lock on a workdir (``flock`` on ``<workdir>/.lock``).

    The lock file holds the holder's pid, host, start time and command line,
    so that a refused run can say who holds it. The kernel releases a
    ``flock`` when its process dies, so a killed run never leaves a stale lock.
    (``flock`` is not reliable on some network file systems; use a local or a
    cluster file system that supports it.)

    Example:
      >>> with WorkdirLock("workdirs/run"):
      ...     ...  # the run; a second process gets WorkdirLockedError
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock (creating the workdir); raises ``WorkdirLockedError`` if held."""
        import fcntl

        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise WorkdirLockedError(
                f"The workdir {self.workdir} is in use by another run "
                f"({self.holder() or 'holder unknown'}). Wait for it to finish, stop it, or use "
                "another --workdir; nothing was written."
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def holder(self) -> str:
        """Who holds (or last held) the lock, as one line; "" if unknown."""
        try:
            with open(self.path) as f:
                h = json.loads(f.read() or "{}")
        except (OSError, ValueError):
            return ""
        if not h:
            return ""
        return f"pid {h.get('pid')} on {h.get('host')} since {h.get('since')}: {h.get('command')}"

    def release(self) -> None:
        """Releases the lock (the file stays; its content says who held it last)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------- the survey


@dataclasses.dataclass(frozen=True)
class WorkdirSurvey:
    """What a workdir holds, read without writing anything.

    Attributes:
      path: the workdir.
      exists: the folder exists.
      run_files: which of ``RUN_FILES`` are present (non-empty).
      config: the saved config as a dict, or None.
      checkpoint_steps: ``{kind: [steps]}`` of the step folders under
        ``checkpoints/`` (finished saves only; orbax's temporary folders of
        interrupted saves are not counted).
      checkpoint_kinds: the folders under ``checkpoints/`` (a run creates
        ``init``, ``latest`` and ``best`` when it starts, so a missing one was
        removed by hand, while an empty one was cut short by a fault).
      metrics_rows: the rows of ``metrics.jsonl`` (a torn last line dropped).
      metrics_torn: whether a torn last line was dropped.
      report: ``final_report.json`` as a dict, or None.
    """

    path: str
    exists: bool
    run_files: tuple[str, ...]
    config: dict | None
    checkpoint_steps: dict[str, list[int]]
    checkpoint_kinds: tuple[str, ...]
    metrics_rows: list[dict]
    metrics_torn: bool
    report: dict | None

    @property
    def last_metrics_epoch(self) -> int:
        return max((int(r.get("epoch", 0)) for r in self.metrics_rows), default=0)


def check_workdir_path(workdir: str, what: str = "workdir") -> None:
    """Raises ``WorkdirError`` unless ``workdir`` is (or can become) a writable folder.

    ``what`` names the folder in the message (``"workdir"``, ``"output folder"``).

    Checked before anything is written or compiled: a path that is a file,
    under a file, or in a folder this user cannot write to.
    """
    path = os.path.abspath(workdir)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise WorkdirError(f"The {what} {workdir} is a file, not a folder; use another path.")
        if not os.access(path, os.W_OK | os.X_OK):
            raise WorkdirError(
                f"The {what} {workdir} is not writable by this user; nothing was written. "
                f"Use a writable {what} (or fix its permissions)."
            )
        return
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise WorkdirError(
            f"The {what} {workdir} cannot be created: {parent} is a file, not a folder."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WorkdirError(
            f"The {what} {workdir} cannot be created: {parent} is not writable by this user."
        )


def survey_workdir(workdir: str) -> WorkdirSurvey:
    """Reads what ``workdir`` holds; writes nothing.

    Raises:
      WorkdirError: the path is a file.
      CorruptFileError: ``config.json`` or ``final_report.json`` is truncated,
        or a line before the last of ``metrics.jsonl`` is invalid.
    """
    check_workdir_path(workdir)
    if not os.path.isdir(workdir):
        return WorkdirSurvey(workdir, False, (), None, {}, (), [], False, None)
    present = []
    for name in RUN_FILES:
        p = os.path.join(workdir, name)
        if (os.path.isfile(p) and os.path.getsize(p) > 0) or (os.path.isdir(p) and os.listdir(p)):
            present.append(name)
    config_path = os.path.join(workdir, CONFIG_FILE)
    config = read_json(config_path) if CONFIG_FILE in present else None
    steps: dict[str, list[int]] = {}
    kinds = []
    ckpt_dir = os.path.join(workdir, CHECKPOINTS_DIR)
    if os.path.isdir(ckpt_dir):
        for kind in sorted(os.listdir(ckpt_dir)):
            kind_dir = os.path.join(ckpt_dir, kind)
            if os.path.isdir(kind_dir):
                kinds.append(kind)
                found = sorted(int(s) for s in os.listdir(kind_dir) if _STEP_DIR.match(s))
                if found:
                    steps[kind] = found
    rows, torn = read_jsonl(os.path.join(workdir, METRICS_FILE))
    report_path = os.path.join(workdir, REPORT_FILE)
    report = read_json(report_path) if REPORT_FILE in present else None
    return WorkdirSurvey(
        workdir, True, tuple(present), config, steps, tuple(kinds), rows, torn, report
    )


def describe_run_files(survey: WorkdirSurvey) -> str:
    """One line listing what a survey found, e.g. for an error message."""
    parts = []
    for name in survey.run_files:
        if name == CHECKPOINTS_DIR and survey.checkpoint_steps:
            kinds = ", ".join(f"{k} (step {v[-1]})" for k, v in survey.checkpoint_steps.items())
            parts.append(f"checkpoints: {kinds}")
        elif name == METRICS_FILE:
            parts.append(f"{name} (epochs up to {survey.last_metrics_epoch})")
        else:
            parts.append(name)
    return "; ".join(parts)


def warn(message: str) -> None:
    """A warning the user sees on the terminal (and in the absl log).

    In a multi-process run every process reaches the same warnings (they
    share the workdir and the checks); only process 0 prints them, the others
    log them.
    """
    import jax

    logging.warning(message)
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)
