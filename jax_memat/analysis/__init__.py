"""Analyses of training runs: memorization records, hard examples, per-example gradients.

- ``load_records`` reads a run's per-example files into ``[epoch, example]``
  arrays; ``learning_time``, ``forgetting_events`` and ``hard_examples`` are
  derived from them; ``write_hard_examples`` saves a list of examples that a
  new run leaves out (``--config.dataset.exclude_examples``). See
  docs/memorization.md.
- ``per_example_grads`` and ``grad_reductions`` transform any ``Objective``
  into per-example gradients (each example's loss term in the train step's
  own full-batch forward pass, so they average to the step's gradient) or
  their reductions; ``GradStats`` records gradient statistics as a probe of
  the train step without changing the update; ``gradient_snapshot`` takes
  them over many examples at one train state (live or restored).
- ``python -m jax_memat.analyze`` (``jax_memat.experiment.analyses.analyze``)
  runs the ``memorization`` and ``gradients`` analyses on a workdir.

Example:
  >>> from jax_memat.analysis import hard_examples, load_records, write_hard_examples
  >>> records = load_records("workdirs/run", "eval", "train")
  >>> hard = hard_examples(records, fraction=0.1)
  >>> write_hard_examples("hard.json", hard.original_index, hard.meta)
"""

from jax_memat.analysis.grad_stats import (
    GradRecorderState,
    GradStats,
    find_recorder_state,
    grad_recorder,
    summarize_epoch,
)
from jax_memat.analysis.gradient_snapshot import (
    gradient_snapshot,
    plot_gradient_snapshot,
    summarize_snapshot,
)
from jax_memat.analysis.gradients import (
    GradReductions,
    grad_reductions,
    noise_scale,
    per_example_grads,
)
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
from jax_memat.analysis.plots_gradients import GRAD_PLOT_FILE, plot_gradient_stats

__all__ = [
    "GRAD_PLOT_FILE",
    "NEVER_LEARNED",
    "GradRecorderState",
    "GradReductions",
    "GradStats",
    "HardExampleList",
    "HardExamples",
    "MemorizationRecords",
    "best_epoch",
    "corruption_overlap",
    "find_recorder_state",
    "forgetting_events",
    "grad_recorder",
    "grad_reductions",
    "gradient_snapshot",
    "group_quantiles",
    "hard_examples",
    "learning_time",
    "load_records",
    "lr_decay_epochs",
    "noise_scale",
    "per_example_grads",
    "plot_gradient_snapshot",
    "plot_gradient_stats",
    "plot_loss_distributions",
    "read_hard_examples",
    "summarize_epoch",
    "summarize_snapshot",
    "write_hard_examples",
]
