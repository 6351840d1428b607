"""Temporal ensembling (TE), the paper's mitigation of robust overfitting.

A transform of a per-example objective (Dong et al., "Exploring Memorization
in Adversarial Training", ICLR 2022, Sec. 5; the exact formulation of the
authors' released code):

- a soft-label table ``S`` (N x K, zeros at first) lives in the train state;
- from epoch ``ramp_start`` on, for each batch ``p = softmax(f(x))`` on the
  clean inputs with BatchNorm in inference mode, and
  ``S[idx] <- momentum * S[idx] + (1 - momentum) * p``;
- the target is ``q = S[idx] / sum_k S[idx, k]`` (the updated rows);
- the regularizer is ``R = w(t) * mean over batch and classes of
  (softmax(logits) - q)^2`` with ``w(t) = weight * ramp(t)``, ``t`` the 1-based
  epoch, ``ramp(t) = 0`` before ``ramp_start``,
  ``exp(-5 (1 - (t - start) / (end - start))^2)`` up to ``ramp_end``, 1 after;
- ``R`` is added to the training loss and (by default) to the attack
  objective; for TRADES it is on the natural output by default.

The transform reads the table from ``batch["extra"]`` and the step number
from ``batch["step"]`` (both added by the train step) and returns the updated
table in ``aux["extra"]``; it does not edit the objective it wraps.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jax_memat.objectives.losses import ApplyFn, LossFn, Regularizer

SOFT_LABELS = "te_soft_labels"
# make_loss(regularizer=..., attack_regularizer=...) -> LossFn, e.g.
# functools.partial(make_objective, "pgd_at", apply_fn, attack).
LossBuilder = Callable[..., LossFn]


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


def init_soft_labels(num_examples: int, num_classes: int) -> dict:
    """The initial ``TrainState.extra`` entry: an all-zero N x K table."""
    return {SOFT_LABELS: jnp.zeros((num_examples, num_classes), jnp.float32)}


def with_temporal_ensembling(
    make_loss: LossBuilder,
    apply_fn: ApplyFn,
    *,
    steps_per_epoch: int,
    momentum: float = 0.9,
    weight: float = 300.0,
    ramp_start: int = 90,
    ramp_end: int = 150,
    regularize_attack: bool = True,
) -> LossFn:
    """Wraps an objective with temporal ensembling.

    Args:
      make_loss: builds the base objective given ``regularizer`` and
        ``attack_regularizer`` keyword arguments (``make_objective`` does).
      apply_fn: the model function (used in inference mode for ``p``).
      steps_per_epoch: to turn the step into the 1-based epoch.
      momentum: the table's momentum (0.9 in the paper).
      weight: the regularizer's weight after the ramp (300).
      ramp_start: first epoch of table updates and of the ramp (90).
      ramp_end: epoch where the ramp reaches 1 (150).
      regularize_attack: add ``R`` to the attack objective too (the authors do).

    Returns:
      A per-example objective that needs ``batch["extra"][SOFT_LABELS]`` (put
      there by the train step from ``TrainState.extra``, initialised by
      ``init_soft_labels``) and returns the updated table in ``aux["extra"]``.

    Example:
      >>> base = functools.partial(make_objective, "pgd_at", apply_fn, attack)
      >>> loss_fn = with_temporal_ensembling(base, apply_fn, steps_per_epoch=390)
    """
    if not 0 <= momentum < 1:
        raise ValueError(f"TE momentum must be in [0, 1); got {momentum}.")
    if weight < 0:
        raise ValueError(f"TE weight must be >= 0; got {weight}.")
    if not 1 <= ramp_start < ramp_end:
        raise ValueError(f"TE ramp needs 1 <= ramp_start < ramp_end; got {ramp_start}, {ramp_end}.")
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive; got {steps_per_epoch}.")

    def regularizer(logits: jax.Array, batch: dict) -> jax.Array:
        return te_penalty(logits, batch["te_target"], batch["te_weight"])

    reg: Regularizer = regularizer
    inner = make_loss(regularizer=reg, attack_regularizer=reg if regularize_attack else None)

    def te_loss(params, model_state, batch, key):
        if "extra" not in batch or SOFT_LABELS not in batch["extra"]:
            raise ValueError(
                "Temporal ensembling needs the soft-label table in the train state: create "
                "the state with extra=init_soft_labels(num_examples, num_classes)."
            )
        table = batch["extra"][SOFT_LABELS]
        epoch = batch["step"] // steps_per_epoch + 1
        clean_logits, _ = apply_fn({"params": params, **model_state}, batch["image"], False)
        probs = jax.nn.softmax(jax.lax.stop_gradient(clean_logits).astype(jnp.float32), -1)
        updated, targets = update_soft_labels(table, batch["index"], probs, momentum)
        active = epoch >= ramp_start
        table = jnp.where(active, updated, table)
        targets = jnp.where(active, targets, 0.0)
        w = weight * ramp(epoch, ramp_start, ramp_end)
        loss, aux = inner(params, model_state, {**batch, "te_target": targets, "te_weight": w}, key)
        aux = {**aux, "extra": {**batch["extra"], SOFT_LABELS: table}}
        return loss, aux

    return te_loss
