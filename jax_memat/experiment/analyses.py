"""The analyses of a run's workdir, by name: what ``python -m jax_memat.analyze`` runs.

``analyze(name, workdir, checkpoint=None, **options)`` checks its arguments,
the workdir and the checkpoint before anything is built or compiled, runs one
analysis and writes its JSON and PNG outputs under ``<workdir>/analysis/``
(or ``out_dir``). The analysis functions themselves live in
``jax_memat.analysis`` and work on records or on a live train state; this
module adds what needs a run's workdir (its config, labels, checkpoints).

Analyses:

- ``memorization``: per-example records over epochs -> learning times,
  forgetting events, hard examples and their overlap with corrupted labels
  (``jax_memat.analysis.reports.memorization_report``). It reads records of
  every epoch, so it takes no checkpoint.
- ``gradients``: the per-example gradients of the run's own training
  objective at one checkpoint (default ``best``) over the first
  ``num_examples`` training examples with their trained-on labels:
  ``gradients.json`` (distributions of ``||g_i||``, ``cos(g_i, mean)`` and the
  loss, overall and for clean vs corrupted labels; gradient variance and
  noise scale), ``gradients.npz`` (the per-example arrays) and
  ``gradients.png``; with the per-step statistics a run recorded
  (``grad_stats.every_steps``), also ``gradient_stats.png`` over epochs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax
import numpy as np

from jax_memat.analysis.gradient_snapshot import (
    gradient_snapshot,
    plot_gradient_snapshot,
    save_snapshot,
    summarize_snapshot,
)
from jax_memat.analysis.reports import memorization_report
from jax_memat.experiment.checkpoints import RunCheckpoints
from jax_memat.experiment.setup import load_run, resolve_checkpoint
from jax_memat.experiment.workdir import CONFIG_FILE, LABELS_FILE, read_json
from jax_memat.fileio import atomic_write

OUTPUT_DIR = "analysis"
CHECKPOINT_KINDS = ("best", "final", "latest", "init")


def _write_json(path: str, obj: dict) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def parse_checkpoint(checkpoint: str | int | None) -> str | int | None:
    """``"best"``, ``"final"``, ``"latest"``, ``"init"``, a step number (as int or digits) or None.

    Raises:
      ValueError: anything else (the message lists what is accepted).
    """
    if checkpoint is None or checkpoint in CHECKPOINT_KINDS:
        return checkpoint
    if isinstance(checkpoint, int) and not isinstance(checkpoint, bool) and checkpoint >= 0:
        return checkpoint
    if isinstance(checkpoint, str) and checkpoint.isdigit():
        return int(checkpoint)
    raise ValueError(
        f"checkpoint={checkpoint!r} is not accepted; use {', '.join(CHECKPOINT_KINDS)} or the "
        "step number of a kept checkpoint."
    )


def _check_checkpoint_exists(workdir: str, checkpoint: str | int) -> None:
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"{workdir} has no checkpoints/ folder: no checkpoint to analyse.")
    ckpts = RunCheckpoints(workdir)
    try:
        resolve_checkpoint(ckpts, workdir, {"final": "latest"}.get(checkpoint, checkpoint))
    finally:
        ckpts.close()


def gradients_report(
    workdir: str,
    out_dir: str,
    *,
    checkpoint: str | int | None = None,
    num_examples: int | None = None,
    microbatch: int | None = None,
    seed: int = 0,
) -> dict:
    """The ``gradients`` analysis (see the module docstring); returns its summary.

    Args:
      workdir: a training workdir with checkpoints.
      out_dir: where ``gradients.json``, ``gradients.npz`` and the PNGs go.
      checkpoint: ``best`` (default), ``final``/``latest``, ``init`` or a step.
      num_examples: the first training examples analysed, a multiple of the
        run's batch size (default: 4 batches, at most the training set).
      microbatch: per-example gradients computed at once (memory only).
      seed: the attack's randomness.
    """
    config = read_json(os.path.join(workdir, CONFIG_FILE))
    batch_size = config["batch_size"]
    if num_examples is not None and (
        isinstance(num_examples, bool)
        or not isinstance(num_examples, int)
        or num_examples < batch_size
        or num_examples % batch_size
    ):
        raise ValueError(
            f"num_examples must be a multiple of the run's batch_size={batch_size} (whole "
            f"training batches, so BatchNorm sees batches as in training); got {num_examples!r}."
        )
    if microbatch is not None and (
        isinstance(microbatch, bool) or not isinstance(microbatch, int) or microbatch < 1
    ):
        raise ValueError(f"microbatch must be a positive integer or None; got {microbatch!r}.")
    checkpoint = parse_checkpoint(checkpoint) or "best"
    _check_checkpoint_exists(workdir, checkpoint)
    labels_path = os.path.join(workdir, LABELS_FILE)
    saved_labels = None
    if os.path.exists(labels_path):
        with np.load(labels_path) as f:
            saved_labels = {k: f[k] for k in ("labels", "changed") if k in f.files}

    def whole_batches(rows: int) -> int:
        total = rows - rows % batch_size
        n = num_examples if num_examples is not None else min(4 * batch_size, total)
        if n > total:
            raise ValueError(
                f"num_examples={n} exceeds the {total} training examples in whole batches of "
                f"{batch_size}."
            )
        return n

    if saved_labels and "labels" in saved_labels:
        whole_batches(saved_labels["labels"].size)  # checked before anything is built
    run = load_run(workdir, checkpoint)
    n = whole_batches(run.train.num_examples)
    snapshot = gradient_snapshot(
        run.setup.objective,
        run.state,
        run.train.images,
        run.train.labels,
        mesh=run.mesh,
        batch_size=batch_size,
        key=jax.random.key(seed),
        num_examples=n,
        epoch=run.meta.get("epoch"),
        microbatch=microbatch,
    )
    corrupted = (saved_labels or {}).get("changed")
    summary = {
        "workdir": os.path.abspath(workdir),
        "checkpoint": checkpoint,
        "epoch": run.meta.get("epoch"),
        "step": int(run.state.step),
        "objective": config["objective"]["name"],
        "batch_size": batch_size,
        "seed": seed,
        **summarize_snapshot(snapshot, corrupted),
    }
    os.makedirs(out_dir, exist_ok=True)
    save_snapshot(os.path.join(out_dir, "gradients.npz"), snapshot)
    name = os.path.basename(os.path.abspath(workdir))
    plot_gradient_snapshot(
        snapshot,
        os.path.join(out_dir, "gradients.png"),
        corrupted=corrupted,
        title=f"{name}: per-example gradients at the {checkpoint} checkpoint "
        f"(epoch {run.meta.get('epoch')}, {n} training examples)",
    )
    _draw_recorded_stats(workdir, out_dir, name)
    _write_json(os.path.join(out_dir, "gradients.json"), summary)
    return summary


def _draw_recorded_stats(workdir: str, out_dir: str, name: str) -> None:
    """``gradient_stats.png`` from the run's per-epoch rows, when it recorded any."""
    from jax_memat.analysis import plot_gradient_stats
    from jax_memat.experiment.metrics import read_metrics

    rows = [r for r in read_metrics(workdir) if r.get("grad_norm") is not None]
    if rows:
        plot_gradient_stats(rows, os.path.join(out_dir, "gradient_stats.png"), title=name)


def _memorization(workdir: str, out_dir: str, *, checkpoint=None, **options) -> dict:
    if checkpoint is not None:
        raise ValueError(
            "The memorization analysis reads the per-example records of every epoch and takes "
            f"no checkpoint (got checkpoint={checkpoint!r}); analyses that take one: gradients."
        )
    return memorization_report(workdir, out_dir, **options)


ANALYSES: dict[str, Callable[..., dict]] = {
    "gradients": gradients_report,
    "memorization": _memorization,
}


def analyze(
    name: str,
    workdir: str,
    out_dir: str | None = None,
    *,
    checkpoint: str | int | None = None,
    **options,
) -> dict:
    """Runs the analysis ``name`` on ``workdir``; outputs go to ``out_dir``.

    Args:
      name: one of ``ANALYSES`` (``gradients``, ``memorization``).
      workdir: a training workdir.
      out_dir: default ``<workdir>/analysis``.
      checkpoint: for analyses of one state (``gradients``): ``best``
        (default), ``final``/``latest``, ``init`` or a kept step.
      **options: the analysis's own options (``fraction``, ``epoch`` for
        memorization; ``num_examples``, ``microbatch``, ``seed`` for gradients).

    Raises:
      ValueError: unknown analysis, bad option or checkpoint name (names what
        is accepted).
      FileNotFoundError: no run in ``workdir``, no such checkpoint, or nothing
        recorded that the analysis needs (names the config field that records it).

    Example:
      >>> summary = analyze("gradients", "workdirs/quickstart", checkpoint="final")
      >>> summary["clean"]["grad_norm"]["median"], summary["corrupted"]["grad_norm"]["median"]
    """
    if name not in ANALYSES:
        raise ValueError(f"Unknown analysis {name!r}; accepted: {', '.join(sorted(ANALYSES))}.")
    checkpoint = parse_checkpoint(checkpoint)
    if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
        raise FileNotFoundError(f"{workdir} holds no training run (config.json is missing).")
    out_dir = out_dir or os.path.join(workdir, OUTPUT_DIR)
    return ANALYSES[name](workdir, out_dir, checkpoint=checkpoint, **options)
