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
from jax_memat.objectives import Regularizer, StepInfo, make_objective
from tests.helpers import F32_EPS

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


def run(objective, *regularizers):
    """The objective's per-example loss and aux on the hand case, with regularizers."""
    info = StepInfo(step=jnp.int32(0), epoch=jnp.int32(1), key=KEY, regularizers=regularizers)
    return objective.loss(PARAMS, {}, objective.init(1, 2), BATCH, info)


def pgd(steps=10, random_start=False):
    return AttackSpec("pgd", eps=0.1, step_size=0.05, steps=steps, random_start=random_start)


def test_standard_is_cross_entropy():
    loss, aux = run(make_objective("standard", apply_fn))
    assert float(loss[0]) == pytest.approx(softplus(-0.5), rel=1e-6)  # 0.474077
    assert aux.per_example["logits"].shape == (1, 2)


def test_pgd_at_with_zero_steps_is_clean_cross_entropy():
    loss, _ = run(make_objective("pgd_at", apply_fn, pgd(steps=0)))
    assert float(loss[0]) == pytest.approx(softplus(-0.5), rel=1e-6)


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_at_reaches_the_worst_corner(random_start):
    # CE grows with w.x: the worst point is x + eps * sign(w) = (0.6, 0.4), w.x' = -0.2.
    loss_fn = make_objective("pgd_at", apply_fn, pgd(random_start=random_start))
    loss, _ = run(loss_fn)
    assert float(loss[0]) == pytest.approx(softplus(-0.2), rel=1e-5)  # 0.598139


def test_trades_is_natural_ce_plus_beta_kl_at_a_corner():
    # KL(p(x) || p(x')) grows as w.x' leaves w.x = -0.5 in either direction; the
    # start x + 0.001 N(0, 1) picks the side, and 10 steps reach that corner.
    beta = 6.0
    loss, aux = run(make_objective("trades", apply_fn, pgd(), beta=beta))
    candidates = [softplus(-0.5) + beta * kl_two_class(-0.5, z) for z in (-0.2, -0.8)]
    assert min(abs(float(loss[0]) - c) for c in candidates) < 1e-5
    assert set(aux.per_example) == {"logits", "logits_natural"}


def test_trades_beta_zero_is_natural_cross_entropy():
    loss, _ = run(make_objective("trades", apply_fn, pgd(), beta=0.0))
    assert float(loss[0]) == pytest.approx(softplus(-0.5), rel=1e-6)


def test_regularizers_enter_the_loss_and_the_attack_objective():
    const = Regularizer(lambda logits: jnp.full(logits.shape[0], 0.5), attack=False)
    loss, _ = run(make_objective("pgd_at", apply_fn, pgd()), const)
    assert float(loss[0]) == pytest.approx(softplus(-0.2) + 0.5, rel=1e-5)
    # R = -2 CE turns the attack objective into -CE: the attack now *lowers* the
    # loss, moving to x - eps * sign(w) = (0.4, 0.6), w.x' = -0.8; loss = -CE there.
    flip = Regularizer(lambda logits: -2 * cross_entropy(logits, Y), attack=True)
    loss, _ = run(make_objective("pgd_at", apply_fn, pgd()), flip)
    assert float(loss[0]) == pytest.approx(-softplus(-0.8), rel=1e-5)  # -0.371101


def test_several_regularizers_add_up():
    a = Regularizer(lambda logits: jnp.full(logits.shape[0], 0.5), attack=False)
    b = Regularizer(lambda logits: jnp.full(logits.shape[0], 0.25), attack=False)
    loss, _ = run(make_objective("standard", apply_fn), a, b)
    assert float(loss[0]) == pytest.approx(softplus(-0.5) + 0.75, rel=1e-5)


def test_trades_regularizer_output_and_attack_scaling():
    beta = 6.0
    trades = make_objective("trades", apply_fn, pgd(), beta=beta)
    # R = c * z: on the natural output z = -0.5; on the adversarial one, the corner.
    penalty = lambda logits: 0.1 * logits[:, 1]
    base, _ = run(trades)
    loss_nat, _ = run(trades, Regularizer(penalty, attack=False, output="natural"))
    loss_adv, aux = run(trades, Regularizer(penalty, attack=False, output="adversarial"))
    assert float(loss_nat[0] - base[0]) == pytest.approx(0.1 * -0.5, rel=1e-5)
    z_adv = float(aux.per_example["logits"][0, 1])
    assert float(loss_adv[0] - base[0]) == pytest.approx(0.1 * z_adv, rel=1e-4)
    # A huge attack regularizer favouring small z dominates beta * KL: the attack
    # goes to the corner w.x' = -0.8 whatever side the random start picked. Its
    # training-loss term is on the natural output, so the loss moves by -1e3 * z_nat.
    pull = Regularizer(lambda logits: -1e3 * logits[:, 1], attack=True)
    loss, aux = run(trades, pull)
    assert float(aux.per_example["logits"][0, 1]) == pytest.approx(-0.8, abs=1e-5)
    # w.x = 0.5 - 1.0 is exact in float32; a few ulps of slack for the fused matmul.
    assert float(aux.per_example["logits_natural"][0, 1]) == pytest.approx(-0.5, abs=4 * F32_EPS)


def test_trades_beta_zero_refuses_an_attack_regularizer():
    trades = make_objective("trades", apply_fn, pgd(), beta=0.0)
    with pytest.raises(ValueError, match="scaled by 1/beta; beta must be > 0"):
        run(trades, Regularizer(lambda logits: logits[:, 1], attack=True))


def test_bad_objective_input():
    with pytest.raises(ValueError, match="accepted objectives: standard, pgd_at, trades"):
        make_objective("mart", apply_fn, pgd())
    with pytest.raises(ValueError, match="needs an attack spec"):
        make_objective("pgd_at", apply_fn, None)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0, got -1.0"):
        make_objective("trades", apply_fn, pgd(), beta=-1.0)
    with pytest.raises(ValueError, match="output='logits' is not accepted"):
        Regularizer(lambda logits: logits[:, 0], output="logits")


def test_pgd_at_with_fgsm_reaches_the_corner_in_one_step():
    fgsm = AttackSpec("fgsm", eps=0.1, step_size=0.1, steps=1, random_start=False)
    loss, _ = run(make_objective("pgd_at", apply_fn, fgsm))
    assert float(loss[0]) == pytest.approx(softplus(-0.2), rel=1e-5)
