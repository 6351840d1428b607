"""Analyses of trained runs: per-example memorization records and hard examples.

``load_records`` reads a run's per-example files into ``[epoch, example]``
arrays; ``learning_time``, ``forgetting_events`` and ``hard_examples`` are
derived from them; ``write_hard_examples`` saves a list of examples that a new
run leaves out (``--config.dataset.exclude_examples``). See docs/memorization.md.

Example:
  >>> from jax_memat.analysis import hard_examples, load_records, write_hard_examples
  >>> records = load_records("workdirs/run", "eval", "train")
  >>> hard = hard_examples(records, fraction=0.1)
  >>> write_hard_examples("hard.json", hard.original_index, hard.meta)
"""

from jax_memat.analysis.memorization import (
    NEVER_LEARNED,
    HardExampleList,
    HardExamples,
    MemorizationRecords,
    best_epoch,
    corruption_overlap,
    forgetting_events,
    hard_examples,
    learning_time,
    load_records,
    lr_decay_epochs,
    read_hard_examples,
    write_hard_examples,
)
from jax_memat.analysis.memorization_plots import group_quantiles, plot_loss_distributions

__all__ = [
    "NEVER_LEARNED",
    "HardExampleList",
    "HardExamples",
    "MemorizationRecords",
    "best_epoch",
    "corruption_overlap",
    "forgetting_events",
    "group_quantiles",
    "hard_examples",
    "learning_time",
    "load_records",
    "lr_decay_epochs",
    "plot_loss_distributions",
    "read_hard_examples",
    "write_hard_examples",
]
