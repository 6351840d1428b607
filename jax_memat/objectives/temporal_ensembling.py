"""Temporal ensembling (TE), the paper's mitigation of robust overfitting.

A transform of any ``Objective`` (Dong et al., "Exploring Memorization in
Adversarial Training", ICLR 2022, Sec. 5; the exact formulation of the
authors' released code):

- a soft-label table ``S`` (N x K, zeros at first) is the transform's own
  state, ``state["temporal_ensembling"]["soft_labels"]``;
- from epoch ``ramp_start`` on, for each batch ``p = softmax(f(x))`` on the
  clean inputs with BatchNorm in inference mode, and
  ``S[idx] <- momentum * S[idx] + (1 - momentum) * p``;
- the target is ``q = S[idx] / sum_k S[idx, k]`` (the updated rows);
- the regularizer is ``R = w(t) * mean over batch and classes of
  (softmax(logits) - q)^2`` with ``w(t) = weight * ramp(t)``, ``t`` the 1-based
  epoch (``StepInfo.epoch``), ``ramp(t) = 0`` before ``ramp_start``,
  ``exp(-5 (1 - (t - start) / (end - start))^2)`` up to ``ramp_end``, 1 after;
- ``R`` is handed to the wrapped objective as a ``Regularizer``: added to the
  training loss and (by default) to the attack objective; for TRADES it is on
  the natural output by default.

The transform never edits the objective it wraps and keeps nothing in the batch.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from jax_memat.objectives.base import (
    INNER,
    REGULARIZER_OUTPUTS,
    ApplyFn,
    Objective,
    Regularizer,
    transform_state,
)

NAME = "temporal_ensembling"
SOFT_LABELS = "soft_labels"


def ramp(epoch: jax.Array | float, start: float, end: float) -> jax.Array:
    """The sigmoid-shaped ramp-up of the TE weight at 1-based ``epoch``.

    Example:
      >>> float(ramp(150, 90, 150)), float(ramp(89, 90, 150))
      (1.0, 0.0)
    """
    epoch = jnp.asarray(epoch, jnp.float32)
    phase = jnp.clip((epoch - start) / (end - start), 0.0, 1.0)
    return jnp.where(epoch < start, 0.0, jnp.exp(-5.0 * (1.0 - phase) ** 2))


def te_penalty(logits: jax.Array, target: jax.Array, weight: jax.Array | float) -> jax.Array:
    """Per-example ``weight * mean_k (softmax(logits) - target)^2`` (its batch mean is R)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return weight * jnp.mean(jnp.square(probs - target), axis=-1)


def update_soft_labels(
    table: jax.Array, indices: jax.Array, probs: jax.Array, momentum: float
) -> tuple[jax.Array, jax.Array]:
    """Moves the rows ``indices`` of ``table`` towards ``probs``; returns (table, targets).

    Only the batch's rows change. Targets are the updated rows normalized to
    sum to one (zero rows, impossible once updated, give zero targets).
    """
    rows = momentum * table[indices] + (1.0 - momentum) * probs
    table = table.at[indices].set(rows)
    total = jnp.sum(rows, axis=-1, keepdims=True)
    targets = jnp.where(total > 0, rows / jnp.where(total > 0, total, 1.0), 0.0)
    return table, targets


def te_problems(
    momentum: object, weight: object, ramp_start: object, ramp_end: object
) -> list[str]:
    """What is wrong with TE's settings (``[]`` when nothing): the one rule for them.

    Used by ``with_temporal_ensembling`` and by config validation (with the
    ``te.`` prefix): ``momentum`` in [0, 1), ``weight`` finite and >= 0, and
    epochs ``1 <= ramp_start < ramp_end``.
    """

    def number(x):
        return not isinstance(x, bool) and isinstance(x, numbers.Real) and math.isfinite(x)

    def integer(x):
        return not isinstance(x, bool) and isinstance(x, numbers.Integral)

    problems = []
    if not (number(momentum) and 0 <= momentum < 1):
        problems.append(f"momentum must be a number in [0, 1), got {momentum!r}")
    if not (number(weight) and weight >= 0):
        problems.append(f"weight must be a finite number >= 0, got {weight!r}")
    if not (integer(ramp_start) and integer(ramp_end) and 1 <= ramp_start < ramp_end):
        problems.append(
            f"ramp_start and ramp_end must be epochs with 1 <= ramp_start < ramp_end, got "
            f"{ramp_start!r} and {ramp_end!r}"
        )
    return problems


def init_soft_labels(num_examples: int, num_classes: int) -> jax.Array:
    """The initial soft-label table: all zeros, N x K float32."""
    return jnp.zeros((num_examples, num_classes), jnp.float32)


def with_temporal_ensembling(
    objective: Objective,
    apply_fn: ApplyFn,
    *,
    momentum: float = 0.9,
    weight: float = 300.0,
    ramp_start: int = 90,
    ramp_end: int = 150,
    regularize_attack: bool = True,
    output: str = "natural",
) -> Objective:
    """Wraps an objective with temporal ensembling (a transform ``Objective -> Objective``).

    Args:
      objective: the objective to wrap (``make_objective(...)``, or another
        transform's output).
      apply_fn: the model function (used in inference mode for ``p``).
      momentum: the table's momentum (0.9 in the paper).
      weight: the regularizer's weight after the ramp (300).
      ramp_start: first epoch of table updates and of the ramp (90).
      ramp_end: epoch where the ramp reaches 1 (150).
      regularize_attack: add ``R`` to the attack objective too (the authors do).
      output: for TRADES, the logits ``R`` is computed on in the training
        loss: ``"natural"`` (the authors' code) or ``"adversarial"``.

    Returns:
      An ``Objective`` whose state is ``{"temporal_ensembling": {"soft_labels":
      N x K}, "inner": <the wrapped objective's state>}``. It needs the epoch:
      build the train step with ``steps_per_epoch``.

    Example:
      >>> base = make_objective("pgd_at", apply_fn, attack)
      >>> objective = with_temporal_ensembling(base, apply_fn)
      >>> state = objective.init(50_000, 10)
    """
    problems = te_problems(momentum, weight, ramp_start, ramp_end)
    if problems:
        raise ValueError("Temporal ensembling: " + "; ".join(problems) + ".")
    if output not in REGULARIZER_OUTPUTS:
        raise ValueError(f"output={output!r} is not accepted; use one of {REGULARIZER_OUTPUTS}.")

    def init(num_examples: int, num_classes: int) -> dict:
        own = {SOFT_LABELS: init_soft_labels(num_examples, num_classes)}
        return transform_state(NAME, own, objective.init(num_examples, num_classes))

    def loss(params, model_state, state, batch, info):
        if not isinstance(state, dict) or NAME not in state:
            raise ValueError(
                "Temporal ensembling needs its state: create the train state with "
                "objective_state=objective.init(num_examples, num_classes)."
            )
        if info.epoch is None:
            raise ValueError(
                "Temporal ensembling needs the epoch: build the train step with "
                "make_train_step(..., steps_per_epoch=N)."
            )
        table = state[NAME][SOFT_LABELS]
        epoch = info.epoch
        clean_logits, _ = apply_fn({"params": params, **model_state}, batch["image"], False)
        probs = jax.nn.softmax(jax.lax.stop_gradient(clean_logits).astype(jnp.float32), -1)
        updated, targets = update_soft_labels(table, batch["index"], probs, momentum)
        active = epoch >= ramp_start
        table = jnp.where(active, updated, table)
        targets = jnp.where(active, targets, 0.0)
        w = weight * ramp(epoch, ramp_start, ramp_end)
        regularizer = Regularizer(
            lambda logits: te_penalty(logits, targets, w), attack=regularize_attack, output=output
        )
        per_example_loss, aux = objective.loss(
            params, model_state, state[INNER], batch, info.with_regularizer(regularizer)
        )
        new_state = transform_state(NAME, {SOFT_LABELS: table}, aux.objective_state)
        return per_example_loss, aux._replace(objective_state=new_state)

    return Objective(init, loss)
