"""Standard training, PGD-AT (Madry et al., 2018) and TRADES (Zhang et al., 2019).

``make_objective`` returns an ``Objective`` (``objectives/base.py``) without
state of its own. The adversarial example is crafted with BatchNorm in
inference mode and never changes the model state; the update's forward pass
uses training mode (the authors' code does the same: ``model.eval()`` while
attacking, ``model.train()`` for the loss). Regularizers handed in by
transforms through ``StepInfo`` are added to the training loss and, where
marked, to the attack objective.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax

from jax_memat.attacks import AttackSpec, make_attack
from jax_memat.attacks.losses import cross_entropy, kl_divergence
from jax_memat.objectives.base import (
    ApplyFn,
    LossAux,
    Objective,
    StepInfo,
    add_regularizers,
    regularizer_sum,
    stateless_init,
)

OBJECTIVE_NAMES = ("standard", "pgd_at", "trades")


def validate_objective_name(name: str) -> None:
    """Raises ``ValueError`` unless ``name`` is one of ``OBJECTIVE_NAMES``."""
    if name not in OBJECTIVE_NAMES:
        raise ValueError(
            f"Unknown objective {name!r}; accepted objectives: {', '.join(OBJECTIVE_NAMES)}."
        )


def beta_problem(beta: object) -> str:
    """What is wrong with a TRADES beta (``""`` when nothing): a finite number >= 0.

    The one rule, used by ``make_objective`` and config validation.
    """
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(beta):
        return f"beta must be a finite number >= 0, got {beta!r}"
    if beta < 0:
        return f"beta must be a finite number >= 0, got {beta!r}"
    return ""


def make_objective(
    name: str,
    apply_fn: ApplyFn,
    attack: AttackSpec | None = None,
    *,
    beta: float = 6.0,
) -> Objective:
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
      beta: the TRADES trade-off (the paper uses 6). A regularizer in the
        TRADES attack objective is divided by ``beta`` (the attack ascends
        ``KL + R / beta``, i.e. ``beta * KL + R``, as the authors' ``(beta / B)
        KL_sum + R``), so it needs ``beta > 0``.

    Returns:
      An ``Objective`` with state ``{}``; its ``aux.per_example["logits"]``
      are the logits trained on (adversarial for PGD-AT and TRADES; TRADES
      adds ``"logits_natural"``).

    Example:
      >>> objective = make_objective("pgd_at", apply_fn, AttackSpec("pgd", 8/255, 2/255, 10))
      >>> state = objective.init(50_000, 10)
      >>> loss, aux = objective.loss(params, model_state, state, batch, info)
    """
    validate_objective_name(name)
    if name != "standard":
        if attack is None:
            raise ValueError(f"Objective {name!r} needs an attack spec; got None.")
        attack.validate()
    problem = beta_problem(beta)
    if problem:
        raise ValueError(f"TRADES {problem}.")

    def variables_of(params, model_state):
        return {"params": params, **model_state}

    def craft(run_attack, variables, batch: dict, info: StepInfo, scale: float = 1.0):
        """Adversarial inputs (model state untouched), with the attack regularizers if any."""
        extra = None
        if any(r.attack for r in info.regularizers):

            def extra(logits):
                return regularizer_sum(info, logits, attack=True) / scale

        return run_attack(
            apply_fn,
            jax.lax.stop_gradient(variables),
            batch["image"],
            batch["label"],
            info.key,
            objective_extra=extra,
        )

    if name == "standard":

        def standard_loss(params, model_state, state, batch, info):
            logits, new_state = apply_fn(variables_of(params, model_state), batch["image"], True)
            loss = add_regularizers(cross_entropy(logits, batch["label"]), info, logits)
            return loss, LossAux(new_state, state, {"logits": logits})

        return Objective(stateless_init, standard_loss)

    if name == "pgd_at":
        run_attack = make_attack(attack)

        def pgd_at_loss(params, model_state, state, batch, info):
            variables = variables_of(params, model_state)
            x_adv = craft(run_attack, variables, batch, info)
            logits, new_state = apply_fn(variables, x_adv, True)
            loss = add_regularizers(cross_entropy(logits, batch["label"]), info, logits)
            return loss, LossAux(new_state, state, {"logits": logits})

        return Objective(stateless_init, pgd_at_loss)

    run_trades_attack = make_attack(dataclasses.replace(attack, name="trades"))

    def trades_loss(params, model_state, state, batch, info):
        if beta == 0 and any(r.attack for r in info.regularizers):
            raise ValueError(
                "A regularizer in the TRADES attack objective is scaled by 1/beta; beta must "
                "be > 0 (or the regularizer must leave the attack alone)."
            )
        variables = variables_of(params, model_state)
        x_adv = craft(run_trades_attack, variables, batch, info, beta)
        # Two training-mode passes, natural then adversarial, exactly as the
        # TRADES code: BatchNorm running statistics are updated by both.
        logits_nat, state_nat = apply_fn(variables, batch["image"], True)
        logits_adv, new_state = apply_fn(variables_of(params, state_nat), x_adv, True)
        loss = cross_entropy(logits_nat, batch["label"]) + beta * kl_divergence(
            logits_nat, logits_adv
        )
        loss = add_regularizers(loss, info, logits_nat, output="natural")
        loss = add_regularizers(loss, info, logits_adv, output="adversarial")
        per_example = {"logits": logits_adv, "logits_natural": logits_nat}
        return loss, LossAux(new_state, state, per_example)

    return Objective(stateless_init, trades_loss)
