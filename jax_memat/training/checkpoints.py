"""Orbax checkpoints of a run: the initialization, the latest and the best.

Layout under ``<workdir>/checkpoints``::

    init/<step>/    the state before the first step (analyses compare to it)
    latest/<step>/  the most recent end-of-epoch state (resume starts here)
    best/<step>/    the state with the highest robust test accuracy so far,
                    ties broken by natural accuracy

Each checkpoint holds the whole ``TrainState`` (enough to resume bit for bit
and to run any analysis) and a small JSON ``meta`` item (epoch, metrics).
Saves are asynchronous: the device-to-host copy happens at ``save`` time, the
write in the background; an interrupted write never replaces a complete one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

KINDS = ("init", "latest", "best")


class RunCheckpoints:
    """The three checkpoint managers of one workdir.

    Example:
      >>> ckpts = RunCheckpoints(workdir)
      >>> ckpts.save("latest", state, {"epoch": 3})
      >>> state, meta = ckpts.restore("latest", abstract_state)
    """

    def __init__(self, workdir: str, *, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self._managers = {
            kind: ocp.CheckpointManager(
                os.path.join(self.directory, kind),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=1,
                    create=True,
                    enable_async_checkpointing=async_save,
                ),
            )
            for kind in KINDS
        }

    def latest_step(self, kind: str) -> int | None:
        """Step of the saved ``kind`` checkpoint, or ``None`` if there is none."""
        return self._managers[kind].latest_step()

    def save(self, kind: str, state: Any, meta: dict) -> None:
        """Saves ``state`` (and ``meta``) as the ``kind`` checkpoint, replacing the old one."""
        step = int(jax.device_get(state.step))
        manager = self._managers[kind]
        if manager.latest_step() == step:
            return  # Already saved at this step (e.g. resuming right after a save).
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )

    def restore(self, kind: str, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores the ``kind`` checkpoint into the structure and shardings of ``target``.

        Args:
          kind: one of ``"init"``, ``"latest"``, ``"best"``.
          target: a state (or its ``jax.ShapeDtypeStruct`` tree) giving structure,
            dtypes and shardings.
          step: which step; default the saved one.
        """
        manager = self._managers[kind]
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No {kind!r} checkpoint under {self.directory}.")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["meta"])

    def meta(self, kind: str) -> dict | None:
        """The JSON ``meta`` of the ``kind`` checkpoint without loading arrays."""
        manager = self._managers[kind]
        step = manager.latest_step()
        if step is None:
            return None
        restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def wait(self) -> None:
        """Blocks until every pending asynchronous save is on disk."""
        for manager in self._managers.values():
            manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the managers."""
        for manager in self._managers.values():
            manager.wait_until_finished()
            manager.close()
