"""Square Attack of jax_memat.attacks.autoattack: schedule, windows, pattern, updates."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_memat.attacks.autoattack import p_schedule, square_attack, square_l2_pattern, square_side
from jax_memat.attacks.autoattack.square import _square

# ----------------------------------------------------------------------------
# Schedule, window sides, the L2 pattern.


def test_p_schedule_boundaries():
    expected = {
        0: 0.8, 10: 0.8, 11: 0.4, 50: 0.4, 51: 0.2, 200: 0.2, 201: 0.1, 500: 0.1,
        501: 0.05, 1000: 0.05, 1001: 0.025, 2000: 0.025, 2001: 0.0125, 4000: 0.0125,
        4001: 0.00625, 4999: 0.00625,
    }  # fmt: skip
    for i, p in expected.items():
        assert p_schedule(i) == pytest.approx(p, rel=1e-12), i
    # Not rescaled to the query budget: the same p whatever n_queries is.
    assert p_schedule(100, p_init=0.4) == pytest.approx(0.1)


def test_square_sides_on_32x32():
    levels = [0, 11, 51, 201, 501, 1001, 2001, 4001]
    linf = [square_side(p_schedule(i), 32, 32, "linf") for i in levels]
    l2 = [square_side(p_schedule(i), 32, 32, "l2") for i in levels]
    assert linf == [29, 20, 14, 10, 7, 5, 4, 3]
    assert l2 == [29, 21, 15, 11, 7, 5, 5, 3]  # at least 3, odd


def test_square_side_rounding_and_clipping():
    # sqrt(p h w) = 2.5 and 3.5 exactly: Python's round, half to even.
    assert square_side(0.25, 5, 5, "linf") == 2
    assert square_side(0.25, 7, 7, "linf") == 4
    assert square_side(0.25, 5, 5, "l2") == 3  # at least 3
    assert square_side(0.25, 7, 7, "l2") == 5  # 4 made odd
    assert square_side(0.0001, 32, 32, "linf") == 1  # at least 1
    assert square_side(0.8, 2, 2, "l2") == 2  # at most the image side
    assert square_side(0.8, 4, 16, "linf") == 4  # sqrt(51.2) -> 7, cut to min(h, w)


def _naive_half(a, b):
    """M(a, b) summed as nested squares: every k >= mu adds 1 / (k + 1)^2."""
    m = np.zeros((a, b))
    depth = max(a // 2, b // 2) + 1
    for k in range(depth):
        for i in range(a):
            for j in range(b):
                if max(abs(i - a // 2), abs(j - b // 2)) <= k:
                    m[i, j] += 1.0 / (k + 1) ** 2
    return m / np.linalg.norm(m) if a else m


@pytest.mark.parametrize("s", [1, 2, 3, 4, 5, 6, 9, 14, 29])
def test_l2_pattern_matches_its_definition(s):
    eta = square_l2_pattern(s)
    expected = np.concatenate([_naive_half(s // 2, s), -_naive_half(s - s // 2, s)])
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(eta, expected, rtol=1e-12)
    assert eta.shape == (s, s)
    assert np.all(eta[: s // 2] > 0) and np.all(eta[s // 2 :] < 0)


# ----------------------------------------------------------------------------
# The attack on a small fixed model.

_SHAPE = (8, 8, 2)
_RNG = np.random.default_rng(0)
_W1 = _RNG.normal(size=(128, 32)).astype(np.float32) / 4
_W2 = _RNG.normal(size=(32, 4)).astype(np.float32)


def _mlp(v):
    return jax.nn.relu(v.reshape(v.shape[0], -1) @ _W1 - 1.0) @ _W2


def _data(n=32, seed=1):
    x = np.random.default_rng(seed).uniform(size=(n, *_SHAPE)).astype(np.float32)
    x[:, :2] = np.round(x[:, :2])  # pixels on the box faces
    return jnp.asarray(x), jnp.argmax(_mlp(jnp.asarray(x)), -1).astype(jnp.int32)


def test_square_linf_moves_pixels_to_the_faces_and_breaks_points():
    x, y = _data()
    eps = 0.05
    x_adv, robust = square_attack(
        _mlp, x, y, jax.random.key(0), eps=eps, norm="linf", n_queries=300
    )
    x_adv, robust = np.asarray(x_adv), np.asarray(robust)
    assert 0 < robust.sum() < len(robust)
    np.testing.assert_array_equal(np.argmax(np.asarray(_mlp(x_adv)), -1) == np.asarray(y), robust)
    delta = x_adv[~robust] - np.asarray(x)[~robust]
    # Every pixel sits on a face of the eps-box, or on a face of [0, 1].
    on_face = (
        np.isclose(np.abs(delta), eps, atol=1e-6) | (x_adv[~robust] == 0) | (x_adv[~robust] == 1)
    )
    assert np.all(on_face)
    assert np.abs(delta).max() <= eps + 1e-6
    np.testing.assert_array_equal(x_adv[robust], np.asarray(x)[robust])


def test_square_l2_stays_in_the_ball_and_breaks_points():
    x, y = _data()
    eps = 0.5
    x_adv, robust = square_attack(_mlp, x, y, jax.random.key(0), eps=eps, norm="l2", n_queries=300)
    x_adv, robust = np.asarray(x_adv), np.asarray(robust)
    assert 0 < robust.sum() < len(robust)
    np.testing.assert_array_equal(np.argmax(np.asarray(_mlp(x_adv)), -1) == np.asarray(y), robust)
    norms = np.linalg.norm((x_adv - np.asarray(x)).reshape(len(x), -1), axis=1)
    assert norms.max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


def _spread(v, tau):
    """Class 1 once the pixels move far from 0.5 in total."""
    score = jnp.sum(jnp.abs(v - 0.5), axis=(1, 2, 3)) - tau
    return jnp.stack([jnp.zeros_like(score), score], -1)


def test_square_stops_when_no_point_is_active():
    dim = math.prod(_SHAPE)
    x, y = jnp.full((8, *_SHAPE), 0.5), jnp.zeros(8, jnp.int32)
    run = jax.jit(
        functools.partial(_square, eps=0.1, norm="linf", n_queries=50, p_init=0.8),
        static_argnums=0,
    )
    easy = functools.partial(_spread, tau=0.05 * dim)  # the start point already breaks all
    hard = functools.partial(_spread, tau=0.2 * dim)  # unbreakable within 0.1
    _, robust, iterations = run(easy, x, y, jax.random.key(0), None)
    assert int(iterations) == 0 and not np.any(np.asarray(robust))
    _, robust, iterations = run(hard, x, y, jax.random.key(0), None)
    assert int(iterations) == 50 and np.all(np.asarray(robust))
    # Rows outside the mask are not active either.
    _, robust, iterations = run(hard, x, y, jax.random.key(0), jnp.zeros(8, bool))
    assert int(iterations) == 0 and np.all(np.asarray(robust))


def test_square_rejects_bad_input():
    x, y = _data(2)
    with pytest.raises(ValueError, match="n_queries"):
        square_attack(_mlp, x, y, jax.random.key(0), eps=0.1, norm="linf", n_queries=0)
    with pytest.raises(ValueError, match="NHWC"):
        square_attack(_mlp, x.reshape(2, -1), y, jax.random.key(0), eps=0.1, norm="linf")
    with pytest.raises(ValueError, match="at least 5 pixels"):
        square_attack(_mlp, x[:, :4, :4], y, jax.random.key(0), eps=0.1, norm="l2")
