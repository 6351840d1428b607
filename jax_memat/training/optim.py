"""Optimizers and learning-rate schedules by name.

SGD follows PyTorch's ``torch.optim.SGD`` (the authors' optimizer): weight decay
is added to the gradient (``g + wd * w``, on every parameter, BatchNorm and
biases included) before the momentum buffer, and the buffer starts at the first
gradient. Schedules change the rate at epoch boundaries, like the authors'
per-epoch ``adjust_learning_rate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import optax

OPTIMIZER_NAMES = ("sgd",)
SCHEDULE_NAMES = ("constant", "step", "multistep", "cosine")


def make_schedule(
    name: str,
    learning_rate: float,
    *,
    steps_per_epoch: int,
    epochs: int,
    milestones: Sequence[int] = (),
    step_every: int = 100,
    gamma: float = 0.1,
) -> optax.Schedule:
    """Learning rate as a function of the (0-based) step.

    Args:
      name: ``"constant"``; ``"step"`` (x ``gamma`` every ``step_every`` epochs,
        the random-label study's schedule); ``"multistep"`` (x ``gamma`` at each
        epoch in ``milestones``, e.g. ``(100, 150)`` in the TE study);
        ``"cosine"`` (cosine decay to 0 over ``epochs``, per step).
      learning_rate: the initial rate.
      steps_per_epoch: optimizer steps in one epoch.
      epochs: length of the run, in epochs.
      milestones: epochs (0-based boundaries: the rate drops *before* the first
        step of epoch ``m``, i.e. after ``m`` completed epochs) for ``multistep``.
      step_every: period in epochs for ``step``.
      gamma: decay factor for ``step`` and ``multistep``.

    Example:
      >>> sched = make_schedule("multistep", 0.1, steps_per_epoch=390, epochs=200,
      ...                       milestones=(100, 150))
      >>> float(sched(100 * 390))
      0.01...
    """
    if name not in SCHEDULE_NAMES:
        raise ValueError(
            f"Unknown schedule {name!r}; accepted schedules: {', '.join(SCHEDULE_NAMES)}."
        )
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0; got {learning_rate}.")
    if steps_per_epoch <= 0 or epochs <= 0:
        raise ValueError("steps_per_epoch and epochs must be positive.")
    if name == "constant":
        return optax.constant_schedule(learning_rate)
    if name == "cosine":
        return optax.cosine_decay_schedule(learning_rate, decay_steps=epochs * steps_per_epoch)
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1]; got {gamma}.")
    if name == "step":
        if step_every <= 0:
            raise ValueError(f"step_every must be a positive number of epochs; got {step_every}.")
        boundaries = range(step_every, epochs, step_every)
    else:
        boundaries = sorted(int(m) for m in milestones)
        if any(m <= 0 for m in boundaries):
            raise ValueError(f"milestones must be positive epochs; got {tuple(milestones)}.")
    return optax.piecewise_constant_schedule(
        learning_rate, {int(m) * steps_per_epoch: gamma for m in boundaries}
    )


def make_optimizer(
    name: str,
    learning_rate: float | optax.Schedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """An optax optimizer by name (PyTorch SGD semantics, see module docstring).

    Example:
      >>> tx = make_optimizer("sgd", 0.1, momentum=0.9, weight_decay=5e-4)
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(
            f"Unknown optimizer {name!r}; accepted optimizers: {', '.join(OPTIMIZER_NAMES)}."
        )
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1); got {momentum}.")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0; got {weight_decay}.")
    return optax.chain(
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov),
    )
