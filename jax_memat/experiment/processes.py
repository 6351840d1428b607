"""Checks that every process of a multi-process run passes or fails together.

In a run over several processes (``jax_memat.distributed``), a check that
fails in one process (process 0 finds the workdir locked, a host lacks
memory or the dataset) must stop all of them, with the same message and exit
code, before any of them reaches a collective the failed one would never
join (the others would wait on it until the runtime's heartbeat timeout).
``together`` runs a check, then every process shares its verdict, and a
failure anywhere raises everywhere. In one process it just runs the check.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TypeVar

from jax_memat.distributed import all_gather_bytes, is_main_process
from jax_memat.experiment.errors import OtherProcessError

T = TypeVar("T")


def together(check: Callable[[], T], *, main_only: bool = False) -> T | None:
    """Runs ``check`` and stops every process if it failed in any.

    A collective in a multi-process run: every process calls it, in the same
    order.

    Args:
      check: the work (reads, checks, or process 0's writes).
      main_only: run ``check`` in process 0 only (e.g. taking the workdir's
        lock, writing the config); the others wait for its verdict.

    Returns:
      ``check()``'s result where it ran, None where it did not.

    Raises:
      The failed check's exception in the process where it failed, and
      ``OtherProcessError`` (with that process's message and exit code) in
      the others.

    Example:
      >>> plan = together(lambda: plan_workdir(config, workdir))
      >>> together(lock.acquire, main_only=True)
    """
    import jax

    result, error = None, None
    if not main_only or is_main_process():
        if jax.process_count() == 1:
            return check()
        try:
            result = check()
        except (Exception, KeyboardInterrupt) as err:
            error = err
    verdict = b""
    if error is not None:
        from jax_memat.experiment.errors import exit_code

        verdict = json.dumps(
            {"code": exit_code(error) or 1, "message": (str(error) or type(error).__name__)[:8000]}
        ).encode()
    verdicts = all_gather_bytes(verdict)
    if error is not None:
        raise error
    for process, v in enumerate(verdicts):
        if v:
            failed = json.loads(v.decode(errors="replace"))
            raise OtherProcessError(process, failed["code"], failed["message"])
    return result
