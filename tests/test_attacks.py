"""Tests for jax_memat.attacks: losses, projection, PGD family and builders.

Models are tiny and defined here in plain JAX (an MLP and a linear binary
classifier) plus one Flax model with BatchNorm; the MLP is trained once per
module on synthetic 4-class "images" of shape 3x3x2 in [0, 1].
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_memat.attacks import (
    ATTACK_NAMES,
    NORMS,
    AttackSpec,
    cross_entropy,
    cw_margin,
    fgsm,
    kl_divergence,
    make_attack,
    pgd,
    project,
    soft_cross_entropy,
)
from tests.helpers import F32_EPS, mlp_apply, train_mlp

IMAGE_SHAPE = (3, 3, 2)
NUM_CLASSES = 4
# Radii per norm at which the trained MLP is neither untouched nor broken.
EPS = {"linf": 0.1, "l2": 0.35}
# Slack for results that are exact up to a few float32 roundings of values in
# [0, 1]: x + delta and the projection round each coordinate once, and an L2
# distance feels those errors only along the perturbation (to first order).
TOL = 8 * F32_EPS
# One batch shape for every model: each new shape recompiles the random start (~1 s).
BATCH = 64


# ----------------------------------------------------------------------------
# Models and data.


def _make_data(seed, n):
    # NumPy, not jax.random: eager JAX ops each compile, which costs seconds on CPU.
    rng = np.random.default_rng(seed)
    means = rng.uniform(0.2, 0.8, (NUM_CLASSES, *IMAGE_SHAPE))
    y = rng.integers(0, NUM_CLASSES, n)
    x = means[y] + 0.2 * rng.normal(size=(n, *IMAGE_SHAPE))
    # Clipping puts some pixels exactly on the box faces, which the attacks must respect.
    return jnp.asarray(np.clip(x, 0.0, 1.0), jnp.float32), jnp.asarray(y, jnp.int32)


@pytest.fixture(scope="module")
def trained():
    """A 2-layer MLP trained for 300 full-batch Adam steps; returns (variables, x, y)."""
    x, y = _make_data(0, 256)
    variables = train_mlp(x, y, NUM_CLASSES, seed=1)
    # Attack training points (the model fits them well: high natural accuracy).
    return variables, x[:BATCH], y[:BATCH]


def _linear_apply(variables, images, train):
    """Binary linear model with logits [0, w.x + b]."""
    del train
    margin = images.reshape(images.shape[0], -1) @ variables["w"] + variables["b"]
    return jnp.stack([jnp.zeros_like(margin), margin], axis=-1), {}


class _BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(8)(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return nn.Dense(NUM_CLASSES)(nn.relu(x))


def _bn_apply(variables, images, train):
    if train:
        return _BNNet().apply(variables, images, True, mutable=["batch_stats"])
    return _BNNet().apply(variables, images, False), {}


def _accuracy(logits, y):
    return float(np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(y)))


def _spec(name, norm, *, eps=None, random_start=True):
    """The attacks of the MLP tests: 10 steps of eps/4, FGSM one step of eps."""
    eps = EPS[norm] if eps is None else eps
    if name == "fgsm":
        return AttackSpec(name, eps, None, 1, norm, random_start)
    return AttackSpec(name, eps, EPS[norm] / 4, 10, norm, random_start)


def _dist(x_adv, x, norm):
    d = np.asarray(x_adv - x).reshape(x.shape[0], -1)
    return np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)


def _assert_feasible(x_adv, x, eps, norm):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert np.all(_dist(x_adv, x, norm) <= eps + TOL)
    x_adv = np.asarray(x_adv)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


# ----------------------------------------------------------------------------
# Losses against values worked by hand.

_LOGITS = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, -1.0, 2.0]])
_LABELS = jnp.array([2, 0, 1])


def test_cross_entropy_hand_values():
    # Row 0: log(1 + e^-1 + e^-2); row 1: log 3; row 2: 1 + log(e^5 + e^-1 + e^2).
    expected = [0.40760596, 1.09861229, 6.05094576]
    np.testing.assert_allclose(cross_entropy(_LOGITS, _LABELS), expected, rtol=16 * F32_EPS)
    # Stable for huge logits (a naive softmax would overflow).
    big = cross_entropy(jnp.array([[1000.0, 0.0]]), jnp.array([1]))
    np.testing.assert_allclose(big, [1000.0], rtol=16 * F32_EPS)


def test_soft_cross_entropy_hand_values():
    # Q = softmax([0, log 3]) = (1/4, 3/4); target (1/2, 1/2):
    # -(log(1/4) + log(3/4)) / 2 = 0.83698822.
    value = soft_cross_entropy(jnp.array([[0.0, np.log(3.0)]]), jnp.array([[0.5, 0.5]]))
    np.testing.assert_allclose(value, [0.83698822], rtol=16 * F32_EPS)
    one_hot = jax.nn.one_hot(_LABELS, 3)
    np.testing.assert_allclose(
        soft_cross_entropy(_LOGITS, one_hot), cross_entropy(_LOGITS, _LABELS), rtol=16 * F32_EPS
    )


def test_kl_divergence_hand_values():
    p = jnp.array([[0.0, 0.0]])  # P = (1/2, 1/2)
    q = jnp.array([[0.0, np.log(3.0)]])  # Q = (1/4, 3/4)
    # KL(P||Q) = (log 2 + log(2/3)) / 2 = log(4/3) / 2; KL(Q||P) = log(1/2)/4 + 3 log(3/2)/4.
    # KL is a difference of log-probabilities of size ~1 that cancel to ~0.14: the
    # float32 error is a few ulps of the log terms, not of the result.
    np.testing.assert_allclose(kl_divergence(p, q), [0.14384104], rtol=0, atol=16 * F32_EPS)
    np.testing.assert_allclose(kl_divergence(q, p), [0.13081204], rtol=0, atol=16 * F32_EPS)
    np.testing.assert_allclose(kl_divergence(_LOGITS, _LOGITS), [0.0, 0.0, 0.0], atol=F32_EPS)
    # Shift invariance and stability: P ~ (1, 0), Q ~ (0, 1) -> KL ~ 1000, finite.
    extreme = kl_divergence(jnp.array([[1000.0, 0.0]]), jnp.array([[5.0, 1005.0]]))
    np.testing.assert_allclose(extreme, [1000.0], rtol=16 * F32_EPS)


def test_cw_margin_hand_values():
    # max over the other classes minus the true logit: 2 - 3, 0 - 0, 5 - (-1).
    np.testing.assert_allclose(cw_margin(_LOGITS, _LABELS), [-1.0, 0.0, 6.0])
    # Gradient: +1 on the runner-up, -1 on the true class.
    grad = jax.grad(lambda z: jnp.sum(cw_margin(z, _LABELS)))(_LOGITS)
    np.testing.assert_allclose(grad[0], [0.0, 1.0, -1.0])
    np.testing.assert_allclose(grad[2], [1.0, -1.0, 0.0])


# ----------------------------------------------------------------------------
# Projection.


@pytest.mark.parametrize("norm", NORMS)
def test_project_matches_naive_loop(norm):
    rng = np.random.default_rng(0)
    delta = (
        rng.normal(size=(6, *IMAGE_SHAPE))
        * np.array([0.0, 1e-3, 0.05, 0.3, 1.0, 10.0])[:, None, None, None]
    )
    delta = delta.astype(np.float32)
    eps = 0.2
    expected = np.empty_like(delta)
    for i in range(delta.shape[0]):
        if norm == "linf":
            flat = [min(max(v, -eps), eps) for v in delta[i].ravel()]
            expected[i] = np.reshape(flat, IMAGE_SHAPE)
        else:
            length = np.sqrt(np.sum(delta[i].astype(np.float64) ** 2))
            expected[i] = delta[i] * (1.0 if length <= eps else eps / length)
    got = project(jnp.asarray(delta), eps, norm)
    np.testing.assert_allclose(got, expected, rtol=16 * F32_EPS, atol=F32_EPS)
    assert np.all(np.isfinite(np.asarray(got)))
    # The gradient of a projection stays finite at zero.
    grad = jax.grad(lambda d: jnp.sum(project(d, eps, norm)))(jnp.zeros((1, 4)))
    assert np.all(np.isfinite(np.asarray(grad)))


# ----------------------------------------------------------------------------
# Constraints and degenerate settings, for every attack and norm.


@pytest.fixture(scope="module")
def adversarial(trained):
    """``(name, norm) -> x_adv`` for ``_spec(name, norm)`` on the trained MLP, memoised.

    Each eager attack call compiles its loop (~0.3 s of CPU), so tests share them.
    """
    variables, x, y = trained
    cache = {}

    def get(name, norm):
        if (name, norm) not in cache:
            attack = make_attack(_spec(name, norm))
            cache[name, norm] = attack(mlp_apply, variables, x, y, jax.random.key(1))
        return cache[name, norm]

    return get


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_attack_stays_in_ball_and_box(trained, adversarial, name, norm):
    _, x, _ = trained
    x_adv = adversarial(name, norm)
    _assert_feasible(x_adv, x, EPS[norm], norm)
    assert np.all(_dist(x_adv, x, norm) > 0)  # It did move.


# Both norms and both random starts (uniform, normal); a jitted attack compiles in ~1 s of CPU.
@pytest.mark.parametrize("name, norm", [("pgd", "l2"), ("trades", "linf")])
def test_jit_matches_eager(trained, adversarial, name, norm):
    variables, x, y = trained
    attack = make_attack(_spec(name, norm))
    # Pure: jitted, with the model function closed over, it computes the same.
    jitted = jax.jit(lambda v, xs, ys, k: attack(mlp_apply, v, xs, ys, k))
    # Jit fuses the ops differently from the eager run, so iterates may differ by
    # a few roundings per step; L2 steps follow the normalized gradient, which
    # carries those differences into the next step (up to 11.5 ulps after 10
    # steps on an AMD EPYC; L-inf sign steps usually absorb them). 8 ulps of
    # values in [0, 1] per step, against a step of size eps / 4 ~ 0.1.
    atol = 8 * _spec(name, norm).steps * F32_EPS
    np.testing.assert_allclose(
        jitted(variables, x, y, jax.random.key(1)), adversarial(name, norm), rtol=0, atol=atol
    )


@pytest.mark.parametrize("norm", NORMS)
def test_raw_functions_stay_in_ball_and_box(trained, norm):
    variables, x, y = trained
    logits_fn = lambda v: mlp_apply(variables, v, False)[0]
    objective = lambda z: cross_entropy(z, y)
    eps, key = EPS[norm], jax.random.key(2)
    # FGSM with a random start (Wong et al.) and a step larger than eps.
    x_adv = fgsm(
        logits_fn, objective, x, key, eps=eps, init="uniform", step_size=1.25 * eps, norm=norm
    )
    _assert_feasible(x_adv, x, eps, norm)
    # A TRADES start with noise larger than eps: the start is not projected, the result is.
    x_adv = pgd(
        logits_fn,
        objective,
        x,
        key,
        eps=1e-3,
        step_size=1e-4,
        steps=1,
        init="normal",
        init_std=0.1,
        norm=norm,
    )
    _assert_feasible(x_adv, x, 1e-3, norm)


@pytest.mark.parametrize("norm", NORMS)
def test_zero_steps_returns_start_point(trained, norm):
    variables, x, y = trained
    logits_fn = lambda v: mlp_apply(variables, v, False)[0]
    objective = lambda z: cross_entropy(z, y)
    eps, key = EPS[norm], jax.random.key(3)
    run = lambda init, **kw: pgd(
        logits_fn, objective, x, key, eps=eps, step_size=0.0, steps=0, norm=norm, init=init, **kw
    )
    np.testing.assert_array_equal(run("none"), x)
    start = run("uniform")
    _assert_feasible(start, x, eps, norm)
    assert np.all(_dist(start, x, norm) > 0)
    if norm == "l2":
        # Uniform in the ball of dimension 18: radii mostly near eps, rarely tiny.
        radii = _dist(start, x, norm) / eps
        assert 0.8 < float(np.median(radii)) <= 1.0 + TOL
    start = run("normal", init_std=1e-3)
    _assert_feasible(start, x, eps, norm)
    assert 0 < float(np.abs(start - x).max()) < 0.01
    # Same key, same start: the start point is a pure function of the key.
    np.testing.assert_array_equal(run("uniform"), run("uniform"))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_zero_eps_returns_input(trained, name, norm):
    variables, x, y = trained
    x_adv = make_attack(_spec(name, norm, eps=0.0))(mlp_apply, variables, x, y, jax.random.key(4))
    np.testing.assert_array_equal(x_adv, x)


# ----------------------------------------------------------------------------
# Effectiveness on the trained MLP.


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", ["pgd", "cw", "trades"])
def test_attack_increases_its_objective(trained, adversarial, name, norm):
    variables, x, y = trained
    logits_fn = lambda v: mlp_apply(variables, v, False)[0]
    clean = logits_fn(x)
    objective = {
        "pgd": lambda z: cross_entropy(z, y),
        "cw": lambda z: cw_margin(z, y),
        "trades": lambda z: kl_divergence(clean, z),
    }[name]
    # The start point: the same attack with no steps and the same key.
    spec = dataclasses.replace(_spec(name, norm), steps=0)
    start = make_attack(spec)(mlp_apply, variables, x, y, jax.random.key(1))
    before = np.asarray(objective(logits_fn(start)))
    after = np.asarray(objective(logits_fn(adversarial(name, norm))))
    assert np.all(after >= before - 1e-4)
    assert np.mean(after - before) > 0.1


@pytest.mark.parametrize("norm", NORMS)
def test_accuracy_ordering(trained, adversarial, norm):
    variables, x, y = trained
    accuracy = lambda xs: _accuracy(mlp_apply(variables, xs, False)[0], y)
    natural = accuracy(x)
    fgsm_acc = accuracy(adversarial("fgsm", norm))
    pgd_acc = accuracy(adversarial("pgd", norm))
    cw_acc = accuracy(adversarial("cw", norm))
    assert natural >= 0.9
    assert pgd_acc <= fgsm_acc <= natural
    assert cw_acc <= fgsm_acc
    assert pgd_acc < natural - 0.1


# ----------------------------------------------------------------------------
# Closed-form optimum on a linear binary model.


@pytest.fixture(scope="module")
def linear():
    rng = np.random.default_rng(6)
    dim = int(np.prod(IMAGE_SHAPE))
    variables = {"w": jnp.asarray(rng.normal(size=dim), jnp.float32), "b": jnp.float32(0.1)}
    # Interior points: the box never binds at eps <= 0.2.
    x = jnp.asarray(rng.uniform(0.3, 0.7, (BATCH, *IMAGE_SHAPE)), jnp.float32)
    y = jnp.asarray(np.arange(BATCH) % 2, jnp.int32)
    return variables, x, y


def _linear_optimum(variables, x, y, eps, norm):
    # Raising the loss of label 1 lowers w.x (and raises it for label 0).
    w = np.asarray(variables["w"]).reshape(IMAGE_SHAPE)
    s = (2 * np.asarray(y) - 1)[:, None, None, None]
    direction = np.sign(w) if norm == "linf" else w / np.linalg.norm(w)
    return np.asarray(x) - eps * s * direction


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", ["pgd", "cw", "fgsm"])
def test_linear_model_reaches_closed_form_optimum(linear, name, norm):
    variables, x, y = linear
    eps = 0.2
    optimum = _linear_optimum(variables, x, y, eps, norm)
    key = jax.random.key(7)
    # Without a random start, and from a uniform one with enough steps
    # (L2 converges geometrically from a random start, hence the tolerance).
    for random_start, atol in ((False, TOL), (True, 1e-4)):
        if name == "cw" and not random_start:
            continue  # Same code path as pgd's; only the objective differs.
        if name == "fgsm":
            if random_start and norm == "l2":
                continue  # One step from a random L2 start does not reach the optimum.
            spec = AttackSpec(name, eps, 2 * eps if random_start else None, 1, norm, random_start)
        else:
            spec = AttackSpec(name, eps, eps / 4, 60, norm, random_start)
        x_adv = make_attack(spec)(_linear_apply, variables, x, y, key)
        np.testing.assert_allclose(x_adv, optimum, atol=atol)


@pytest.mark.parametrize("norm", NORMS)
def test_objective_extra_is_added(linear, norm):
    variables, x, y = linear
    eps = 0.2
    attack = make_attack(AttackSpec("pgd", eps, eps / 4, 20, norm, random_start=False))
    # A term that rewards the opposite margin much more than CE: the optimum flips.
    extra = lambda logits: 100.0 * (2 * y - 1) * (logits[:, 1] - logits[:, 0])
    x_adv = attack(_linear_apply, variables, x, y, None, objective_extra=extra)
    np.testing.assert_allclose(x_adv, _linear_optimum(variables, x, 1 - y, eps, norm), atol=TOL)


# ----------------------------------------------------------------------------
# Functional properties: jit, model state, inference mode.


def test_output_is_behind_stop_gradient(trained):
    variables, x, y = trained
    attack = make_attack(_spec("pgd", "linf"))
    grad = jax.grad(lambda xs: jnp.sum(attack(mlp_apply, variables, xs, y, jax.random.key(9))))(x)
    np.testing.assert_array_equal(grad, jnp.zeros_like(x))


@pytest.fixture(scope="module")
def bn_model():
    x, y = _make_data(10, BATCH)
    # Random variables of the right structure, without running (and compiling) init;
    # random running statistics make inference mode differ from the defaults.
    shapes = jax.eval_shape(lambda k: _BNNet().init(k, x, False), jax.random.key(0))
    rng = np.random.default_rng(11)
    draw = lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape) * rng.choice([-1, 1], s.shape))
    variables = jax.tree.map(draw, shapes)
    variables["batch_stats"]["BatchNorm_0"]["var"] = jnp.abs(
        variables["batch_stats"]["BatchNorm_0"]["var"]
    )
    return variables, x, y


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_attack_uses_inference_mode_and_leaves_variables(bn_model, name):
    variables, x, y = bn_model
    before = jax.tree.map(np.array, variables)
    modes = []

    def recording_apply(v, images, train):
        modes.append(train)
        return _bn_apply(v, images, train)

    attack = make_attack(_spec(name, "linf"))
    key = jax.random.key(12)
    # Two batches sharing example 0, attacked with the same key (so the same
    # random start for example 0); vmap runs both with one compilation, as two
    # separate calls would. In training mode BatchNorm would mix each batch and
    # example 0's results would differ (see the next test).
    batches = jnp.stack([x, _other_batch(x)])
    x_adv = jax.vmap(lambda xs: attack(recording_apply, variables, xs, y, key))(batches)
    assert modes and not any(modes)
    jax.tree.map(np.testing.assert_array_equal, variables, before)
    np.testing.assert_allclose(x_adv[1, 0], x_adv[0, 0], rtol=0, atol=TOL)
    assert not np.allclose(x_adv[1, 1:], x_adv[0, 1:])


def _other_batch(x):
    """The same first example, the others changed."""
    x = np.asarray(x)
    return jnp.asarray(np.concatenate([x[:1], 1.0 - x[1:]]))


def test_batch_independence_check_has_teeth(bn_model):
    # In training mode BatchNorm mixes the batch: example 0's logits change.
    variables, x, _ = bn_model
    logits = jax.jit(lambda xs: _bn_apply(variables, xs, True)[0][0])
    assert not np.allclose(logits(x), logits(_other_batch(x)))


# ----------------------------------------------------------------------------
# Argument validation.


def _raw_call(**overrides):
    kwargs = dict(eps=0.1, step_size=0.01, steps=2, norm="linf", init="uniform")
    kwargs.update(overrides)
    x = jnp.full((2, 3), 0.5)
    return pgd(lambda v: v[:, :2], lambda z: z[:, 0], x, jax.random.key(0), **kwargs)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"norm": "l1"}, r"norm must be one of \('linf', 'l2'\)"),
        ({"init": "gaussian"}, r"init must be one of \('uniform', 'normal', 'none'\)"),
        ({"eps": -0.1}, r"eps must be in \[0, 1\] under L-inf"),
        ({"eps": 8.0}, r"eps must be in \[0, 1\] under L-inf .*, got 8.0"),
        ({"eps": float("inf")}, "eps must be finite"),
        ({"eps": float("nan")}, "eps must be finite"),
        ({"eps": jnp.asarray(0.1)}, "eps must be a Python float"),
        ({"step_size": 0.0}, "step_size must be > 0 when steps > 0"),
        ({"steps": -1}, "steps must be a non-negative int"),
        ({"steps": 2.0}, "steps must be a non-negative int"),
        ({"steps": True}, "steps must be a non-negative int"),
        ({"init_std": -1.0}, "init_std must be >= 0"),
    ],
)
def test_pgd_rejects_bad_arguments(overrides, match):
    with pytest.raises(ValueError, match=match):
        _raw_call(**overrides)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="linf"):
        project(jnp.zeros((1, 2)), 0.1, "L2")
    with pytest.raises(ValueError, match="PRNG key"):
        pgd(
            lambda v: v, lambda z: z[:, 0], jnp.zeros((1, 2)), None, eps=0.1, step_size=0.1, steps=1
        )
    with pytest.raises(ValueError, match="one value per example"):
        pgd(
            lambda v: v,
            jnp.sum,
            jnp.zeros((2, 2)),
            None,
            eps=0.1,
            step_size=0.1,
            init="none",
            steps=1,
        )
    with pytest.raises(ValueError, match="norm must be one of"):
        fgsm(lambda v: v, lambda z: z[:, 0], jnp.zeros((1, 2)), None, eps=0.1, norm="linfinity")


@pytest.mark.parametrize(
    "spec, match",
    [
        (AttackSpec("pgd2", 0.1, 0.01, 10), r"\('fgsm', 'pgd', 'cw', 'trades'\)"),
        (AttackSpec("pgd", 0.1, 0.01, 10, norm="l1"), r"\('linf', 'l2'\)"),
        (AttackSpec("pgd", -0.1, 0.01, 10), r"eps must be in \[0, 1\] under L-inf .*, got -0.1"),
        (AttackSpec("pgd", 0.1, None, 10), "step_size must be a finite float > 0"),
        (AttackSpec("pgd", 0.1, 0.0, 10), "step_size must be a finite float > 0"),
        (AttackSpec("pgd", 0.1, 0.01, -1), "steps must be an int >= 0"),
        (AttackSpec("pgd", 0.1, 0.01, 10, random_start=1), "random_start must be True or False"),
        (AttackSpec("fgsm", 0.1, None, 10), "steps must be 1"),
        (AttackSpec("fgsm", 0.1, -1.0, 1), r"or None \(= eps\)"),
    ],
)
def test_spec_validation(spec, match):
    with pytest.raises(ValueError, match=match):
        spec.validate()
    with pytest.raises(ValueError, match=match):
        make_attack(spec)  # Eagerly, before any model or data is seen.


def test_valid_specs_pass():
    for name in ATTACK_NAMES:
        for norm in NORMS:
            _spec(name, norm).validate()
    AttackSpec("pgd", 0.0, 0.01, 0).validate()
