"""The pure, data-parallel train step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jax_memat.objectives import LossFn
from jax_memat.training.mesh import batch_sharded, replicated
from jax_memat.training.state import TrainState

StepFn = Callable[[TrainState, dict], tuple[TrainState, dict]]


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
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
) -> tuple[TrainState, dict]:
    """One optimizer step on the mean of a per-example loss (unjitted).

    Args:
      state: the current ``TrainState``.
      batch: ``{"image": float [B,H,W,C] in [0, 1], "label": int [B],
        "index": int [B]}`` (the global batch). The loss sees it with two more
        entries: ``"step"`` (the state's step) and ``"extra"`` (``state.extra``);
        a loss returning ``aux["extra"]`` replaces ``state.extra``.
      loss_fn: a per-example objective from ``jax_memat.objectives``.
      tx: the optimizer.

    Returns:
      The new state and scalar metrics: ``loss`` (batch mean), ``accuracy`` (of
      the logits trained on, adversarial for PGD-AT/TRADES), ``grad_norm_sq``
      (squared global gradient norm, as the authors log) and ``finite`` (1.0
      when loss and gradients are finite).
    """
    keys = step_keys(state.rng, state.step)
    # Loss transforms with state (e.g. temporal ensembling) read it from the
    # batch and return its new value as aux["extra"].
    batch = {**batch, "step": state.step, "extra": state.extra}

    def mean_loss(params):
        per_example, aux = loss_fn(params, state.model_state, batch, keys["attack"])
        # The single place where per-example losses are averaged.
        return jnp.mean(per_example), aux

    (loss, aux), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm_sq = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))
    logits = aux["per_example"]["logits"]
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "grad_norm_sq": grad_norm_sq,
        "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm_sq),
    }
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        model_state=aux["model_state"],
        opt_state=opt_state,
        extra=aux.get("extra", state.extra),
    )
    return new_state, metrics


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh) -> StepFn:
    """Jits ``train_step`` over ``mesh``: state replicated (and donated), batch split.

    Example:
      >>> step = make_train_step(loss_fn, tx, make_mesh())
      >>> state, metrics = step(state, shard_batch(batch, mesh))
    """

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return train_step(state, batch, loss_fn=loss_fn, tx=tx)

    rep, split = replicated(mesh), batch_sharded(mesh)
    return jax.jit(
        step,
        in_shardings=(rep, split),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
    )


def make_batch_fn(
    mesh: Mesh,
    key: jax.Array,
    *,
    augment: bool,
    crop_padding: int = 4,
    flip: bool = True,
) -> Callable[[jax.Array, jax.Array, Any, Any], dict]:
    """Jitted ``batch_fn(images_u8, labels, indices, step) -> batch`` on the devices.

    Gathers the rows ``indices`` of the device-resident uint8 dataset, scales to
    [0, 1] and augments with a key ``fold_in(key, step)``, so the data never
    leaves the accelerators and augmentation is reproducible from the step.
    """
    from jax_memat.data import make_batch

    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)

    def batch_fn(images, labels, indices, step):
        return make_batch(
            images,
            labels,
            indices,
            jax.random.fold_in(key, step),
            augment=augment,
            crop_padding=crop_padding,
            flip=flip,
        )

    rep, split = replicated(mesh), batch_sharded(mesh)
    return jax.jit(batch_fn, in_shardings=(rep, rep, split, rep), out_shardings=split)
