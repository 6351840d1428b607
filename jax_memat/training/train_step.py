"""The pure, data-parallel train step, with per-example outputs on request."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jax_memat.objectives import Objective, StepInfo, margin
from jax_memat.parallel import batch_sharded, replicated
from jax_memat.training.state import TrainState

StepFn = Callable[..., tuple]
# What the step can return per example (``per_example=True``), each [B] and
# sharded along the batch like the batch itself.
PER_EXAMPLE_OUTPUTS = ("index", "label", "loss", "margin", "correct")
# The metrics every step returns; a probe's metrics must not reuse these names.
STEP_METRICS = ("loss", "accuracy", "grad_norm_sq", "finite")


class StepView(NamedTuple):
    """What a probe sees of one train step (read only: a probe cannot change the step).

    Attributes:
      state: the ``TrainState`` before the step.
      new_state: the ``TrainState`` after it.
      batch: the step's batch.
      info: the ``StepInfo`` the objective was called with (same key, so a
        probe that calls the objective again crafts the same attack).
      grads: the gradient of the batch-mean loss at ``state.params``, as handed
        to the optimizer.
      objective: the step's ``Objective``.
      sample: the caller's static choice for a probe that works on some steps
        only: True (this step), False (not this one), or None (the probe
        decides on the device, from ``state.step``).
    """

    state: TrainState
    new_state: TrainState
    batch: dict
    info: StepInfo
    grads: Any
    objective: Objective
    sample: bool | None = None


# probe(view) -> {name: scalar}: extra metrics computed inside the jitted step.
Probe = Callable[[StepView], dict[str, jax.Array]]


def step_keys(rng: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
    """Named keys for one step, derived from the run key and the step number.

    Deriving rather than carrying split keys makes a resumed run draw exactly
    the random numbers an uninterrupted one would.
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)  # level 1: the step
    attack, dropout = jax.random.split(key)  # level 2: one key per consumer
    return {"attack": attack, "dropout": dropout}


def train_step(
    state: TrainState,
    batch: dict,
    *,
    objective: Objective,
    tx: optax.GradientTransformation,
    steps_per_epoch: int | None = None,
    per_example: bool = False,
    probe: Probe | None = None,
    sample: bool | None = None,
) -> tuple:
    """One optimizer step on the mean of a per-example objective (unjitted).

    Args:
      state: the current ``TrainState``.
      batch: ``{"image": float [B,H,W,C] in [0, 1], "label": int [B],
        "index": int [B]}`` (the global batch; per-example arrays only).
      objective: an ``Objective`` from ``jax_memat.objectives``; its state is
        ``state.objective_state``.
      tx: the optimizer.
      steps_per_epoch: turns the step into the 1-based epoch the objective
        sees (``StepInfo.epoch``; None when not given).
      per_example: also return the per-example outputs.
      probe: computes extra scalar metrics from a ``StepView`` of the step
        (e.g. ``jax_memat.analysis.GradStats``); it only reads, so the new
        state is the same with or without it. Its names must differ from
        ``STEP_METRICS``.
      sample: handed to the probe as ``StepView.sample`` (static).

    Returns:
      ``(new_state, metrics)``, or ``(new_state, metrics, per_example)`` with
      ``per_example=True``. Metrics are scalars: ``loss`` (batch mean),
      ``accuracy`` (of the logits trained on, adversarial for PGD-AT/TRADES),
      ``grad_norm_sq`` (squared global gradient norm, as the authors log) and
      ``finite`` (1.0 when loss and gradients are finite). ``per_example``
      holds ``PER_EXAMPLE_OUTPUTS``: the example's ``index``, the ``label``
      trained on, its ``loss`` (the objective's value), the ``margin`` of the
      logits trained on (``logit[y] - max_{k != y} logit[k]``) and whether they
      were ``correct``, all from the step's own forward pass.
    """
    keys = step_keys(state.rng, state.step)
    epoch = None if steps_per_epoch is None else state.step // steps_per_epoch + 1
    info = StepInfo(step=state.step, epoch=epoch, key=keys["attack"])

    def mean_loss(params):
        losses, aux = objective.loss(params, state.model_state, state.objective_state, batch, info)
        # The single place where per-example losses are averaged.
        return jnp.mean(losses), (losses, aux)

    (loss, (losses, aux)), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm_sq = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))
    logits = aux.per_example["logits"]
    correct = jnp.argmax(logits, -1) == batch["label"]
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(correct),
        "grad_norm_sq": grad_norm_sq,
        "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm_sq),
    }
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        model_state=aux.model_state,
        opt_state=opt_state,
        objective_state=aux.objective_state,
    )
    if probe is not None:
        extra = probe(StepView(state, new_state, batch, info, grads, objective, sample))
        clash = sorted(set(extra) & set(metrics))
        if clash:
            raise ValueError(
                f"The probe's metrics {clash} reuse the step's own names {STEP_METRICS}; "
                "rename them."
            )
        metrics.update(extra)
    if not per_example:
        return new_state, metrics
    outputs = {
        "index": batch["index"],
        "label": batch["label"],
        "loss": jax.lax.stop_gradient(losses),
        "margin": margin(jax.lax.stop_gradient(logits), batch["label"]),
        "correct": correct,
    }
    return new_state, metrics, outputs


def make_train_step(
    objective: Objective,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    steps_per_epoch: int | None = None,
    per_example: bool = False,
    probe: Probe | None = None,
    state_sharding: Any = None,
) -> StepFn:
    """Jits ``train_step`` over ``mesh``: state replicated (and donated), batch split.

    Args:
      objective: the ``Objective``.
      tx: the optimizer.
      mesh: the device mesh.
      steps_per_epoch: see ``train_step`` (needed by temporal ensembling).
      per_example: return the per-example outputs too, sharded along the batch.
      probe: extra metrics from each step (see ``train_step``); e.g.
        ``GradStats(every_steps=50)`` from ``jax_memat.analysis``, whose
        optimizer ``grad_stats.optimizer(tx)`` the state must be built with.
      state_sharding: where the state's leaves live, a pytree of shardings
        matching the state (e.g. ``jax.tree.map(lambda x: x.sharding, state)``
        for a state whose temporal-ensembling table is split over the mesh,
        ``create_train_state(..., shard_min_bytes=...)``); default all replicated.

    Returns:
      ``step(state, batch[, sample])``. ``sample`` (positional; a Python bool or
      None, static: one compiled program per value used) is ``StepView.sample``: a
      caller that knows the step number on the host passes whether the probe
      samples it, so that the step needs no device-side branch (XLA:CPU runs
      the per-example pass 15x slower inside one; see ``docs/gradients.md``).

    Example:
      >>> step = make_train_step(objective, tx, make_mesh(), steps_per_epoch=390)
      >>> state, metrics = step(state, shard_batch(batch, mesh))
    """
    if not isinstance(objective, Objective):
        raise TypeError(
            "make_train_step takes an Objective (from make_objective or a transform such as "
            f"with_temporal_ensembling); got {type(objective).__name__}."
        )

    def step(state: TrainState, batch: dict, sample: bool | None = None):
        if sample is not None and not isinstance(sample, bool):
            raise TypeError(f"sample={sample!r}: use True, False or None.")
        return train_step(
            state,
            batch,
            objective=objective,
            tx=tx,
            steps_per_epoch=steps_per_epoch,
            per_example=per_example,
            probe=probe,
            sample=sample,
        )

    rep, split = replicated(mesh), batch_sharded(mesh)
    state_out = rep if state_sharding is None else state_sharding
    out = (state_out, rep, split) if per_example else (state_out, rep)
    return jax.jit(
        step,
        in_shardings=(state_out, split),
        out_shardings=out,
        donate_argnums=(0,),
        static_argnums=(2,),
    )
