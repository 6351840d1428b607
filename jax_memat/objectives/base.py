"""The objective type: a per-example loss with its own state, and how transforms nest.

An ``Objective`` is a pair of pure functions, in the spirit of optax's
``GradientTransformation``::

    state = objective.init(num_examples, num_classes)
    per_example_loss, aux = objective.loss(params, model_state, state, batch, info)

- ``batch`` holds per-example arrays only (``image``, ``label``, ``index``);
- ``info`` (``StepInfo``) carries the step, the 1-based epoch, the step's
  random key, and the regularizers that transforms hand to the objective they
  wrap;
- ``aux`` (``LossAux``) is typed: the new model state (BatchNorm statistics),
  the new objective state, and a dict of per-example arrays (``logits``: the
  logits the loss was computed on).

The mean over the batch is taken in one place, the train step.

A **transform** is a function ``Objective -> Objective`` (temporal
ensembling is one). Its state is ``{name: its own state, "inner": the state
of the objective it wraps}``, so any number of stateful transforms nest and
each keeps and updates only its own slot: ``T2(T1(base))`` has the state
``{"t2": s2, "inner": {"t1": s1, "inner": base_state}}``. The outer
transform's loss runs first; it may add a ``Regularizer`` to ``info`` before
calling the inner loss, so every transform's regularizer reaches the base
objective, which adds them (in the order the transforms were applied,
innermost first) to its training loss and, where asked, to its attack
objective.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp

# apply(variables, images, train) -> (logits, new_model_state)
ApplyFn = Callable[[Any, jax.Array, bool], tuple[jax.Array, Any]]
REGULARIZER_OUTPUTS = ("natural", "adversarial")
INNER = "inner"


@dataclasses.dataclass(frozen=True)
class Regularizer:
    """A per-example penalty a transform hands to the objective it wraps.

    Attributes:
      penalty: ``logits [B, K] -> [B]``; its batch mean is added to the loss.
      attack: also add it to the attack objective (at the adversarial point).
      output: for objectives with two outputs (TRADES), which logits the
        training-loss term sees: ``"natural"`` or ``"adversarial"``; the
        single-output objectives use the logits they train on.
    """

    penalty: Callable[[jax.Array], jax.Array]
    attack: bool = True
    output: str = "natural"

    def __post_init__(self):
        if self.output not in REGULARIZER_OUTPUTS:
            raise ValueError(
                f"Regularizer output={self.output!r} is not accepted; use one of "
                f"{REGULARIZER_OUTPUTS}."
            )


class StepInfo(flax.struct.PyTreeNode):
    """What an objective knows about the step besides the batch.

    Attributes:
      step: optimizer steps taken before this one (int32 scalar).
      epoch: the 1-based epoch of this step (int32 scalar), or None when the
        train step was built without ``steps_per_epoch``.
      key: this step's random key for the objective (the attack's start).
      regularizers: added by transforms (static: functions, not arrays).
    """

    step: jax.Array
    epoch: jax.Array | None
    key: jax.Array
    regularizers: tuple[Regularizer, ...] = flax.struct.field(pytree_node=False, default=())

    def with_regularizer(self, regularizer: Regularizer) -> StepInfo:
        """This info with ``regularizer`` appended (what a transform passes inward)."""
        return self.replace(regularizers=(*self.regularizers, regularizer))


class LossAux(NamedTuple):
    """What an objective returns beside the per-example loss.

    Attributes:
      model_state: the new model state (BatchNorm running statistics).
      objective_state: the objective's new state (``{}`` when it has none).
      per_example: arrays with a leading batch axis; ``logits`` are the logits
        the loss was computed on (adversarial for PGD-AT and TRADES).
    """

    model_state: Any
    objective_state: Any
    per_example: dict[str, jax.Array]


# loss(params, model_state, objective_state, batch, info) -> (per_example_loss[B], aux)
LossFn = Callable[[Any, Any, Any, dict, StepInfo], tuple[jax.Array, LossAux]]
InitFn = Callable[[int, int], Any]


class Objective(NamedTuple):
    """A per-example training objective with its own state (see the module docstring).

    Attributes:
      init: ``init(num_examples, num_classes) -> state``.
      loss: ``loss(params, model_state, state, batch, info) -> (loss[B], LossAux)``.
    """

    init: InitFn
    loss: LossFn


def stateless_init(num_examples: int, num_classes: int) -> dict:
    """The ``init`` of an objective without state: ``{}``."""
    del num_examples, num_classes
    return {}


def regularizer_sum(
    info: StepInfo, logits: jax.Array, *, attack: bool = False, output: str | None = None
) -> jax.Array | None:
    """The per-example sum of the regularizers that apply, or None when none does.

    Args:
      info: the step's info (its ``regularizers``).
      logits: the logits the penalties see.
      attack: sum those marked for the attack objective only.
      output: sum those whose ``output`` is this (None: all).
    """
    total = None
    for r in info.regularizers:
        if (attack and not r.attack) or (output is not None and r.output != output):
            continue
        value = r.penalty(logits)
        total = value if total is None else total + value
    return total


def add_regularizers(loss: jax.Array, info: StepInfo, logits: jax.Array, **kwargs) -> jax.Array:
    """``loss`` plus ``regularizer_sum(info, logits, **kwargs)`` (unchanged when none applies)."""
    extra = regularizer_sum(info, logits, **kwargs)
    return loss if extra is None else loss + extra


def margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example ``logit[y] - max_{k != y} logit[k]`` (> 0 exactly when correct, ties aside)."""
    logits = logits.astype(jnp.float32)
    true = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return true - jnp.max(others, axis=-1)


def transform_state(name: str, own: Any, inner: Any) -> dict:
    """The state of a transform named ``name``: ``{name: own, "inner": inner}``."""
    return {name: own, INNER: inner}
