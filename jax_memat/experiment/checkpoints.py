"""Orbax checkpoints of a run: the initialization, the latest and the best.

Layout under ``<workdir>/checkpoints``::

    init/<step>/    the state before the first step (analyses compare to it)
    latest/<step>/  the two most recent end-of-epoch states (resume starts here)
    best/<step>/    the state with the highest robust test accuracy so far,
                    ties broken by natural accuracy
    corrupt/        checkpoints found damaged, moved aside (never deleted)

Each checkpoint holds the whole ``TrainState`` (enough to resume bit for bit
and to run any analysis) and a small JSON ``meta`` item (epoch, metrics).

Saves are synchronous: ``save`` returns once the checkpoint is on disk, so a
failed save (disk full) raises at the save that failed, and the state of the
last finished epoch is on disk before the next epoch starts. Orbax writes
into a temporary folder and renames it when complete, so an interrupted save
never replaces a complete checkpoint. After the rename, ``save`` adds a
manifest (``jax_memat_manifest.json``: every file's size and SHA-256) that
``verify`` checks before a restore, so a truncated or missing file is found
and named instead of surfacing as a storage-layer error (or not at all).

Several processes: every process calls ``save`` and ``restore`` (each writes
and reads the shards of its own devices; orbax coordinates them, and its
primary process, 0, writes the metadata). Process 0 alone writes the manifest
and sets damaged checkpoints aside; every process verifies before restoring.
A restore takes the shardings of the target state, so a checkpoint written by
N processes is read by M (any mesh over the same global shapes).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from jax_memat.distributed import barrier, is_main_process
from jax_memat.experiment.errors import CorruptFileError
from jax_memat.experiment.workdir import read_json, warn, write_json

KINDS = ("init", "latest", "best")


class UnreadableCheckpointError(CorruptFileError):
    """A checkpoint whose files are not known to be damaged could not be restored.

    Unlike a checkpoint whose manifest shows damage, it is never set aside or
    skipped: it may be intact but from another version of the train state.
    """


MANIFEST = "jax_memat_manifest.json"
CORRUPT_DIR = "corrupt"
# How many steps each kind keeps: two latest ones, so that a damaged latest
# checkpoint falls back to the epoch before it rather than to the best one.
_KEEP = {"init": 1, "latest": 2, "best": 1}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: str) -> dict[str, str]:
    """Relative path -> absolute path of every file under ``folder`` but the manifest."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder)
            if rel != MANIFEST:
                out[rel] = full
    return out


class RunCheckpoints:
    """The checkpoint managers of one workdir.

    Example:
      >>> ckpts = RunCheckpoints(workdir)
      >>> ckpts.save("latest", state, {"epoch": 3})
      >>> state, meta = ckpts.restore("latest", abstract_state)
    """

    def __init__(self, workdir: str):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self._managers = {kind: self._manager(kind) for kind in KINDS}

    def _manager(self, kind: str) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            os.path.join(self.directory, kind),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=_KEEP[kind],
                create=True,
                enable_async_checkpointing=False,
            ),
        )

    def step_dir(self, kind: str, step: int) -> str:
        return os.path.join(self.directory, kind, str(step))

    def steps(self, kind: str) -> list[int]:
        """The kept steps of ``kind``, oldest first."""
        return sorted(self._managers[kind].all_steps())

    def latest_step(self, kind: str) -> int | None:
        """Step of the newest ``kind`` checkpoint, or ``None`` if there is none."""
        return self._managers[kind].latest_step()

    def save(self, kind: str, state: Any, meta: dict) -> None:
        """Saves ``state`` (and ``meta``) as the ``kind`` checkpoint; returns when on disk.

        A save at a step already kept is skipped when that checkpoint is
        intact (resuming right after a save writes the same state again).
        """
        step = int(jax.device_get(state.step))
        manager = self._managers[kind]
        if step in manager.all_steps():
            if self.verify(kind, step) is None:
                return
            self._set_aside(kind, step, "it was damaged and is being saved again")
            manager = self._managers[kind]
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )
        manager.wait_until_finished()
        if is_main_process():  # the other processes go on: restores accept a missing manifest
            folder = self.step_dir(kind, step)
            manifest = {rel: [os.path.getsize(p), _sha256(p)] for rel, p in _files(folder).items()}
            write_json(os.path.join(folder, MANIFEST), {"files": manifest})

    def verify(self, kind: str, step: int) -> str | None:
        """Checks a checkpoint's files against its manifest.

        Returns:
          None when every file is there with its recorded size and hash (or
          the checkpoint predates manifests), else what is wrong, naming the
          file.
        """
        folder = self.step_dir(kind, step)
        path = os.path.join(folder, MANIFEST)
        if not os.path.isdir(folder):
            return f"{folder} is missing"
        if not os.path.exists(path):
            return None  # written by an older version or killed before the manifest: unverified
        try:
            manifest = read_json(path)["files"]
        except (CorruptFileError, KeyError, TypeError):
            return f"{path} is damaged"
        for rel, (size, digest) in sorted(manifest.items()):
            full = os.path.join(folder, rel)
            if not os.path.exists(full):
                return f"{full} is missing"
            actual = os.path.getsize(full)
            if actual != size:
                return f"{full} has {actual} bytes, {size} were written (truncated?)"
            if _sha256(full) != digest:
                return f"{full} has changed since it was written"
        return None

    def restore(self, kind: str, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores the ``kind`` checkpoint into the structure and shardings of ``target``.

        Args:
          kind: one of ``"init"``, ``"latest"``, ``"best"``.
          target: a state (or its ``jax.ShapeDtypeStruct`` tree) giving structure,
            dtypes and shardings.
          step: which step; default the newest.

        Raises:
          FileNotFoundError: there is no such checkpoint.
          CorruptFileError: the checkpoint is damaged; the message names the file.
        """
        manager = self._managers[kind]
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No {kind!r} checkpoint under {self.directory}.")
        problem = self.verify(kind, step)
        if problem:
            raise CorruptFileError(f"The {kind} checkpoint (step {step}) is damaged: {problem}.")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as err:  # orbax/tensorstore raise many types; all mean "unreadable"
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            verified = os.path.exists(os.path.join(self.step_dir(kind, step), MANIFEST))
            raise UnreadableCheckpointError(
                f"The {kind} checkpoint {self.step_dir(kind, step)} could not be restored into "
                f"this run's train state ({type(err).__name__}: {message[:300]}). "
                + (
                    "Its files match their manifest, so it is intact: it was written by a "
                    "version of jax_memat with another train state; use that version."
                    if verified
                    else "It has no manifest (written by an older version, or its save was "
                    "cut short): it may be damaged, or from a version with another train state."
                )
                + " It was left in place."
            ) from None
        meta = dict(restored["meta"] or {})
        if "epoch" not in meta:
            raise CorruptFileError(
                f"The {kind} checkpoint {self.step_dir(kind, step)} has no meta."
            )
        return restored["state"], meta

    def restore_newest(self, target: Any) -> tuple[str, Any, dict] | None:
        """Restores the newest intact checkpoint, setting damaged ones aside.

        Candidates, newest step first (at equal steps ``latest`` before
        ``best`` before ``init``): every kept step of every kind. One whose
        files do not match their manifest is moved to ``checkpoints/corrupt/``
        (never deleted) with a warning naming what was wrong, and the next is
        tried. One that fails to restore while its files are not known to be
        damaged stops the search (``UnreadableCheckpointError``): it may be
        intact but from another version, and resuming from an older one would
        silently redo work.

        Returns:
          ``(kind, state, meta)``, or None when no checkpoint is kept.

        Raises:
          CorruptFileError: checkpoints exist but none is intact.
        """
        order = {k: i for i, k in enumerate(("latest", "best", "init"))}
        candidates = sorted(
            ((step, kind) for kind in KINDS for step in self.steps(kind)),
            key=lambda sk: (-sk[0], order[sk[1]]),
        )
        skipped = []
        for step, kind in candidates:
            try:
                state, meta = self.restore(kind, target, step)
            except UnreadableCheckpointError:
                raise  # not known to be damaged: never skipped for an older one
            except CorruptFileError as err:
                skipped.append(str(err))
                self._set_aside(kind, step, str(err))
                continue
            if skipped:
                warn(f"Resuming from the {kind} checkpoint of epoch {meta['epoch']} instead.")
            return kind, state, meta
        if skipped:
            raise CorruptFileError(
                "No intact checkpoint is left to resume from:\n  " + "\n  ".join(skipped)
            )
        return None

    def _set_aside(self, kind: str, step: int, reason: str) -> None:
        # Every process finds the same damage (they read the same files); process 0
        # moves it, and the others wait for the move before they list the steps again.
        if is_main_process():
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            dest = os.path.join(self.directory, CORRUPT_DIR, f"{kind}-{step}-{stamp}")
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.move(self.step_dir(kind, step), dest)
            warn(f"{reason} Moved it to {dest} (kept, not deleted).")
        barrier(f"jax_memat_set_aside_{kind}_{step}")
        self._managers[kind].close()
        self._managers[kind] = self._manager(kind)

    def meta(self, kind: str) -> dict | None:
        """The JSON ``meta`` of the newest ``kind`` checkpoint without loading arrays."""
        manager = self._managers[kind]
        step = manager.latest_step()
        if step is None:
            return None
        restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def close(self) -> None:
        """Releases the managers (every save has already finished)."""
        for manager in self._managers.values():
            manager.close()
