"""Reports that turn a run's records into a JSON summary and figures.

``jax_memat.experiment.analyses.analyze(name, workdir)`` runs them by name
(``python -m jax_memat.analyze`` from the command line); the analyses that
need a checkpoint live there too.

- ``memorization_report``: from the per-epoch evaluation records of the training
  set (``per_example/train_epochNNNN.npz``): each example's learning time
  (first epoch from which it stays robustly fit), its forgetting events, the
  hard examples (default: the 10% with the highest PGD loss at the
  best-robust-accuracy epoch) and their overlap with the corrupted labels;
  writes ``memorization.json``, ``hard_examples.json`` (the list
  ``--config.dataset.exclude_examples`` takes) and ``memorization.png``
  (the PGD-loss distribution over epochs, clean vs corrupted labels and hard
  vs other examples).
"""

from __future__ import annotations

import json
import os

import numpy as np

from jax_memat.analysis.memorization import (
    NEVER_LEARNED,
    forgetting_events,
    hard_examples,
    learning_time,
    load_records,
    write_hard_examples,
)
from jax_memat.analysis.memorization_plots import plot_loss_distributions
from jax_memat.fileio import atomic_write


def _write_json(path: str, obj: dict) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def memorization_report(
    workdir: str, out_dir: str, *, fraction: float = 0.1, epoch: int | None = None
) -> dict:
    """The ``memorization`` analysis (see the module docstring); returns its summary.

    Args:
      workdir: a training workdir with per-epoch evaluation records.
      out_dir: where the JSON, the hard-example list and the PNG go.
      fraction: the share of examples called hard.
      epoch: the epoch to rank them at (default: the best-robust-accuracy epoch).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction!r}.")
    records = load_records(workdir, "eval", "train")
    correct = records["pgd_correct"]
    learned = learning_time(correct, records.epochs)
    forgets = forgetting_events(correct)
    hard = hard_examples(records, epoch=epoch, fraction=fraction)
    corrupted = records.corrupted
    late = records.lr_decay_epochs[0] if records.lr_decay_epochs else None

    def learned_after(mask: np.ndarray) -> float | None:
        if late is None or not mask.any():
            return None
        times = learned[mask]
        return float(np.mean((times > late) | (times == NEVER_LEARNED)))

    hard_mask = np.isin(records.index, hard.index)
    summary = {
        "workdir": os.path.abspath(workdir),
        "epochs": [int(e) for e in records.epochs],
        "best_epoch": records.best_epoch,
        "lr_decay_epochs": list(records.lr_decay_epochs),
        "num_examples": records.num_examples,
        "num_corrupted": int(corrupted.sum()),
        "robustly_fit_at_end": float(np.mean(correct[-1] > 0)),
        "never_learned": int(np.sum(learned == NEVER_LEARNED)),
        "mean_forgetting_events": float(forgets.mean()),
        "hard_examples": {
            "epoch": hard.epoch,
            "quantity": hard.quantity,
            "count": int(hard.index.size),
            **hard.summary,
        },
        # The paper's claim C4: hard and mislabeled examples are fitted late,
        # after the learning-rate decay (or never).
        "learned_after_first_decay_or_never": {
            "hard": learned_after(hard_mask),
            "other": learned_after(~hard_mask),
            "corrupted": learned_after(corrupted),
            "clean": learned_after(~corrupted),
        },
    }
    os.makedirs(out_dir, exist_ok=True)
    write_hard_examples(os.path.join(out_dir, "hard_examples.json"), hard.original_index, hard.meta)
    plot_loss_distributions(
        records,
        os.path.join(out_dir, "memorization.png"),
        hard=hard,
        title=os.path.basename(os.path.abspath(workdir)),
    )
    _write_json(os.path.join(out_dir, "memorization.json"), summary)
    return summary
