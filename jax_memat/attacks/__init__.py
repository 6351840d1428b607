"""Adversarial attacks as pure functions of a logits function and an objective.

``core`` holds the PGD family (``pgd``, ``fgsm``, ``project``), ``losses`` the
per-example objectives on logits, and ``builders`` the by-name attacks
(``AttackSpec``, ``make_attack``) that training and evaluation use with the
model function ``apply(variables, images, train) -> (logits, state)``.
"""

from jax_memat.attacks.builders import ATTACK_NAMES, AttackSpec, make_attack
from jax_memat.attacks.core import (
    NORMS,
    eps_problem,
    fgsm,
    pgd,
    project,
    step_size_problem,
    threat_model_problems,
)
from jax_memat.attacks.losses import cross_entropy, cw_margin, kl_divergence, soft_cross_entropy

__all__ = [
    "ATTACK_NAMES",
    "NORMS",
    "eps_problem",
    "step_size_problem",
    "threat_model_problems",
    "AttackSpec",
    "cross_entropy",
    "cw_margin",
    "fgsm",
    "kl_divergence",
    "make_attack",
    "pgd",
    "project",
    "soft_cross_entropy",
]
