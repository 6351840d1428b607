"""Soft targets for chosen training examples: a transform of any objective.

The hard-example experiment of Dong et al., "Exploring Memorization in
Adversarial Training" (ICLR 2022, Sec. 4, claim C4) asks how robust
overfitting changes when the hard examples stop pulling the model towards
their (often wrong) labels. Leaving them out is one answer
(``dataset.exclude_examples``); keeping them with a soft target is the other.

For a chosen set of training rows the cross-entropy target becomes

    q = (1 - s) * onehot(y) + s / K

(label smoothing with ``s`` = ``smoothing``; ``s = 1`` is the uniform target,
"this example says nothing about its class"). The transform does not edit
the objective it wraps: it hands it a ``Regularizer`` whose penalty on the
chosen rows is ``CE(logits, q) - CE(logits, y)`` (zero elsewhere), so the
wrapped objective's ``CE(logits, y) + penalty`` is exactly ``CE(logits, q)``
on those rows. With ``regularize_attack=True`` (PGD-AT) the attack maximizes
the same soft-target loss; TRADES' attack does not use labels (its KL term
is label-free), so leave the attack alone there (``regularize_attack=False``)
and the penalty sits on TRADES' natural cross-entropy (``output="natural"``).

Its state is the mask of chosen rows, ``state["soft_targets"]["rows"]``
(bool [N]): it lives in the train state and in checkpoints with the rest.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_memat.attacks.losses import cross_entropy, soft_cross_entropy
from jax_memat.objectives.base import (
    INNER,
    REGULARIZER_OUTPUTS,
    Objective,
    Regularizer,
    transform_state,
)

NAME = "soft_targets"
ROWS = "rows"


def smoothing_problem(smoothing: object) -> str:
    """What is wrong with a smoothing value (``""`` when nothing): a number in (0, 1].

    The one rule, used by ``with_soft_targets`` and config validation.
    """
    if (
        isinstance(smoothing, bool)
        or not isinstance(smoothing, numbers.Real)
        or not math.isfinite(smoothing)
        or not 0 < smoothing <= 1
    ):
        return f"smoothing must be a number in (0, 1] (1 = uniform targets), got {smoothing!r}"
    return ""


def smoothed_targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """``(1 - s) * onehot(labels) + s / K``, float32 [B, K]."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return (1.0 - smoothing) * onehot + smoothing / num_classes


def soft_target_penalty(
    logits: jax.Array, labels: jax.Array, chosen: jax.Array, smoothing: float
) -> jax.Array:
    """Per-example ``CE(logits, q) - CE(logits, y)`` on chosen rows, 0 elsewhere.

    Added to a cross-entropy on ``y`` it gives the cross-entropy on ``q``.
    Only the chosen rows' values are computed into the result; the others are
    exact zeros, so a run whose chosen set misses the batch is unchanged.
    """
    logits = logits.astype(jnp.float32)
    targets = smoothed_targets(labels, logits.shape[-1], smoothing)
    delta = soft_cross_entropy(logits, targets) - cross_entropy(logits, labels)
    return jnp.where(chosen, delta, 0.0)


def with_soft_targets(
    objective: Objective,
    rows: Sequence[int] | np.ndarray,
    *,
    smoothing: float = 1.0,
    regularize_attack: bool = True,
    output: str = "natural",
) -> Objective:
    """Wraps an objective so that the training rows ``rows`` get soft targets.

    Args:
      objective: the objective to wrap (``make_objective(...)`` or another
        transform's output).
      rows: the training rows (``batch["index"]`` values, ``0 .. N - 1``) whose
        target becomes ``(1 - smoothing) * onehot(y) + smoothing / K``.
      smoothing: in (0, 1]; 1 (the default) is the uniform target.
      regularize_attack: the attack maximizes the soft-target loss too (PGD-AT);
        use False for TRADES, whose attack does not use labels.
      output: for TRADES, which output's cross-entropy gets the soft target:
        ``"natural"`` (TRADES' cross-entropy term) or ``"adversarial"``.

    Returns:
      An ``Objective`` with state ``{"soft_targets": {"rows": bool [N]},
      "inner": <the wrapped objective's state>}``.

    Raises:
      ValueError: a bad ``smoothing`` or ``output``, or rows that are not
        integers (checked here); rows outside ``[0, N)`` are refused by ``init``.

    Example:
      >>> base = make_objective("pgd_at", apply_fn, attack)
      >>> objective = with_soft_targets(base, [4, 17, 388], smoothing=1.0)
      >>> state = objective.init(50_000, 10)
    """
    problem = smoothing_problem(smoothing)
    if problem:
        raise ValueError(f"Soft targets: {problem}.")
    if output not in REGULARIZER_OUTPUTS:
        raise ValueError(f"output={output!r} is not accepted; use one of {REGULARIZER_OUTPUTS}.")
    rows = np.asarray(rows)
    if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
        raise ValueError(f"Soft targets: rows must be a 1-D list of integers; got {rows!r}.")
    rows = rows.astype(np.int64)

    def init(num_examples: int, num_classes: int) -> dict:
        if rows.size and (rows.min() < 0 or rows.max() >= num_examples):
            raise ValueError(
                f"Soft targets: rows must lie in [0, {num_examples}); got "
                f"{int(rows.min())} .. {int(rows.max())}."
            )
        mask = np.zeros(num_examples, bool)
        mask[rows] = True
        own = {ROWS: jnp.asarray(mask)}
        return transform_state(NAME, own, objective.init(num_examples, num_classes))

    def loss(params, model_state, state, batch, info):
        if not isinstance(state, dict) or NAME not in state:
            raise ValueError(
                "Soft targets need their state: create the train state with "
                "objective_state=objective.init(num_examples, num_classes)."
            )
        chosen = state[NAME][ROWS][batch["index"]]
        labels = batch["label"]
        regularizer = Regularizer(
            lambda logits: soft_target_penalty(logits, labels, chosen, smoothing),
            attack=regularize_attack,
            output=output,
        )
        per_example_loss, aux = objective.loss(
            params, model_state, state[INNER], batch, info.with_regularizer(regularizer)
        )
        new_state = transform_state(NAME, state[NAME], aux.objective_state)
        return per_example_loss, aux._replace(objective_state=new_state)

    return Objective(init, loss)
