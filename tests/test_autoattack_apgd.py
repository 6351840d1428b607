"""APGD and APGD-T of jax_memat.attacks.autoattack: losses, schedule, closed-form optimum.

The step-size rule is checked on constructed loss sequences through
``apgd_halvings`` (the function the attack loop calls); the attack itself on
a linear model whose minimal adversarial perturbation is known in closed
form. Compiled attacks are cached per logits function, so the tests share
module-level model functions and shapes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring

from jax_memat.attacks.autoattack import (
    apgd,
    apgd_checkpoints,
    apgd_halvings,
    apgd_targeted,
    dlr_loss,
    target_by_rank,
    targeted_dlr_loss,
)

# A lowering happens on every (re)compilation, also when the persistent
# compilation cache of the test set-up then skips the backend compile.
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


# ----------------------------------------------------------------------------
# Losses.


def _sorted_desc(z):
    return np.sort(z)[::-1]


def test_dlr_loss_matches_formula():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(12, 10)).astype(np.float32)
    y = rng.integers(0, 10, 12)
    y[:4] = np.argmax(z[:4], 1)  # the true class on top for some rows
    expected = []
    for zi, yi in zip(z.astype(np.float64), y, strict=True):
        s = _sorted_desc(zi)
        other = np.max(np.delete(zi, yi))
        expected.append(-(zi[yi] - other) / (s[0] - s[2] + 1e-12))
    np.testing.assert_allclose(dlr_loss(jnp.asarray(z), jnp.asarray(y)), expected, rtol=1e-5)


def test_targeted_dlr_loss_matches_formula():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(12, 10)).astype(np.float32)
    y = rng.integers(0, 10, 12)
    t = (y + rng.integers(1, 10, 12)) % 10
    expected = []
    for zi, yi, ti in zip(z.astype(np.float64), y, t, strict=True):
        s = _sorted_desc(zi)
        expected.append(-(zi[yi] - zi[ti]) / (s[0] - (s[2] + s[3]) / 2 + 1e-12))
    got = targeted_dlr_loss(jnp.asarray(z), jnp.asarray(y), jnp.asarray(t))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_target_by_rank_is_the_rth_largest_clean_logit():
    z = jnp.array([[0.1, 3.0, 2.0, -1.0, 5.0]])
    assert [int(target_by_rank(z, r)[0]) for r in range(1, 6)] == [4, 1, 2, 0, 3]


# ----------------------------------------------------------------------------
# Checkpoints and the step-size rule.


def test_checkpoints_for_100_iterations():
    assert apgd_checkpoints(100) == [21, 40, 56, 69, 79, 86, 92, 98]


@pytest.mark.parametrize(
    "n_iter, expected",
    [
        (1, [0]),
        # k = 2, then k - 1 down to 1.
        (10, [1, 2, 3, 4, 5, 6, 7, 8, 9]),
        # k = 11, then -1 per checkpoint, never below 3.
        (50, [10, 20, 29, 37, 44]),
    ],
)
def test_checkpoints_for_other_lengths(n_iter, expected):
    assert apgd_checkpoints(n_iter) == expected


class _Seq:
    """Builds a loss sequence step by step."""

    def __init__(self, first):
        self.values = [float(first)]

    def up(self, n, step=1.0):
        for _ in range(n):
            self.values.append(self.values[-1] + step)
        return self

    def down(self, n, step=0.5):
        for _ in range(n):
            self.values.append(self.values[-1] - step)
        return self

    def jump(self, delta):
        self.values.append(self.values[-1] + delta)
        return self

    def fill(self, n_iter=100):
        # Strictly increasing to the end: no later halving from either condition.
        return self.up(n_iter - len(self.values)).values


def _cases():
    """(name, losses[100], initial loss, expected halving iterations)."""
    cases = []
    # Always increasing: condition 1 never holds, the best always improves.
    cases.append(("increasing", _Seq(1.0).fill(), 0.0, []))
    # Flat: no increase in any window (the first one counts L_0 > 0 once).
    cases.append(("flat", [1.0] * 100, 1.0, [21, 40, 56, 69, 79, 86, 92, 98]))
    # First window: 16 increases among j = 1..21, plus j = 0 against the zero
    # slot. With L_0 > 0 that makes 17 > 16.5 (no halving); with L_0 < 0, 16.
    first = _Seq(1.0).up(16).down(5).fill()
    cases.append(("zero slot, L0 > 0", first, -1000.0, []))
    cases.append(("zero slot, L0 < 0", [v - 100.0 for v in first], -1000.0, [21]))
    # Third window (k = 16, threshold 12): "<=" means 12 increases halve, 13 do not.
    cases.append(("12 of 16", _Seq(1.0).up(40).up(12).down(4).fill(), 0.0, [56]))
    cases.append(("13 of 16", _Seq(1.0).up(40).up(13).down(3).fill(), 0.0, []))
    # Condition 2: not halved at 21, and in the second window the loss rises 15
    # times out of 19 (> 14.25, condition 1 fails) but stays below the best.
    stall = _Seq(1.0).up(21).jump(-100.0).up(15).down(3)
    cases.append(("stalled", stall.jump(200.0).fill(), 0.0, [40]))
    # The same second window after a halving at 21: condition 2 does not apply.
    halved = _Seq(1.0)
    halved.values += [1.0] * 21
    halved.jump(-100.0).up(15).down(3)
    cases.append(("stalled after halving", halved.jump(200.0).fill(), 1.0, [21]))
    return cases


def test_halving_conditions_on_constructed_sequences():
    cases = _cases()
    losses = np.stack([np.asarray(c[1], np.float32) for c in cases], axis=1)
    assert losses.shape == (100, len(cases))
    initial = np.asarray([c[2] for c in cases], np.float32)
    halve = np.asarray(apgd_halvings(jnp.asarray(losses), jnp.asarray(initial)))
    for column, (name, _, _, expected) in enumerate(cases):
        assert list(np.flatnonzero(halve[:, column])) == expected, name


# ----------------------------------------------------------------------------
# The attack on a linear model with a known optimum.

_SHAPE = (4, 4, 2)
_DIM = 32
_W = np.random.default_rng(2).normal(size=_DIM).astype(np.float32)
_B0 = -float(_W @ np.full(_DIM, 0.5))  # the boundary passes through x = 0.5
EPS = {"linf": 0.05, "l2": 0.3}


def _linear_logits(v):
    """Class 0 vs class 1 (margin w.x + b); classes 2 and 3 are never reached."""
    m = v.reshape(v.shape[0], -1) @ _W + _B0
    low = jnp.full_like(m, -50.0)
    return jnp.stack([jnp.zeros_like(m), m, low, low - 1.0], axis=-1)


def _dual(norm):
    return np.abs(_W).sum() if norm == "linf" else np.linalg.norm(_W)


def _linear_points(norm, factors, seed=3):
    """Points of class 0 whose minimal perturbation is ``factor * eps``, away from the box."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.4, 0.6, (len(factors), _DIM))
    u = _W / np.linalg.norm(_W)
    target_margin = -np.asarray(factors) * EPS[norm] * _dual(norm)
    x = x + ((target_margin - (x @ _W + _B0)) / np.linalg.norm(_W))[:, None] * u
    assert 0.25 < x.min() and x.max() < 0.75  # the box plays no role
    return jnp.asarray(x.reshape(-1, *_SHAPE), jnp.float32), jnp.zeros(len(factors), jnp.int32)


def _dist(a, b, norm):
    d = np.asarray(a, np.float64).reshape(len(a), -1) - np.asarray(b, np.float64).reshape(
        len(b), -1
    )
    return np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)


# Breakable rows need 97% of eps, the others 103%.
_FACTORS = [0.97, 1.03] * 6


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "dlr_targeted"])
def test_apgd_reaches_the_closed_form_minimal_perturbation(norm, loss):
    x, y = _linear_points(norm, _FACTORS)
    target = jnp.ones_like(y) if loss == "dlr_targeted" else None
    x_adv, robust = apgd(
        _linear_logits, x, y, jax.random.key(0), eps=EPS[norm], norm=norm, loss=loss, target=target
    )
    breakable = np.asarray(_FACTORS) < 1
    np.testing.assert_array_equal(np.asarray(robust), ~breakable)
    pred = np.argmax(np.asarray(_linear_logits(x_adv)), 1)
    np.testing.assert_array_equal(pred == 0, ~breakable)
    dist = _dist(x_adv, x, norm)
    assert np.all(dist[breakable] <= EPS[norm] + 1e-6)
    assert np.all(dist[breakable] >= 0.97 * EPS[norm] * (1 - 1e-4))  # no shorter path exists
    np.testing.assert_array_equal(np.asarray(x_adv)[~breakable], np.asarray(x)[~breakable])
    if norm == "linf":
        # The optimum is the vertex eps * sign(w) (it raises w.x): APGD ends there.
        step = (np.asarray(x_adv) - np.asarray(x)).reshape(len(x), -1)[breakable]
        np.testing.assert_allclose(
            step, np.broadcast_to(EPS[norm] * np.sign(_W), step.shape), atol=2e-3
        )


def test_apgd_is_seeded_and_feasible():
    x, y = _linear_points("l2", _FACTORS)
    run = lambda k: apgd(_linear_logits, x, y, k, eps=EPS["l2"], norm="l2")  # noqa: E731
    a, b, other = run(jax.random.key(5)), run(jax.random.key(5)), run(jax.random.key(6))
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(other[0]))
    for x_adv in (a[0], other[0]):
        assert np.all(_dist(x_adv, x, "l2") <= EPS["l2"] + 1e-6)
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_apgd_targeted_breaks_exactly_the_reachable_points():
    x, y = _linear_points("linf", _FACTORS)
    x_adv, robust = apgd_targeted(
        _linear_logits, x, y, jax.random.key(0), eps=EPS["linf"], norm="linf", n_iter=100
    )
    np.testing.assert_array_equal(np.asarray(robust), np.asarray(_FACTORS) > 1)
    assert np.all(_dist(x_adv, x, "linf") <= EPS["linf"] + 1e-6)


def test_misclassified_and_masked_rows_are_returned_unchanged():
    x, y = _linear_points("linf", [0.5, 0.5, 0.5])
    y = y.at[0].set(1)  # misclassified from the start
    mask = jnp.array([True, False, True])
    x_adv, robust = apgd(
        _linear_logits, x, y, jax.random.key(0), eps=EPS["linf"], norm="linf", mask=mask, n_iter=5
    )
    np.testing.assert_array_equal(np.asarray(robust), [False, True, False])
    np.testing.assert_array_equal(np.asarray(x_adv)[:2], np.asarray(x)[:2])


# ----------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"norm": "l1"}, "norm must be one of"),
        ({"eps": 0.0}, "eps must be"),
        ({"eps": 8.0}, "eps must be"),  # L-inf radius in pixel units
        ({"eps": jnp.float32(0.1)}, "eps must be a Python float"),
        ({"n_iter": 0}, "n_iter must be"),
        ({"rho": 1.5}, "rho must be"),
        ({"loss": "cw"}, "loss must be one of"),
        ({"loss": "dlr_targeted"}, "needs target"),
        ({"target": jnp.zeros(3, jnp.int32)}, "only used with"),
    ],
)
def test_bad_arguments_raise_before_compiling(kwargs, match):
    # Inputs are made before listening: eager JAX ops compile too.
    x = jnp.asarray(np.full((3, *_SHAPE), 0.5, np.float32))
    y, key = jnp.asarray(np.zeros(3, np.int32)), jax.random.key(0)
    args = {"eps": 0.1, "norm": "linf"} | kwargs
    compiles = []
    monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event)
    )
    try:
        with pytest.raises(ValueError, match=match):
            apgd(_linear_logits, x, y, key, **args)
    finally:
        monitoring.clear_event_listeners()
    assert not [e for e in compiles if e in _COMPILE_EVENTS]


def test_targeted_dlr_needs_four_classes():
    three = lambda v: _linear_logits(v)[:, :3]  # noqa: E731
    x, y = jnp.full((2, *_SHAPE), 0.5), jnp.zeros(2, jnp.int32)
    with pytest.raises(ValueError, match="K >= 4"):
        apgd_targeted(three, x, y, jax.random.key(0), eps=0.1, norm="linf")
    with pytest.raises(ValueError, match="K >= 4"):
        apgd(three, x, y, jax.random.key(0), eps=0.1, norm="linf", loss="dlr_targeted", target=y)
