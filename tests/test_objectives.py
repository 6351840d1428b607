"""Objective values against hand-computed cases on a linear two-class model.

The model is ``logits = [0, w . x]`` with ``w = (1, -2)`` and ``x = (0.5, 0.5)``,
label 0, so ``CE = softplus(w . x)`` and every optimum is a corner of the box.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_memat.attacks import AttackSpec
from jax_memat.attacks.losses import cross_entropy
from jax_memat.objectives import make_objective

W = jnp.array([1.0, -2.0])
X = jnp.array([[0.5, 0.5]])
Y = jnp.array([0])
BATCH = {"image": X, "label": Y, "index": jnp.array([0])}
KEY = jax.random.key(0)


def apply_fn(variables, images, train):
    z = images @ variables["params"]["w"]
    return jnp.stack([jnp.zeros_like(z), z], -1), {}


PARAMS = {"w": W}


def softplus(z):
    return math.log1p(math.exp(z))


def kl_two_class(z, z_adv):
    p = np.array([1.0, math.exp(z)]) / (1 + math.exp(z))
    q = np.array([1.0, math.exp(z_adv)]) / (1 + math.exp(z_adv))
    return float(np.sum(p * np.log(p / q)))


def pgd(steps=10, random_start=False):
    return AttackSpec("pgd", eps=0.1, step_size=0.05, steps=steps, random_start=random_start)


def test_standard_is_cross_entropy():
    loss, aux = make_objective("standard", apply_fn)(PARAMS, {}, BATCH, KEY)
    assert float(loss[0]) == pytest.approx(softplus(-0.5), rel=1e-6)  # 0.474077
    assert aux["per_example"]["logits"].shape == (1, 2)


def test_pgd_at_with_zero_steps_is_clean_cross_entropy():
    loss, _ = make_objective("pgd_at", apply_fn, pgd(steps=0))(PARAMS, {}, BATCH, KEY)
    assert float(loss[0]) == pytest.approx(softplus(-0.5), rel=1e-6)


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_at_reaches_the_worst_corner(random_start):
    # CE grows with w.x: the worst point is x + eps * sign(w) = (0.6, 0.4), w.x' = -0.2.
    loss_fn = make_objective("pgd_at", apply_fn, pgd(random_start=random_start))
    loss, _ = loss_fn(PARAMS, {}, BATCH, KEY)
    assert float(loss[0]) == pytest.approx(softplus(-0.2), rel=1e-5)  # 0.598139


def test_trades_is_natural_ce_plus_beta_kl_at_a_corner():
    # KL(p(x) || p(x')) grows as w.x' leaves w.x = -0.5 in either direction; the
    # start x + 0.001 N(0, 1) picks the side, and 10 steps reach that corner.
    beta = 6.0
    loss, aux = make_objective("trades", apply_fn, pgd(), beta=beta)(PARAMS, {}, BATCH, KEY)
    candidates = [softplus(-0.5) + beta * kl_two_class(-0.5, z) for z in (-0.2, -0.8)]
    assert min(abs(float(loss[0]) - c) for c in candidates) < 1e-5
    assert set(aux["per_example"]) == {"logits", "logits_natural"}


def test_trades_beta_zero_is_natural_cross_entropy():
    loss, _ = make_objective("trades", apply_fn, pgd(), beta=0.0)(PARAMS, {}, BATCH, KEY)
    assert float(loss[0]) == pytest.approx(softplus(-0.5), rel=1e-6)


def test_regularizers_enter_the_loss_and_the_attack_objective():
    const_reg = lambda logits, batch: jnp.full(logits.shape[0], 0.5)
    const = make_objective("pgd_at", apply_fn, pgd(), regularizer=const_reg)
    loss, _ = const(PARAMS, {}, BATCH, KEY)
    assert float(loss[0]) == pytest.approx(softplus(-0.2) + 0.5, rel=1e-5)
    # R = -2 CE turns the attack objective into -CE: the attack now *lowers* the
    # loss, moving to x - eps * sign(w) = (0.4, 0.6), w.x' = -0.8; loss = -CE there.
    reg = lambda logits, b: -2 * cross_entropy(logits, b["label"])
    flipped = make_objective("pgd_at", apply_fn, pgd(), regularizer=reg, attack_regularizer=reg)
    loss, _ = flipped(PARAMS, {}, BATCH, KEY)
    assert float(loss[0]) == pytest.approx(-softplus(-0.8), rel=1e-5)  # -0.371101


def test_attack_regularizer_alone_moves_the_attack_not_the_loss():
    reg = lambda logits, b: -2 * cross_entropy(logits, b["label"])
    loss, _ = make_objective("pgd_at", apply_fn, pgd(), attack_regularizer=reg)(
        PARAMS, {}, BATCH, KEY
    )
    assert float(loss[0]) == pytest.approx(softplus(-0.8), rel=1e-5)  # CE at (0.4, 0.6)


def test_trades_regularizer_output_and_attack_scaling():
    beta = 6.0
    # R = c * z: on the natural output z = -0.5; on the adversarial one, the corner.
    reg = lambda logits, b: 0.1 * logits[:, 1]
    nat = make_objective("trades", apply_fn, pgd(), beta=beta, regularizer=reg)
    adv = make_objective(
        "trades", apply_fn, pgd(), beta=beta, regularizer=reg, regularizer_output="adversarial"
    )
    base, _ = make_objective("trades", apply_fn, pgd(), beta=beta)(PARAMS, {}, BATCH, KEY)
    loss_nat, _ = nat(PARAMS, {}, BATCH, KEY)
    loss_adv, aux = adv(PARAMS, {}, BATCH, KEY)
    assert float(loss_nat[0] - base[0]) == pytest.approx(0.1 * -0.5, rel=1e-5)
    z_adv = float(aux["per_example"]["logits"][0, 1])
    assert float(loss_adv[0] - base[0]) == pytest.approx(0.1 * z_adv, rel=1e-4)
    # A huge attack regularizer favouring small z dominates beta * KL: the attack
    # goes to the corner w.x' = -0.8 whatever side the random start picked.
    pull = lambda logits, b: -1e3 * logits[:, 1]
    _, aux = make_objective("trades", apply_fn, pgd(), beta=beta, attack_regularizer=pull)(
        PARAMS, {}, BATCH, KEY
    )
    assert float(aux["per_example"]["logits"][0, 1]) == pytest.approx(-0.8, abs=1e-5)


def test_bad_objective_input():
    with pytest.raises(ValueError, match="accepted objectives: standard, pgd_at, trades"):
        make_objective("mart", apply_fn, pgd())
    with pytest.raises(ValueError, match="needs an attack spec"):
        make_objective("pgd_at", apply_fn, None)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        make_objective("trades", apply_fn, pgd(), beta=-1.0)
    with pytest.raises(ValueError, match="regularizer_output='logits' is not accepted"):
        make_objective("trades", apply_fn, pgd(), regularizer_output="logits")


def test_pgd_at_with_fgsm_reaches_the_corner_in_one_step():
    fgsm = AttackSpec("fgsm", eps=0.1, step_size=0.1, steps=1, random_start=False)
    loss, _ = make_objective("pgd_at", apply_fn, fgsm)(PARAMS, {}, BATCH, KEY)
    assert float(loss[0]) == pytest.approx(softplus(-0.2), rel=1e-5)
