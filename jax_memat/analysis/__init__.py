"""Analyses of training: per-example gradients and gradient statistics.

``per_example_grads`` and ``grad_reductions`` transform any ``Objective``
into per-example gradients (each example's loss term in the train step's own
full-batch forward pass, so they average to the step's gradient) or their
reductions; ``GradStats`` records gradient statistics during training as a
probe of the train step, without changing the update; ``plot_gradient_stats``
draws them per epoch. See ``docs/gradients.md``.

Example:
  >>> from jax_memat.analysis import GradStats
  >>> stats = GradStats(every_steps=50, microbatch=16)
  >>> tx = stats.optimizer(tx)
  >>> step = make_train_step(objective, tx, mesh, probe=stats)
"""

from jax_memat.analysis.grad_stats import (
    GradRecorderState,
    GradStats,
    find_recorder_state,
    grad_recorder,
    summarize_epoch,
)
from jax_memat.analysis.gradients import (
    GradReductions,
    grad_reductions,
    noise_scale,
    per_example_grads,
)
from jax_memat.analysis.plots_gradients import GRAD_PLOT_FILE, plot_gradient_stats

__all__ = [
    "GRAD_PLOT_FILE",
    "GradRecorderState",
    "GradReductions",
    "GradStats",
    "find_recorder_state",
    "grad_recorder",
    "grad_reductions",
    "noise_scale",
    "per_example_grads",
    "plot_gradient_stats",
    "summarize_epoch",
]
