"""FAB-T (Croce & Hein, 2020): the targeted Fast Adaptive Boundary attack.

FAB looks for the adversarial point of *minimal* norm: it linearises the
decision boundary between the true class ``y`` and a target ``t`` at the
current iterate, projects both the iterate and the clean input onto that
hyperplane (intersected with the image box), and moves to a convex
combination of the two projections with a small overshoot; whenever the
iterate is adversarial it records it (if closer than the best so far) and
steps back towards the clean input. The standard version runs it without a
random start, so it is deterministic.

The projections (``project_linf``, ``project_l2``) are exact solutions of

    min ||d||_p  subject to  <w, t + d> = b,  0 <= t + d <= 1,

computed for a batch at once with no data-dependent control flow: both reduce
to finding the level ``lam`` at which ``sum_i a_i min(lam, p_i)`` reaches a
given value, by sorting the breakpoints ``p_i`` (prefix sums over the sorted
order and a search for the segment on which the value is met, ``O(d log d)``
per row), or, on the CPU where XLA's sort is slow, by bisection on the bit
patterns of float32 ``lam`` (31 passes over the row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_memat.attacks.autoattack import _common as c

# Infinite breakpoint of the L2 projection (coordinates that never saturate).
_BIG = 1e12
# Weights below this are treated as zero by the L2 projection (as the reference).
_TINY_WEIGHT = 1e-8
# "No adversarial point found yet".
_NO_DISTANCE = 1e10


def _orient(t: jax.Array, w: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Flips ``w`` per row so that ``c = <w, t> - b >= 0``; returns ``(w, c)``."""
    gap = jnp.sum(w * t, axis=1) - b
    sign = jnp.where(gap >= 0, 1.0, -1.0).astype(w.dtype)
    return w * sign[:, None], gap * sign


def _check_projection_args(t, w, b) -> None:
    if t.ndim != 2 or w.shape != t.shape or b.shape != t.shape[:1]:
        raise ValueError(
            f"points and w must be [B, D] and b [B]; got {t.shape}, {w.shape}, {b.shape}"
        )


SOLVERS = ("sort", "bisect")


def _level_by_sort(a: jax.Array, p: jax.Array, c: jax.Array) -> jax.Array:
    """``lam`` with ``sum_i a_i min(lam, p_i) = c`` from the sorted breakpoints."""
    # Breakpoints in increasing order. For lam in [p_(j-1), p_(j)] the reached
    # value is g(lam) = below_j + lam * left_j: below_j from the saturated
    # coordinates (k < j), left_j the weight of the others (k >= j).
    order = jnp.argsort(p, axis=1)
    p_s = jnp.take_along_axis(p, order, axis=1)
    a_s = jnp.take_along_axis(a, order, axis=1)
    below = jnp.cumsum(a_s * p_s, axis=1) - a_s * p_s  # sum over k < j
    left = jnp.flip(jnp.cumsum(jnp.flip(a_s, 1), axis=1), 1)  # sum over k >= j
    reached = below + p_s * left  # g(p_(j)), non-decreasing in j

    # The segment: the first breakpoint at which g exceeds c.
    n = p.shape[1]
    j = jnp.min(jnp.where(reached > c[:, None], jnp.arange(n), n), axis=1)
    jj = jnp.minimum(j, n - 1)[:, None]
    below_j = jnp.take_along_axis(below, jj, axis=1)[:, 0]
    left_j = jnp.take_along_axis(left, jj, axis=1)[:, 0]
    lam = jnp.maximum((c - below_j) / jnp.where(left_j > 0, left_j, 1.0), 0.0)
    return jnp.where(j < n, lam, jnp.inf)


def _level_by_bisection(a: jax.Array, p: jax.Array, c: jax.Array) -> jax.Array:
    """``lam`` with ``sum_i a_i min(lam, p_i) = c`` by bisection on float32 bit patterns.

    Non-negative float32 numbers order as their bit patterns do, so bisecting
    the integers between 0 and ``max_i p_i`` ends, after 31 halvings, on two
    adjacent floats ``lo < hi`` with ``g(lo) <= c < g(hi)``. No breakpoint lies
    strictly between them, so the saturated set is ``p_i <= lo``, the free one
    ``p_i >= hi``, and ``lam`` follows in closed form as in the sorted
    version. Each halving is one pass over the row (no sort).
    """
    # Breakpoints below 0 (a point outside the box) are saturated at every
    # lam >= 0: they enter the sums as they are, only the search starts at 0.
    p = p.astype(jnp.float32)
    a = a.astype(jnp.float32)

    def reached(bits):
        lam = jax.lax.bitcast_convert_type(bits, jnp.float32)
        return jnp.sum(a * jnp.minimum(lam[:, None], p), axis=1)

    top = jnp.maximum(jnp.max(p, axis=1), 0.0)
    feasible = jnp.sum(a * p, axis=1) > c
    hi = jax.lax.bitcast_convert_type(top, jnp.int32)
    lo = jnp.zeros_like(hi)

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        above = reached(mid) > c
        return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

    # 2^31 > the bit pattern of any finite float32, so 31 halvings close the gap.
    lo, hi = jax.lax.fori_loop(0, 31, halve, (lo, hi), unroll=True)
    lo_f = jax.lax.bitcast_convert_type(lo, jnp.float32)
    hi_f = jax.lax.bitcast_convert_type(hi, jnp.float32)
    left = jnp.sum(jnp.where(p >= hi_f[:, None], a, 0.0), axis=1)
    below = jnp.sum(jnp.where(p <= lo_f[:, None], a * p, 0.0), axis=1)
    lam = jnp.clip((c - below) / jnp.where(left > 0, left, 1.0), lo_f, hi_f)
    return jnp.where(feasible, lam, jnp.inf)


def _check_solver(solver: str | None) -> None:
    if solver is not None and solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: use one of {SOLVERS} or None (by platform).")


def _saturation_level(a: jax.Array, p: jax.Array, c: jax.Array, solver: str | None) -> jax.Array:
    """Solves ``sum_i a_i min(lam, p_i) = c`` (``a, p >= 0``, ``c >= 0``) per row.

    ``inf`` where even ``lam = max p`` does not reach ``c``. ``"bisect"``
    works in float32 whatever the input dtype. ``solver=None`` sorts inputs
    that are not float32 and otherwise bisects on the CPU, where XLA's sort
    took half of FAB-T's time (15 ms of 29 ms per iteration on 100 rows of
    784), and sorts elsewhere.
    """
    if solver == "sort":
        return _level_by_sort(a, p, c)
    if solver == "bisect":
        return _level_by_bisection(a, p, c)
    if p.dtype != jnp.float32:  # the bisection is on float32 bit patterns
        return _level_by_sort(a, p, c)
    return jax.lax.platform_dependent(a, p, c, cpu=_level_by_bisection, default=_level_by_sort)


def project_linf(
    points: jax.Array, w: jax.Array, b: jax.Array, *, solver: str | None = None
) -> jax.Array:
    """Minimal L-inf step onto the hyperplane ``<w, v> = b`` within the box ``[0, 1]``.

    With ``(w, b)`` oriented so that ``c = <w, t> - b >= 0``, coordinate ``i``
    moves by ``dir_i * min(lam, p_i)``: towards 1 (``dir_i = +1``, room
    ``p_i = 1 - t_i``) where ``w_i < 0``, towards 0 (``dir_i = -1``, room
    ``p_i = t_i``) where ``w_i > 0``; ``lam >= 0`` solves
    ``sum_i |w_i| min(lam, p_i) = c``. Where even full saturation
    (``lam = inf``) does not reach the hyperplane, the fully saturated step
    ``dir_i p_i`` is returned (the box point closest to it). Coordinates with
    ``w_i = 0`` do not move.

    Args:
      points: ``[B, D]`` points ``t`` in ``[0, 1]``.
      w: ``[B, D]`` hyperplane normals.
      b: ``[B]`` offsets.
      solver: how ``lam`` is found, both exact up to float rounding:
        ``"sort"`` (sorted breakpoints and prefix sums, ``O(D log D)``),
        ``"bisect"`` (31 passes over the row), or None: bisection on the CPU,
        where XLA's sort is slow, the sort elsewhere.

    Returns:
      ``[B, D]`` steps ``d`` (``t + d`` is the projection).

    Example:
      >>> import jax.numpy as jnp
      >>> project_linf(jnp.array([[0.5, 0.5]]), jnp.array([[1.0, 1.0]]), jnp.array([0.75]))
      Array([[-0.125, -0.125]], dtype=float32)
    """
    _check_projection_args(points, w, b)
    _check_solver(solver)
    t = points
    w, gap = _orient(t, w, b)
    toward_one = w < 0
    direction = jnp.where(toward_one, 1.0, -1.0)
    room = jnp.where(toward_one, 1.0 - t, t)
    lam = _saturation_level(jnp.abs(w), room, gap, solver)
    d = direction * jnp.minimum(lam[:, None], room)
    return jnp.where(w != 0, d, 0.0).astype(points.dtype)


def project_l2(
    points: jax.Array, w: jax.Array, b: jax.Array, *, solver: str | None = None
) -> jax.Array:
    """Minimal L2 step onto the hyperplane ``<w, v> = b`` within the box ``[0, 1]``.

    With ``(w, b)`` oriented so that ``c = <w, t> - b >= 0``, the solution is
    ``d_i = -min(lam, r_i) w_i``: the point moves along ``-w`` until a
    coordinate hits the box face at ``r_i = t_i / w_i`` (``w_i > 0``) or
    ``(t_i - 1) / w_i`` (``w_i < 0``) and stays there; ``lam >= 0`` solves
    ``sum_i w_i^2 min(lam, r_i) = c``. Where full saturation is not enough the
    fully saturated step is returned. Weights with ``|w_i| < 1e-8`` are
    treated as zero (breakpoint ``1e12``; the coordinate does not move).

    Args:
      points: ``[B, D]`` points ``t`` in ``[0, 1]``.
      w: ``[B, D]`` hyperplane normals.
      b: ``[B]`` offsets.
      solver: as for ``project_linf``.

    Returns:
      ``[B, D]`` steps ``d``.

    Example:
      >>> import jax.numpy as jnp
      >>> project_l2(jnp.array([[0.5, 0.5]]), jnp.array([[1.0, 1.0]]), jnp.array([0.75]))
      Array([[-0.125, -0.125]], dtype=float32)
    """
    _check_projection_args(points, w, b)
    _check_solver(solver)
    t = points
    w, gap = _orient(t, w, b)
    small = jnp.abs(w) < _TINY_WEIGHT
    w = jnp.where(small, 0.0, w)
    safe_w = jnp.where(small, 1.0, w)
    r = jnp.clip(jnp.where(w > 0, t / safe_w, (t - 1.0) / safe_w), -_BIG, _BIG)
    r = jnp.where(small, _BIG, r)
    lam = _saturation_level(jnp.square(w), r, gap, solver)
    return (-jnp.minimum(lam[:, None], r) * w).astype(points.dtype)


_PROJECTIONS = {"linf": project_linf, "l2": project_l2}


def _fab(
    logits_fn: c.LogitsFn,
    x: jax.Array,
    y: jax.Array,
    target: jax.Array,
    mask: jax.Array | None,
    *,
    eps: float,
    norm: str,
    n_iter: int,
    alpha_max: float,
    eta: float,
    beta: float,
) -> tuple[jax.Array, jax.Array]:
    """One FAB-T run against one target per row (traceable); ``(x_adv, robust)``."""
    x = jax.lax.stop_gradient(x.astype(c.F32))
    shape, batch = x.shape, x.shape[0]
    clean_ok = c.predictions(logits_fn(x)) == y
    attacked = clean_ok if mask is None else clean_ok & mask
    x0 = x.reshape(batch, -1)
    project = _PROJECTIONS[norm]

    def boundary(x1):
        # f = z_t - z_y, one hyperplane per row: the gradient of the batch sum.
        def total(v):
            z = logits_fn(v.reshape(shape)).astype(c.F32)
            f = jnp.take_along_axis(z, target[:, None], axis=1)[:, 0]
            f = f - jnp.take_along_axis(z, y[:, None], axis=1)[:, 0]
            return jnp.sum(f), f

        (_, f), g = jax.value_and_grad(total, has_aux=True)(x1)
        return f, g

    def body(_, carry):
        x1, best, r_best = carry
        f, w = boundary(x1)
        b = -f + jnp.sum(w * x1, axis=1)
        # Both projections in one call of 2B rows, interleaved (x1_0, x0_0, x1_1, ...)
        # so that the rows of an example stay on its device.
        d = project(
            jnp.stack([x1, x0], 1).reshape(2 * batch, -1),
            jnp.repeat(w, 2, axis=0),
            jnp.repeat(b, 2, axis=0),
        ).reshape(batch, 2, -1)
        a = jnp.maximum(c.flat_norm(d.reshape(2 * batch, -1), norm), 1e-8).reshape(batch, 2)
        d1, d2, a1, a2 = d[:, 0], d[:, 1], a[:, 0], a[:, 1]
        alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
        x1 = jnp.clip((x1 + eta * d1) * (1.0 - alpha) + (x0 + d2 * eta) * alpha, 0.0, 1.0)
        adversarial = c.predictions(logits_fn(x1.reshape(shape))) != y
        dist = c.flat_norm(x1 - x0, norm)
        closer = adversarial & (dist < r_best)
        best = c.where_rows(closer, x1, best)
        r_best = jnp.where(closer, dist, r_best)
        # Step back towards the clean input from every adversarial iterate.
        x1 = c.where_rows(adversarial, x0 + (x1 - x0) * beta, x1)
        return x1, best, r_best

    r0 = jnp.full((batch,), _NO_DISTANCE, c.F32)
    _, best, r_best = jax.lax.fori_loop(0, n_iter, body, (x0, x0, r0))
    best = best.reshape(shape)
    # Success needs the returned point misclassified (re-evaluated) and within eps.
    still_ok = c.predictions(logits_fn(best)) == y
    fooled = attacked & (r_best < _NO_DISTANCE) & ~still_ok & (c.flat_norm(best - x, norm) <= eps)
    x_adv = c.where_rows(fooled, best, x)
    return jax.lax.stop_gradient(x_adv), clean_ok & ~fooled


def _fab_targeted(logits_fn, x, y, mask, *, n_targets, **kwargs):
    x = x.astype(c.F32)
    z = logits_fn(x)
    clean_ok = c.predictions(z) == y
    robust = clean_ok if mask is None else clean_ok & mask

    def body(r, carry):
        x_adv, robust = carry
        x_t, robust_t = _fab(logits_fn, x, y, c.target_by_rank(z, r + 2), robust, **kwargs)
        fooled = robust & ~robust_t
        return c.where_rows(fooled, x_t, x_adv), robust & ~fooled

    x_adv, robust_after = jax.lax.fori_loop(0, n_targets, body, (x, robust))
    return x_adv, clean_ok & ~(robust & ~robust_after)


def _check_fab_args(norm, eps, n_iter, alpha_max, eta, beta) -> dict:
    norm = c.check_norm(norm)
    return {
        "norm": norm,
        "eps": c.check_eps(eps, norm),
        "n_iter": c.check_int("n_iter", n_iter, low=1),
        "alpha_max": c.check_real("alpha_max", alpha_max, low=0.0, high=1.0),
        "eta": c.check_real("eta", eta, low=0.0),
        "beta": c.check_real("beta", beta, low=0.0, high=1.0),
    }


def fab_attack(
    logits_fn: c.LogitsFn,
    x: jax.Array,
    y: jax.Array,
    target: jax.Array,
    *,
    eps: float,
    norm: str,
    n_iter: int = 100,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """FAB-T against one given target class per example (no random start).

    From ``x1 = x0 = x``, each of ``n_iter`` iterations linearises
    ``f = z_t - z_y`` at ``x1``, projects ``x1`` and ``x0`` onto the hyperplane
    within the box (``project_linf``/``project_l2``: steps ``d1``, ``d2``),
    sets ``alpha = clip(|d1| / (|d1| + |d2|), 0, alpha_max)`` and moves to
    ``clip((1 - alpha)(x1 + eta d1) + alpha (x0 + eta d2), 0, 1)``. When that
    point is misclassified it becomes the best point if strictly closer to
    ``x0`` than the best so far, and ``x1`` steps back to
    ``x0 + beta (x1 - x0)``. A row is broken if its best point is
    misclassified and within ``eps`` of ``x``.

    Args:
      logits_fn: ``x -> [B, K]`` logits in inference mode.
      x: ``[B, ...]`` clean inputs in ``[0, 1]``.
      y: ``[B]`` labels.
      target: ``[B]`` target classes.
      eps: radius for success, a Python float.
      norm: ``"linf"`` or ``"l2"``.
      n_iter: iterations (100 in the standard version).
      alpha_max, eta, beta: FAB's step parameters (0.1, 1.05, 0.9).
      mask: optional ``[B]`` bool, rows to attack.

    Returns:
      ``(x_adv, robust)`` as ``apgd``: the minimal adversarial point found
      where the attack succeeded, ``x`` elsewhere.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[1.0, -1.0], [-1.0, 1.0]])
      >>> x, y = jnp.array([[0.55, 0.45]]), jnp.array([0])
      >>> x_adv, robust = fab_attack(lambda v: v @ w, x, y, jnp.array([1]),
      ...                            eps=0.1, norm="linf", n_iter=20)
      >>> robust, x_adv  # the closest boundary point is (0.5, 0.5)
      (Array([False], dtype=bool), Array([[0.4997..., 0.5002...]], dtype=float32))
    """
    kwargs = _check_fab_args(norm, eps, n_iter, alpha_max, eta, beta)
    c.check_batch(x, y)
    if c.num_classes(logits_fn, x) < 2 or target.shape != y.shape:
        raise ValueError(f"FAB-T needs K >= 2 classes and target of shape {y.shape}")
    return c.compiled(_fab, logits_fn, **kwargs)(x, y, target.astype(jnp.int32), mask)


def fab_targeted(
    logits_fn: c.LogitsFn,
    x: jax.Array,
    y: jax.Array,
    *,
    eps: float,
    norm: str,
    n_iter: int = 100,
    n_target_classes: int = 9,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """FAB-T as in the standard version: ``fab_attack`` on the clean-logit ranks 2, 3, ...

    Targets ``r = 2 .. min(n_target_classes, K - 1) + 1`` (the class with the
    ``r``-th largest clean logit), each run on the rows still robust after
    the previous ones. Deterministic.

    Args:
      logits_fn, x, y, eps, norm, n_iter, alpha_max, eta, beta, mask: as in
        ``fab_attack``.
      n_target_classes: how many targets (9 in the standard version).

    Returns:
      ``(x_adv, robust)`` as ``apgd``.

    Example:
      >>> import jax.numpy as jnp
      >>> x, y = jnp.array([[0.6, 0.55, 0.1]]), jnp.array([0])
      >>> fab_targeted(lambda v: v @ jnp.eye(3), x, y, eps=0.1, norm="linf")[1]
      Array([False], dtype=bool)
    """
    kwargs = _check_fab_args(norm, eps, n_iter, alpha_max, eta, beta)
    n_target_classes = c.check_int("n_target_classes", n_target_classes, low=1)
    c.check_batch(x, y)
    k = c.num_classes(logits_fn, x)
    if k < 2:
        raise ValueError(f"FAB-T needs K >= 2 classes, the model has {k}")
    run = c.compiled(_fab_targeted, logits_fn, n_targets=c.n_targets(n_target_classes, k), **kwargs)
    return run(x, y, mask)
