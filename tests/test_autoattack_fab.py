"""FAB-T of jax_memat.attacks.autoattack: exact projections and the attack.

The projections are checked against solvers that share none of their code:
the L-inf one against a linear program (scipy's HiGHS), the L2 one against a
float64 bisection on the multiplier of the KKT form ``clip(t - lam w, 0, 1)``,
on random problems of 3072 dimensions with zero (and, for L2, tiny) weights,
feasible and infeasible.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import sparse
from scipy.optimize import linprog

from jax_memat.attacks.autoattack import fab_attack, fab_targeted, project_l2, project_linf
from jax_memat.attacks.autoattack.fab import SOLVERS
from tests.helpers import F32_EPS

# ----------------------------------------------------------------------------
# Random problems.


def _problems(seed, rows, dim, reach, tiny=False):
    """Points t (some on the box faces), normals w (some zero or tiny) and offsets b.

    ``reach[i]`` is the fraction of the largest change of <w, v> the box allows
    in the direction of b: < 1 feasible, > 1 infeasible.
    """
    rng = np.random.default_rng(seed)
    t = rng.uniform(size=(rows, dim))
    t[:, : dim // 10] = rng.integers(0, 2, (rows, dim // 10))
    w = rng.normal(size=(rows, dim))
    w[:, dim // 10 : dim // 5] = 0.0
    if tiny:  # weights the L2 projection treats as zero, on every other row
        w[::2, -dim // 10 :] *= 1e-9
    up = np.sum(np.abs(w) * np.where(w > 0, 1 - t, t), axis=1)  # room to raise <w, v>
    down = np.sum(np.abs(w) * np.where(w > 0, t, 1 - t), axis=1)  # room to lower it
    raise_it = rng.random(rows) < 0.5
    b = np.sum(w * t, axis=1) + np.where(raise_it, up, -down) * np.asarray(reach)
    return t.astype(np.float32), w.astype(np.float32), b.astype(np.float32)


def _saturated(t, w, b):
    """The box point that moves <w, v> furthest towards b, as a step from t."""
    gap = w @ t - b
    toward_one = (w < 0) if gap >= 0 else (w > 0)
    return np.where(w == 0, 0.0, np.where(toward_one, 1.0 - t, -t))


def _lp_linf(t, w, b):
    """min ||d||_inf s.t. <w, t + d> = b, 0 <= t + d <= 1; None if infeasible."""
    dim = len(t)
    cost = np.zeros(dim + 1)
    cost[-1] = 1.0
    eye, ones = sparse.identity(dim, format="csr"), sparse.csr_matrix(np.ones((dim, 1)))
    a_ub = sparse.vstack([sparse.hstack([eye, -ones]), sparse.hstack([-eye, -ones])])
    a_eq = sparse.csr_matrix(np.append(w, 0.0)[None])
    bounds = [(-ti, 1.0 - ti) for ti in t] + [(0.0, None)]
    res = linprog(cost, a_ub, np.zeros(2 * dim), a_eq, [b - w @ t], bounds=bounds, method="highs")
    assert res.status in (0, 2), res.message
    return None if res.status == 2 else res.fun


def _bisect_l2(t, w, b, zero_below=1e-8):
    """The L2 projection as clip(t - lam w) with lam found by float64 bisection."""
    w = np.where(np.abs(w) < zero_below, 0.0, w)
    gap = w @ t - b
    if gap < 0:
        w, gap = -w, -gap
    reached = lambda lam: -(w @ (np.clip(t - lam * w, 0, 1) - t))  # noqa: E731
    hi = 1.0
    while reached(hi) < gap and hi < 1e15:
        hi *= 2
    if reached(hi) < gap:  # infeasible: saturate
        return np.clip(t - hi * w, 0, 1) - t
    lo = 0.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if reached(mid) < gap else (lo, mid)
    return np.clip(t - hi * w, 0, 1) - t


def _as_f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


# ----------------------------------------------------------------------------
# Projections.


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dim, rows", [(3072, 4), (12, 40)])
def test_project_linf_against_a_linear_program(dim, rows, solver):
    reach = np.where(np.arange(rows) % 4 == 3, 1.5, np.linspace(0.01, 0.99, rows))
    t, w, b = _problems(0, rows, dim, reach)
    d = project_linf(jnp.asarray(t), jnp.asarray(w), jnp.asarray(b), solver=solver)
    d = np.asarray(d, np.float64)
    t64, w64, b64 = _as_f64(t, w, b)
    for i in range(rows):
        optimum = _lp_linf(t64[i], w64[i], b64[i])
        if optimum is None:  # infeasible: full saturation towards the hyperplane
            assert reach[i] > 1
            np.testing.assert_allclose(d[i], _saturated(t64[i], w64[i], b64[i]), atol=1e-6)
            continue
        assert reach[i] < 1
        scale = np.abs(w64[i]).sum()
        assert abs(w64[i] @ (t64[i] + d[i]) - b64[i]) <= 1e-5 * scale
        assert np.all(t64[i] + d[i] >= -1e-6) and np.all(t64[i] + d[i] <= 1 + 1e-6)
        np.testing.assert_allclose(np.abs(d[i]).max(), optimum, rtol=1e-4, atol=1e-6)
        # Of the optimal steps, the one that moves every coordinate by
        # min(lam, room) (and zero-weight coordinates not at all).
        gap = w64[i] @ t64[i] - b64[i]
        toward_one = (w64[i] < 0) if gap >= 0 else (w64[i] > 0)
        room = np.where(toward_one, 1 - t64[i], t64[i])
        canonical = np.where(toward_one, 1.0, -1.0) * np.minimum(optimum, room)
        np.testing.assert_allclose(d[i], np.where(w64[i] == 0, 0.0, canonical), atol=1e-5)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dim, rows", [(3072, 16), (12, 40)])
def test_project_l2_against_bisection(dim, rows, solver):
    reach = np.where(np.arange(rows) % 4 == 3, 1.5, np.linspace(0.01, 0.99, rows))
    t, w, b = _problems(1, rows, dim, reach, tiny=True)
    d = project_l2(jnp.asarray(t), jnp.asarray(w), jnp.asarray(b), solver=solver)
    d = np.asarray(d, np.float64)
    t64, w64, b64 = _as_f64(t, w, b)
    for i in range(rows):
        expected = _bisect_l2(t64[i], w64[i], b64[i])
        # The multiplier comes from float32 sums over dim terms, whose order (and so
        # rounding) depends on the CPU's vector width: ~sqrt(dim) ulps of the step.
        atol = (16 + 4 * np.sqrt(dim)) * F32_EPS * max(1.0, np.abs(expected).max())
        np.testing.assert_allclose(d[i], expected, rtol=0, atol=atol)
        if reach[i] < 1:
            assert abs(w64[i] @ (t64[i] + d[i]) - b64[i]) <= 1e-5 * np.abs(w64[i]).sum()
        assert np.all(t64[i] + d[i] >= -1e-6) and np.all(t64[i] + d[i] <= 1 + 1e-6)
        assert np.all(d[i][np.abs(w64[i]) < 1e-8] == 0)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("project", [project_linf, project_l2])
def test_projection_edge_cases(project, solver):
    t = jnp.asarray([[0.5, 0.5], [0.5, 0.5], [0.2, 0.7]], jnp.float32)
    w = jnp.asarray([[1.0, 1.0], [0.0, 0.0], [1.0, -1.0]], jnp.float32)
    b = jnp.asarray([1.0, 3.0, -0.95], jnp.float32)
    d = np.asarray(project(t, w, b, solver=solver))
    np.testing.assert_array_equal(d[0], [0.0, 0.0])  # already on the hyperplane
    np.testing.assert_array_equal(d[1], [0.0, 0.0])  # all weights zero: nothing moves
    # The first coordinate saturates at 0 (room 0.2), the second moves 0.25.
    np.testing.assert_allclose(np.asarray(t[2]) + d[2], [0.0, 0.95], atol=1e-6)


@pytest.mark.parametrize("project", [project_linf, project_l2])
def test_solvers_agree_on_ties_and_saturated_rows(project):
    # Many equal breakpoints (coordinates at 0, 1 and repeated values) and rows
    # whose hyperplane lies beyond the box, where the search has no segment.
    rng = np.random.default_rng(5)
    t = rng.choice([0.0, 0.25, 0.5, 1.0], size=(64, 50)).astype(np.float32)
    w = rng.choice([-1.0, 0.0, 0.5, 2.0], size=(64, 50)).astype(np.float32)
    b = (np.sum(w * t, 1) - rng.uniform(-30, 30, size=64)).astype(np.float32)
    d_sort, d_bisect, d_auto = (
        np.asarray(project(*map(jnp.asarray, (t, w, b)), solver=s), np.float64)
        for s in ("sort", "bisect", None)
    )
    # lam comes from sums of 50 terms of size <= 2, summed in different orders.
    np.testing.assert_allclose(d_bisect, d_sort, rtol=0, atol=4 * 50 * 2 * F32_EPS)
    np.testing.assert_array_equal(d_auto, d_bisect if jax.default_backend() == "cpu" else d_sort)


@pytest.mark.parametrize("project", [project_linf, project_l2])
def test_solvers_agree_on_points_outside_the_box(project):
    # Public projections accept any points; a coordinate outside [0, 1] has a
    # negative breakpoint, saturated at every level, in both solvers.
    rng = np.random.default_rng(6)
    t = rng.uniform(-0.2, 1.2, size=(32, 40)).astype(np.float32)
    w = rng.normal(size=(32, 40)).astype(np.float32)
    b = (np.sum(w * t, 1) - rng.uniform(-3, 3, size=32)).astype(np.float32)
    d_sort, d_bisect = (
        np.asarray(project(*map(jnp.asarray, (t, w, b)), solver=s), np.float64)
        for s in ("sort", "bisect")
    )
    scale = max(1.0, float(np.abs(d_sort).max()))
    np.testing.assert_allclose(d_bisect, d_sort, rtol=0, atol=4 * 40 * 8 * F32_EPS * scale)


def test_unknown_solver_is_refused():
    with pytest.raises(ValueError, match="solver='heap'"):
        project_linf(jnp.zeros((1, 2)), jnp.ones((1, 2)), jnp.zeros(1), solver="heap")


# ----------------------------------------------------------------------------
# The attack on a linear model with a known optimum.

_DIM = 18
_W = np.random.default_rng(2).normal(size=_DIM).astype(np.float32)
_B0 = -float(_W @ np.full(_DIM, 0.5))


def _linear_logits(v):
    """Class 0 vs class 1 (margin w.x + b); classes 2 and 3 are never reached."""
    m = v.reshape(v.shape[0], -1) @ _W + _B0
    low = jnp.full_like(m, -50.0)
    return jnp.stack([jnp.zeros_like(m), m, low, low - 1.0], axis=-1)


def _points(n, seed=4):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.4, 0.6, (n, _DIM))
    x = x - np.maximum(x @ _W + _B0 + 0.3, 0)[:, None] * _W / (_W @ _W)  # margin <= -0.3
    return jnp.asarray(x.reshape(n, 3, 3, 2), jnp.float32), jnp.zeros(n, jnp.int32)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_finds_the_minimal_perturbation(norm):
    x, y = _points(8)
    margin = -(np.asarray(x).reshape(8, -1) @ _W + _B0)
    d_min = margin / (np.abs(_W).sum() if norm == "linf" else np.linalg.norm(_W))
    # The box plays no role: the optimum lies well inside it.
    assert np.all(np.abs(np.asarray(x).reshape(8, -1) - 0.5) + 1.1 * d_min[:, None] < 0.5)
    x_adv, robust = fab_attack(_linear_logits, x, y, jnp.ones_like(y), eps=1.0, norm=norm)
    assert not np.any(np.asarray(robust))
    step = (np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)).reshape(8, -1)
    dist = np.abs(step).max(1) if norm == "linf" else np.linalg.norm(step, axis=1)
    assert np.all(dist >= d_min * (1 - 1e-4)) and np.all(dist <= d_min * 1.006)
    # The closest boundary point: along sign(w) (L-inf) or w (L2).
    direction = np.sign(_W) if norm == "linf" else _W / np.linalg.norm(_W)
    np.testing.assert_allclose(step, dist[:, None] * direction, atol=0.01 * d_min.max())


def test_fab_targeted_is_deterministic_and_respects_eps():
    x, y = _points(8)
    margin = -(np.asarray(x).reshape(8, -1) @ _W + _B0)
    d_min = margin / np.abs(_W).sum()
    # FAB's overshoot (eta) and back-steps (beta) settle 0.52% above the
    # optimum on a linear model: no point may lie in that band.
    eps = 1.02 * float(d_min.min())
    breakable = d_min * 1.006 <= eps
    assert breakable.any() and not breakable.all() and np.all(breakable | (d_min > eps))
    a = fab_targeted(_linear_logits, x, y, eps=eps, norm="linf")
    b = fab_targeted(_linear_logits, x, y, eps=eps, norm="linf")
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), ~breakable)
    step = np.abs(np.asarray(a[0]) - np.asarray(x)).reshape(8, -1).max(1)
    assert np.all(step <= eps + 1e-6)
    np.testing.assert_array_equal(step[~breakable], 0.0)


def test_fab_rejects_bad_arguments():
    x, y = _points(2)
    with pytest.raises(ValueError, match="norm"):
        fab_targeted(_linear_logits, x, y, eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="beta"):
        fab_targeted(_linear_logits, x, y, eps=0.1, norm="linf", beta=2.0)
    with pytest.raises(ValueError, match="target"):
        fab_attack(_linear_logits, x, y, jnp.zeros(3, jnp.int32), eps=0.1, norm="linf")
