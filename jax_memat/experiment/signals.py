"""Stopping a run cleanly on SIGINT and SIGTERM.

``StopSignals`` turns the first SIGINT or SIGTERM into a ``RunInterrupted``
exception raised in the main thread, except inside ``critical()`` sections
(a checkpoint save, a metrics write), where it is held until the section
ends: a signal can stop a run between two steps or between two files, never
half-way through writing one. A second signal while one is held is held too
(it is not lost: the run stops as soon as the write is done).

Installed by the command-line entry points; the library functions run
without it (a notebook keeps its own Ctrl-C handling), and outside the main
thread it does nothing.

Several processes (``together=True``): a process that stops alone would leave
the others waiting in the next collective. There a signal is only recorded,
and the processes compare what they recorded at points every one of them
reaches after the same step (``check``, called by the loop at each logging
interval): if any process got a signal, all stop there, with its number.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from jax_memat.distributed import all_gather_bytes
from jax_memat.experiment.errors import RunInterrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager: SIGINT/SIGTERM raise ``RunInterrupted`` at a safe point.

    Example:
      >>> guard = StopSignals()
      >>> with guard:
      ...     for epoch in epochs:
      ...         train_one_epoch()
      ...         with guard.critical():
      ...             save_checkpoint()
    """

    def __init__(self, enabled: bool = True, *, together: bool = False):
        # enabled: install the handlers (else the guard does nothing); together:
        # several processes, so record signals and stop at ``check``.
        self.enabled = enabled
        self.together = together
        self._depth = 0
        self._pending: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        del frame
        if self._depth > 0 or self.together:
            if self._pending is None:
                self._pending = signum
            return
        raise RunInterrupted(signum)

    def __enter__(self) -> StopSignals:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A section that a signal does not interrupt; a held signal is raised at its end."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0 and self._pending is not None and not self.together:
            signum, self._pending = self._pending, None
            raise RunInterrupted(signum)

    def check(self) -> None:
        """With ``together``: every process stops here if any of them got a signal.

        A collective (every process calls it at the same points); a no-op in
        one process, where a signal stops the run as soon as it is safe.

        Raises:
          RunInterrupted: some process recorded a signal (the lowest process's).
        """
        if not (self.enabled and self.together):
            return
        mine = b"" if self._pending is None else str(self._pending).encode()
        # A signal number has at most 3 digits: an 8-byte buffer, not the 64 KiB
        # default, crosses the network at every logging interval.
        received = [int(v) for v in all_gather_bytes(mine, max_bytes=8) if v]
        if received:
            self._pending = None
            raise RunInterrupted(received[0])
