"""Standard training, PGD-AT (Madry et al., 2018) and TRADES (Zhang et al., 2019).

Each builder returns a per-example loss ``loss_fn(params, model_state, batch,
key) -> (loss[B], aux)``. The adversarial example is crafted with BatchNorm in
inference mode and never changes the model state; the update's forward pass uses
training mode (the authors' code does the same: ``model.eval()`` while
attacking, ``model.train()`` for the loss).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jax_memat.attacks import AttackSpec, make_attack
from jax_memat.attacks.losses import cross_entropy, kl_divergence

OBJECTIVE_NAMES = ("standard", "pgd_at", "trades")

# apply(variables, images, train) -> (logits, new_model_state)
ApplyFn = Callable[[Any, jax.Array, bool], tuple[jax.Array, Any]]
# loss_fn(params, model_state, batch, key) -> (per_example_loss[B], aux)
LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]
# regularizer(logits, batch) -> per-example penalty [B]; added to the attack
# objective and to the training loss (the hook temporal ensembling plugs into).
Regularizer = Callable[[jax.Array, dict], jax.Array]


def validate_objective_name(name: str) -> None:
    """Raises ``ValueError`` unless ``name`` is one of ``OBJECTIVE_NAMES``."""
    if name not in OBJECTIVE_NAMES:
        raise ValueError(
            f"Unknown objective {name!r}; accepted objectives: {', '.join(OBJECTIVE_NAMES)}."
        )


REGULARIZER_OUTPUTS = ("natural", "adversarial")


def make_objective(
    name: str,
    apply_fn: ApplyFn,
    attack: AttackSpec | None = None,
    *,
    beta: float = 6.0,
    regularizer: Regularizer | None = None,
    attack_regularizer: Regularizer | None = None,
    regularizer_output: str = "natural",
) -> LossFn:
    """Builds a per-example training objective.

    Args:
      name: one of ``OBJECTIVE_NAMES``: ``"standard"`` (cross-entropy on clean
        inputs), ``"pgd_at"`` (cross-entropy on PGD examples) or ``"trades"``
        (``CE(f(x), y) + beta * KL(f(x) || f(x'))`` with ``x'`` from the TRADES
        KL attack).
      apply_fn: the model function ``apply(variables, images, train)``.
      attack: the training attack (ignored by ``"standard"``). For ``"trades"``
        its name is forced to ``"trades"`` (the KL attack from ``x + 0.001 N(0, 1)``,
        clipped to ``[0, 1]`` unless ``attack.clip_start`` is False); its
        ``eps``, ``step_size``, ``steps``, ``norm`` and ``clip_start`` are kept.
      beta: the TRADES trade-off (the paper uses 6).
      regularizer: optional ``(logits, batch) -> [B]`` penalty added to the
        training loss, on the logits the loss is computed on (for TRADES, see
        ``regularizer_output``). Temporal ensembling plugs in here.
      attack_regularizer: optional ``(logits, batch) -> [B]`` penalty added to
        the attack objective, on the logits at the adversarial point. For
        TRADES it is divided by ``beta`` so the attack ascends
        ``beta * KL + R``, as the authors' ``(beta / B) KL_sum + R``.
      regularizer_output: TRADES only: ``"natural"`` (the authors' code) or
        ``"adversarial"``, the logits ``regularizer`` sees.

    Returns:
      ``loss_fn(params, model_state, batch, key) -> (per_example_loss, aux)``
      with ``aux = {"model_state": ..., "per_example": {"logits": ...}}``; the
      logits are those the model was trained on (adversarial for PGD-AT, natural
      for standard training, adversarial for TRADES, with the natural ones under
      ``"logits_natural"``).

    Example:
      >>> loss_fn = make_objective("pgd_at", apply_fn, AttackSpec("pgd", 8/255, 2/255, 10))
      >>> per_example, aux = loss_fn(params, model_state, batch, key)
    """
    validate_objective_name(name)
    if name != "standard":
        if attack is None:
            raise ValueError(f"Objective {name!r} needs an attack spec; got None.")
        attack.validate()
    if beta < 0:
        raise ValueError(f"TRADES beta must be >= 0; got {beta}.")
    if regularizer_output not in REGULARIZER_OUTPUTS:
        raise ValueError(
            f"regularizer_output={regularizer_output!r} is not accepted; "
            f"use one of {REGULARIZER_OUTPUTS}."
        )
    if name == "trades" and attack_regularizer is not None and beta == 0:
        raise ValueError("A TRADES attack regularizer is scaled by 1/beta; beta must be > 0.")

    def penalty(logits: jax.Array, batch: dict) -> jax.Array:
        if regularizer is None:
            return jnp.zeros(logits.shape[0], jnp.float32)
        return regularizer(logits, batch)

    def craft(run_attack, variables, batch: dict, key, scale: float = 1.0) -> jax.Array:
        """Adversarial inputs (model state untouched), with the attack regularizer if any."""
        extra = None
        if attack_regularizer is not None:
            extra = lambda logits: attack_regularizer(logits, batch) / scale  # noqa: E731
        return run_attack(
            apply_fn,
            jax.lax.stop_gradient(variables),
            batch["image"],
            batch["label"],
            key,
            objective_extra=extra,
        )

    def variables_of(params, model_state):
        return {"params": params, **model_state}

    if name == "standard":

        def standard_loss(params, model_state, batch, key):
            del key
            logits, new_state = apply_fn(variables_of(params, model_state), batch["image"], True)
            loss = cross_entropy(logits, batch["label"]) + penalty(logits, batch)
            return loss, {"model_state": new_state, "per_example": {"logits": logits}}

        return standard_loss

    if name == "pgd_at":
        run_attack = make_attack(attack)

        def pgd_at_loss(params, model_state, batch, key):
            variables = variables_of(params, model_state)
            x_adv = craft(run_attack, variables, batch, key)
            logits, new_state = apply_fn(variables, x_adv, True)
            loss = cross_entropy(logits, batch["label"]) + penalty(logits, batch)
            return loss, {"model_state": new_state, "per_example": {"logits": logits}}

        return pgd_at_loss

    run_trades_attack = make_attack(dataclasses.replace(attack, name="trades"))

    def trades_loss(params, model_state, batch, key):
        variables = variables_of(params, model_state)
        x_adv = craft(run_trades_attack, variables, batch, key, beta)
        # Two training-mode passes, natural then adversarial, exactly as the
        # TRADES code: BatchNorm running statistics are updated by both.
        logits_nat, state_nat = apply_fn(variables, batch["image"], True)
        logits_adv, new_state = apply_fn(variables_of(params, state_nat), x_adv, True)
        loss = cross_entropy(logits_nat, batch["label"]) + beta * kl_divergence(
            logits_nat, logits_adv
        )
        regularized = logits_nat if regularizer_output == "natural" else logits_adv
        loss = loss + penalty(regularized, batch)
        return loss, {
            "model_state": new_state,
            "per_example": {"logits": logits_adv, "logits_natural": logits_nat},
        }

    return trades_loss
