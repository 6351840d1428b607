"""Attacks by name, on the library's model function, for training and evaluation.

``make_attack(AttackSpec(...))`` turns a config-level description into
``attack(apply_fn, variables, x, y, key, *, objective_extra=None) -> x_adv``,
where ``apply_fn(variables, images, train) -> (logits, new_model_state)`` is
the model function of ``jax_memat.models``. The attack always calls it with
``train=False`` (BatchNorm in inference mode, as the authors' code crafts
attacks under ``model.eval()``) and discards the returned model state.

Attacks by name (all maximise a per-example objective with ``pgd``):

* ``"pgd"``: cross-entropy ``CE(f(x'), y)``; uniform start if
  ``random_start`` else the clean input. PGD-AT's attack and the PGD-10
  evaluation.
* ``"fgsm"``: one step of cross-entropy ascent of size ``step_size`` (``None``:
  ``eps``); uniform start if ``random_start`` (Wong et al.'s FGSM-RS).
* ``"cw"``: the CW margin ``max_{j != y} z_j - z_y`` (PGD-CW); starts as
  ``"pgd"``.
* ``"trades"``: ``KL(f(x) || f(x'))`` with ``f(x)`` the clean logits in
  inference mode (a constant); starts at ``x + 0.001 * N(0, 1)`` as the TRADES
  code, whatever ``random_start`` says. ``y`` is not used.

Random starts are clipped to the image box ``[0, 1]`` unless
``clip_start=False``, which reproduces the authors' TRADES, TRADES+TE and
PGD-AT+TE attacks (their plain PGD-AT attack clips, as the default).

``objective_extra(logits) -> [B]`` is added to the per-example objective, a
hook for regularisers such as temporal ensembling. Only its scale *relative to
the base objective* matters (the ascent direction of each example is scale
free): the authors' PGD-AT+TE attack objective ``mean CE + R`` with
``R = w * mean_{batch, classes} (softmax(z) - q)^2`` corresponds to
``objective_extra = w * mean_classes (softmax(z) - q)^2``, and TRADES+TE's
``(beta / B) KL + R`` to ``(w / beta) * mean_classes (softmax(z) - q)^2``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax

from jax_memat.attacks import core, losses

ATTACK_NAMES = ("fgsm", "pgd", "cw", "trades")

ApplyFn = Callable[[Any, jax.Array, bool], tuple[jax.Array, Any]]
Attack = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """What attack to run, in primitives a config can hold.

    Attributes:
      name: one of ``ATTACK_NAMES``.
      eps: ball radius (e.g. ``8 / 255``), a finite float ``>= 0``.
      step_size: step length (e.g. ``2 / 255``), ``> 0``; for ``"fgsm"`` it may
        be ``None``, meaning ``eps``.
      steps: number of ascent steps, an int ``>= 0``; ``"fgsm"`` requires 1.
      norm: one of ``NORMS`` (``"linf"``, ``"l2"``).
      random_start: uniform start in the ball for ``"pgd"``, ``"cw"`` and
        ``"fgsm"`` (else the clean input); ignored by ``"trades"``, which always
        starts at ``x + 0.001 * N(0, 1)``.
      clip_start: clip the random start to ``[0, 1]`` (default) or leave it
        unclipped, as the authors' TRADES and TE attacks do; either way every
        step projects onto the ball and clips to the box. No effect without a
        random start.

    Example:
      >>> from jax_memat.attacks import AttackSpec
      >>> AttackSpec("pgd", eps=8 / 255, step_size=2 / 255, steps=10).validate()
    """

    name: str
    eps: float
    step_size: float | None
    steps: int
    norm: str = "linf"
    random_start: bool = True
    clip_start: bool = True

    def validate(self) -> None:
        """Raises ``ValueError`` (naming the accepted values) on a bad field."""
        if self.name not in ATTACK_NAMES:
            raise ValueError(f"attack name must be one of {ATTACK_NAMES}, got {self.name!r}")
        if self.norm not in core.NORMS:
            raise ValueError(f"norm must be one of {core.NORMS}, got {self.norm!r}")
        if not isinstance(self.random_start, bool):
            raise ValueError(f"random_start must be True or False, got {self.random_start!r}")
        if not isinstance(self.clip_start, bool):
            raise ValueError(f"clip_start must be True or False, got {self.clip_start!r}")
        problem = core.eps_problem(self.eps, self.norm)
        if problem:
            raise ValueError(problem)
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral):
            raise ValueError(f"steps must be an int >= 0, got {self.steps!r}")
        if self.name == "fgsm":
            if self.steps != 1:
                raise ValueError(
                    f"fgsm takes exactly one step: steps must be 1, got {self.steps} "
                    "(use name='pgd' for several steps)"
                )
            if self.step_size is None:
                return
        elif self.steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {self.steps!r}")
        if (
            isinstance(self.step_size, bool)
            or not isinstance(self.step_size, numbers.Real)
            or not math.isfinite(self.step_size)
            or self.step_size <= 0
        ):
            accepted = "a finite float > 0" + (" or None (= eps)" if self.name == "fgsm" else "")
            raise ValueError(f"step_size must be {accepted}, got {self.step_size!r}")


def make_attack(spec: AttackSpec) -> Attack:
    """Builds the attack that ``spec`` describes (validated here, eagerly).

    Args:
      spec: the attack's name and hyper-parameters.

    Returns:
      ``attack(apply_fn, variables, x, y, key, *, objective_extra=None)``
      returning ``[B, ...]`` adversarial inputs (behind ``stop_gradient``,
      within the ``eps``-ball of ``x`` and in ``[0, 1]``), where ``apply_fn``
      is ``(variables, images, train) -> (logits, new_model_state)``, ``x`` the
      ``[B, ...]`` clean inputs in ``[0, 1]``, ``y`` the ``[B]`` integer labels,
      ``key`` a PRNG key and ``objective_extra`` an optional
      ``logits -> [B]`` term added to the objective. The function is pure and
      jit-compatible (close over ``apply_fn`` when jitting).

    Raises:
      ValueError: if ``spec`` is invalid.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax_memat.attacks import AttackSpec, make_attack
      >>> apply_fn = lambda variables, images, train: (images @ variables["w"], {})
      >>> attack = make_attack(AttackSpec("pgd", eps=0.1, step_size=0.05, steps=4))
      >>> variables = {"w": jnp.array([[1.0, -1.0], [-2.0, 2.0]])}
      >>> attack(apply_fn, variables, jnp.full((1, 2), 0.5), jnp.array([0]),
      ...        jax.random.key(0))
      Array([[0.4, 0.6]], dtype=float32)
    """
    spec.validate()
    if spec.name == "trades":
        init = "normal"
    else:
        init = "uniform" if spec.random_start else "none"

    def attack(
        apply_fn: ApplyFn,
        variables: Any,
        x: jax.Array,
        y: jax.Array,
        key: jax.Array | None,
        *,
        objective_extra: Callable[[jax.Array], jax.Array] | None = None,
    ) -> jax.Array:
        def logits_fn(images: jax.Array) -> jax.Array:
            # Positional ``train`` (inference mode); the new model state is dropped.
            logits, _ = apply_fn(variables, images, False)
            return logits

        if spec.name == "cw":
            base = lambda logits: losses.cw_margin(logits, y)
        elif spec.name == "trades":
            clean_logits = jax.lax.stop_gradient(logits_fn(x))
            base = lambda logits: losses.kl_divergence(clean_logits, logits)
        else:
            base = lambda logits: losses.cross_entropy(logits, y)

        if objective_extra is None:
            objective = base
        else:
            objective = lambda logits: base(logits) + objective_extra(logits)

        if spec.name == "fgsm":
            return core.fgsm(
                logits_fn,
                objective,
                x,
                key,
                eps=spec.eps,
                norm=spec.norm,
                init=init,
                step_size=spec.step_size,
                clip_start=spec.clip_start,
            )
        return core.pgd(
            logits_fn,
            objective,
            x,
            key,
            eps=spec.eps,
            step_size=spec.step_size,
            steps=spec.steps,
            norm=spec.norm,
            init=init,
            clip_start=spec.clip_start,
        )

    return attack
