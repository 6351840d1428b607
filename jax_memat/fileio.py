"""Atomic file writes, shared by every layer that writes files.

``atomic_write`` opens a temporary file beside the target and renames it over
the target once it is written whole and flushed to disk, so a reader (or a
crash) never sees half a file, and a failed write leaves the old version.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator

# The process's umask (read once: setting it is the only way to read it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator[io.IOBase]:
    """Opens a temporary file beside ``path``; renames it to ``path`` on success.

    On any exception the temporary file is removed and ``path`` is untouched.
    The data is flushed to disk before the rename, so a crash right after
    leaves either the old or the new file, never a torn one.

    Args:
      path: the file to (re)write.
      mode: ``"w"`` (text) or ``"wb"`` (bytes).

    Example:
      >>> with atomic_write("workdirs/run/report.json") as f:
      ...     json.dump(report, f)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r}; accepted: 'w' or 'wb'.")
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide the file from co-workers
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
