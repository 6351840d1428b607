"""APGD (Croce & Hein, 2020): step-size-free PGD with momentum and checkpoints.

This module holds the attack as the AutoAttack "standard" version runs it
(Croce & Hein, ICML 2020, arXiv:2003.01690, and the authors' release,
github.com/fra31/auto-attack): the cross-entropy, DLR and targeted-DLR
losses, the random start, the momentum step, best-point tracking and the
step-size halving at checkpoints, and APGD-T (targeted DLR on the classes
ranked 2, 3, ... by the clean logits).

Everything runs inside one ``jax.jit``: the iterations are a
``lax.fori_loop`` and every per-example decision is a ``jnp.where`` on a
fixed-size batch, so rows never leave the batch. The checkpoint positions
depend only on the number of iterations and are computed in Python.

The halving rule is a pure function of the loss sequence
(``apgd_halvings``), the very function the attack loop calls, so it can be
tested on constructed sequences.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_memat.attacks.autoattack import _common as c
from jax_memat.attacks.losses import cross_entropy

LOSSES = ("ce", "dlr", "dlr_targeted")

# The checkpoint schedule of the reference: first window 22% of the
# iterations, then 3% shorter each time, never below 6%.
_FIRST_WINDOW, _WINDOW_DECREASE, _MIN_WINDOW = 0.22, 0.03, 0.06


# ----------------------------------------------------------------------------
# Losses.


def dlr_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Difference-of-logits-ratio loss, one value per example.

    ``-(z_y - max_{j != y} z_j) / (z_(1) - z_(3) + 1e-12)`` with ``z`` sorted in
    decreasing order; scale invariant, positive once the example is
    misclassified.

    Args:
      logits: ``[B, K]`` logits, ``K >= 3``.
      labels: ``[B]`` true classes.

    Returns:
      ``[B]`` float32 losses (to maximise).

    Example:
      >>> import jax.numpy as jnp
      >>> dlr_loss(jnp.array([[3.0, 1.0, 2.0]]), jnp.array([0]))  # -(3-2)/(3-1)
      Array([-0.5], dtype=float32)
    """
    z = logits.astype(c.F32)
    is_true = jax.nn.one_hot(labels, z.shape[-1], dtype=jnp.bool_)
    z_true = jnp.sum(jnp.where(is_true, z, 0.0), axis=-1)
    z_other = jnp.max(jnp.where(is_true, -jnp.inf, z), axis=-1)
    top = jax.lax.top_k(z, 3)[0]
    return -(z_true - z_other) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr_loss(logits: jax.Array, labels: jax.Array, targets: jax.Array) -> jax.Array:
    """Targeted DLR loss, one value per example.

    ``-(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2 + 1e-12)`` with ``z`` sorted in
    decreasing order (the reference computes ``0.5 * (z_(3) + z_(4))``, which
    is the same number in floating point).

    Args:
      logits: ``[B, K]`` logits, ``K >= 4``.
      labels: ``[B]`` true classes.
      targets: ``[B]`` target classes.

    Returns:
      ``[B]`` float32 losses (to maximise).

    Example:
      >>> import jax.numpy as jnp
      >>> targeted_dlr_loss(jnp.array([[4.0, 3.0, 2.0, 0.0]]), jnp.array([0]),
      ...                   jnp.array([1]))  # -(4-3)/(4-(2+0)/2)
      Array([-0.33333334], dtype=float32)
    """
    z = logits.astype(c.F32)
    z_true = jnp.take_along_axis(z, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    z_target = jnp.take_along_axis(z, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]
    top = jax.lax.top_k(z, 4)[0]
    return -(z_true - z_target) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


# ----------------------------------------------------------------------------
# Checkpoints and the step-size rule.


def _window_lengths(n_iter: int) -> list[tuple[int, int]]:
    """``(iteration, window length)`` of every checkpoint for ``n_iter`` iterations."""
    k = max(int(_FIRST_WINDOW * n_iter), 1)
    decrease = max(int(_WINDOW_DECREASE * n_iter), 1)
    minimum = max(int(_MIN_WINDOW * n_iter), 1)
    out, since = [], 0
    for i in range(n_iter):
        since += 1
        if since == k:
            out.append((i, k))
            since, k = 0, max(k - decrease, minimum)
    return out


def apgd_checkpoints(n_iter: int) -> list[int]:
    """The 0-based iterations after which APGD may halve its step size.

    Args:
      n_iter: number of iterations, ``>= 1``.

    Returns:
      The checkpoint iterations, increasing.

    Example:
      >>> apgd_checkpoints(100)
      [21, 40, 56, 69, 79, 86, 92, 98]
    """
    n_iter = c.check_int("n_iter", n_iter, low=1)
    return [i for i, _ in _window_lengths(n_iter)]


class _Schedule(NamedTuple):
    """Per-example state of the step-size rule (all ``[B]``)."""

    best: jax.Array  # L_best: the highest loss so far (start point included)
    prev: jax.Array  # the previous iteration's loss (0 before the first one)
    n_up: jax.Array  # increases L_j > L_{j-1} since the last checkpoint
    best_at_check: jax.Array  # L_best at the last checkpoint
    reduced_at_check: jax.Array  # whether the step was halved at the last checkpoint


def _tables(n_iter: int, rho: float) -> tuple[np.ndarray, np.ndarray]:
    """Per iteration: is it a checkpoint, and the float32 threshold ``rho * k``."""
    is_check = np.zeros(n_iter, bool)
    threshold = np.zeros(n_iter, np.float32)
    for i, k in _window_lengths(n_iter):
        is_check[i] = True
        threshold[i] = np.float32(k * rho)
    return is_check, threshold


def _schedule_init(initial_loss: jax.Array, n_iter: int) -> _Schedule:
    # The first window compares L_0 with the zero-initialised last slot of the
    # reference's loss buffer; with a single iteration that slot is L_0 itself.
    prev = jnp.full_like(initial_loss, jnp.inf if n_iter == 1 else 0.0)
    return _Schedule(
        best=initial_loss,
        prev=prev,
        n_up=jnp.zeros(initial_loss.shape, jnp.int32),
        best_at_check=initial_loss,
        # "Halved last time" starts true: condition 2 never fires at the first check.
        reduced_at_check=jnp.ones(initial_loss.shape, jnp.bool_),
    )


def _schedule_step(
    state: _Schedule, loss: jax.Array, is_check: jax.Array, threshold: jax.Array
) -> tuple[_Schedule, jax.Array, jax.Array]:
    """One iteration of the rule: ``(state, improved, halve)``, all per example."""
    n_up = state.n_up + (loss > state.prev).astype(jnp.int32)
    improved = loss > state.best  # strict: ties keep the earlier point
    best = jnp.where(improved, loss, state.best)
    oscillating = n_up.astype(c.F32) <= threshold  # condition 1 (<=, as the reference)
    stalled = ~state.reduced_at_check & (state.best_at_check >= best)  # condition 2
    halve = is_check & (oscillating | stalled)
    state = _Schedule(
        best=best,
        prev=loss,
        n_up=jnp.where(is_check, 0, n_up),
        best_at_check=jnp.where(is_check, best, state.best_at_check),
        reduced_at_check=jnp.where(is_check, halve, state.reduced_at_check),
    )
    return state, improved, halve


def apgd_halvings(losses: jax.Array, initial_loss: jax.Array, *, rho: float = 0.75) -> jax.Array:
    """Where APGD halves its step size, for a given sequence of losses.

    Runs APGD's step-size rule (the same code as the attack loop) on
    ``losses[i]``, the loss after iteration ``i``, starting from
    ``initial_loss``, the loss at the start point. At each checkpoint
    (``apgd_checkpoints``) with window length ``k`` the step is halved where
    (1) at most ``rho * k`` of the window's iterations increased the loss
    (the first window compares ``L_0`` with 0), or (2) the step was not
    halved at the previous checkpoint and the best loss has not improved
    since.

    Args:
      losses: ``[N, B]`` losses of iterations ``0 .. N-1``.
      initial_loss: ``[B]`` losses at the start point.
      rho: the fraction of the window that must increase, ``(0, 1]``.

    Returns:
      ``[N, B]`` bool: True where the step is halved after iteration ``i``
      (only ever at checkpoints).

    Example:
      >>> import jax.numpy as jnp
      >>> flat = jnp.ones((100, 1))  # no increase after L_0: halve at every checkpoint
      >>> jnp.nonzero(apgd_halvings(flat, jnp.ones(1))[:, 0])[0]
      Array([21, 40, 56, 69, 79, 86, 92, 98], dtype=int32)
    """
    rho = c.check_real("rho", rho, low=0.0, high=1.0)
    losses = jnp.asarray(losses, c.F32)
    if losses.ndim != 2 or losses.shape[0] < 1:
        raise ValueError(f"losses must be [N >= 1, B], got shape {losses.shape}")
    initial_loss = jnp.asarray(initial_loss, c.F32)
    if initial_loss.shape != losses.shape[1:]:
        raise ValueError(f"initial_loss must be [B] = {losses.shape[1:]}, got {initial_loss.shape}")
    n_iter = losses.shape[0]
    is_check, threshold = _tables(n_iter, rho)

    def body(state, inputs):
        loss, check, thr = inputs
        state, _, halve = _schedule_step(state, loss, check, thr)
        return state, halve

    _, halve = jax.lax.scan(
        body, _schedule_init(initial_loss, n_iter), (losses, is_check, threshold)
    )
    return halve


# ----------------------------------------------------------------------------
# The attack.


def _project_linf(v: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    return jnp.clip(jnp.minimum(jnp.maximum(v, x - eps), x + eps), 0.0, 1.0)


def _project_l2(v: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    d = v - x
    n = c.expand(c.flat_norm(d, "l2"), d)
    return jnp.clip(x + d / (n + 1e-12) * jnp.minimum(eps, n), 0.0, 1.0)


def _start(x: jax.Array, key: jax.Array, eps: float, norm: str) -> jax.Array:
    if norm == "linf":
        t = 2.0 * jax.random.uniform(key, x.shape, c.F32) - 1.0
    else:
        t = jax.random.normal(key, x.shape, c.F32)
    t = t / (c.expand(c.flat_norm(t, norm), t) + 1e-12)
    return jnp.clip(x + eps * t, 0.0, 1.0)


def _loss_fn(loss: str, y: jax.Array, target: jax.Array | None):
    if loss == "ce":
        return lambda z: cross_entropy(z.astype(c.F32), y)
    if loss == "dlr":
        return lambda z: dlr_loss(z, y)
    return lambda z: targeted_dlr_loss(z, y, target)


def _apgd(
    logits_fn: c.LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    target: jax.Array | None,
    mask: jax.Array | None,
    *,
    eps: float,
    norm: str,
    n_iter: int,
    loss: str,
    rho: float,
) -> tuple[jax.Array, jax.Array]:
    """One APGD run (traceable); returns ``(x_adv, robust)`` as ``apgd``."""
    x = jax.lax.stop_gradient(x.astype(c.F32))
    clean_ok = c.predictions(logits_fn(x)) == y
    attacked = clean_ok if mask is None else clean_ok & mask
    per_example = _loss_fn(loss, y, target)

    def loss_and_grad(v):
        def total(v):
            z = logits_fn(v)
            values = per_example(z)
            return jnp.sum(values), (values, z)

        (_, (values, z)), g = jax.value_and_grad(total, has_aux=True)(v)
        return values, c.predictions(z) == y, g

    project = (
        functools.partial(_project_linf, x=x, eps=eps)
        if norm == "linf"
        else functools.partial(_project_l2, x=x, eps=eps)
    )
    is_check, threshold = (jnp.asarray(t) for t in _tables(n_iter, rho))

    x0 = _start(x, key, eps, norm)
    loss0, ok0, g0 = loss_and_grad(x0)
    step0 = jnp.full(x.shape[:1], 2.0 * eps, c.F32)

    def body(i, carry):
        x_cur, x_old, g, x_best, g_best, x_best_adv, ok, step, sched = carry
        a = jnp.where(i == 0, 1.0, 0.75).astype(c.F32)
        momentum = x_cur - x_old
        x_old = x_cur
        s = c.expand(step, x)
        if norm == "linf":
            z = project(x_cur + s * jnp.sign(g))
        else:
            z = project(x_cur + s * g / (c.expand(c.flat_norm(g, "l2"), g) + 1e-12))
        x_new = project(x_cur + (z - x_cur) * a + momentum * (1.0 - a))

        values, ok_now, g_new = loss_and_grad(x_new)
        # The last misclassified iterate is the one returned.
        x_best_adv = c.where_rows(~ok_now, x_new, x_best_adv)
        ok = ok & ok_now
        sched, improved, halve = _schedule_step(sched, values, is_check[i], threshold[i])
        x_best = c.where_rows(improved, x_new, x_best)
        g_best = c.where_rows(improved, g_new, g_best)
        # At a checkpoint that halves: restart from the best point (x_old is kept).
        step = jnp.where(halve, step / 2.0, step)
        x_cur = c.where_rows(halve, x_best, x_new)
        g = c.where_rows(halve, g_best, g_new)
        return x_cur, x_old, g, x_best, g_best, x_best_adv, ok, step, sched

    carry = (x0, x0, g0, x0, g0, x0, ok0, step0, _schedule_init(loss0, n_iter))
    carry = jax.lax.fori_loop(0, n_iter, body, carry)
    x_best_adv, ok = carry[5], carry[6]
    fooled = attacked & ~ok
    x_adv = c.where_rows(fooled, x_best_adv, x)
    return jax.lax.stop_gradient(x_adv), clean_ok & ~fooled


def _check_apgd_args(norm, eps, n_iter, rho) -> tuple[str, float, int, float]:
    norm = c.check_norm(norm)
    return (
        norm,
        c.check_eps(eps, norm),
        c.check_int("n_iter", n_iter, low=1),
        c.check_real("rho", rho, low=0.0, high=1.0),
    )


def apgd(
    logits_fn: c.LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    norm: str,
    n_iter: int = 100,
    loss: str = "ce",
    target: jax.Array | None = None,
    rho: float = 0.75,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """APGD with one random start, as in AutoAttack's standard version.

    From ``x0 = clip(x + eps * t / ||t||)`` (``t`` uniform in ``[-1, 1)`` for
    L-inf, Gaussian for L2) it takes ``n_iter`` momentum steps
    ``z = P(x_k + eta * s(g))``, ``x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))``
    (``a = 1`` at the first step, 0.75 after; ``s`` = sign for L-inf, ``g/||g||``
    for L2; ``P`` projects onto the ball, then clips to ``[0, 1]``), with the
    per-example step ``eta = 2 eps`` halved at the checkpoints of
    ``apgd_checkpoints`` by the rule of ``apgd_halvings`` (and the iterate
    reset to the best point). All iterations run; a point counts as broken
    if any iterate (start included) is misclassified, and the last
    misclassified iterate is returned for it.

    Only correctly classified rows (and, if given, rows of ``mask``) are
    attacked; the others are returned unchanged.

    Args:
      logits_fn: ``x -> [B, K]`` logits, a closure over the model in inference
        mode (examples must not interact).
      x: ``[B, ...]`` clean inputs in ``[0, 1]``.
      y: ``[B]`` integer labels.
      key: PRNG key of the random start.
      eps: radius, a Python float in ``(0, 1]`` (L-inf) or ``> 0`` (L2).
      norm: ``"linf"`` or ``"l2"``.
      n_iter: iterations, ``>= 1``.
      loss: ``"ce"``, ``"dlr"`` or ``"dlr_targeted"`` (needs ``target`` and
        ``K >= 4``).
      target: ``[B]`` target classes for ``"dlr_targeted"``.
      rho: the oscillation threshold of the step-size rule.
      mask: optional ``[B]`` bool, rows to attack.

    Returns:
      ``(x_adv, robust)``: ``x_adv`` holds the adversarial input where the
      attack succeeded and ``x`` elsewhere; ``robust[i]`` is True iff row
      ``i`` is correctly classified and was not broken.

    Raises:
      ValueError: on a bad norm, radius, iteration count, loss, target or
        class count, before anything compiles.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = jnp.array([[1.0, -1.0], [-1.0, 1.0]])
      >>> x, y = jnp.full((1, 2), 0.5), jnp.array([0])
      >>> x_adv, robust = apgd(lambda v: (v - 0.45) @ w, x, y, jax.random.key(0),
      ...                      eps=0.1, norm="linf", n_iter=10)
      >>> robust
      Array([False], dtype=bool)
    """
    norm, eps, n_iter, rho = _check_apgd_args(norm, eps, n_iter, rho)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    c.check_batch(x, y)
    k = c.num_classes(logits_fn, x)
    if loss == "dlr_targeted":
        if k < 4:
            raise ValueError(f"loss='dlr_targeted' needs K >= 4 classes, the model has {k}")
        if target is None or target.shape != y.shape:
            raise ValueError(f"loss='dlr_targeted' needs target of shape {y.shape}")
    elif target is not None:
        raise ValueError(f"target is only used with loss='dlr_targeted', not {loss!r}")
    if loss == "dlr" and k < 3:
        raise ValueError(f"loss='dlr' needs K >= 3 classes, the model has {k}")
    run = c.compiled(_apgd, logits_fn, eps=eps, norm=norm, n_iter=n_iter, loss=loss, rho=rho)
    return run(x, y, c.as_key(key), target, mask)


def _apgd_targeted(
    logits_fn: c.LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    mask: jax.Array | None,
    *,
    eps: float,
    norm: str,
    n_iter: int,
    rho: float,
    n_targets: int,
) -> tuple[jax.Array, jax.Array]:
    x = x.astype(c.F32)
    z = logits_fn(x)
    clean_ok = c.predictions(z) == y
    robust = clean_ok if mask is None else clean_ok & mask

    def body(r, carry):
        x_adv, robust = carry
        rank = r + 2
        x_t, robust_t = _apgd(
            logits_fn,
            x,
            y,
            jax.random.fold_in(key, rank),  # a fresh start per target
            c.target_by_rank(z, rank),
            robust,  # only the still-robust rows
            eps=eps,
            norm=norm,
            n_iter=n_iter,
            loss="dlr_targeted",
            rho=rho,
        )
        fooled = robust & ~robust_t
        return c.where_rows(fooled, x_t, x_adv), robust & ~fooled

    x_adv, robust_after = jax.lax.fori_loop(0, n_targets, body, (x, robust))
    fooled = robust & ~robust_after
    return x_adv, clean_ok & ~fooled


def apgd_targeted(
    logits_fn: c.LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    norm: str,
    n_iter: int = 100,
    n_target_classes: int = 9,
    rho: float = 0.75,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """APGD-T: APGD on the targeted DLR loss, one run per target class.

    For ranks ``r = 2 .. min(n_target_classes, K - 1) + 1`` the target of each
    example is the class with the ``r``-th largest clean logit; each run starts
    from a fresh random point (key ``fold_in(key, r)``) and attacks only the
    rows still robust after the previous targets.

    Args:
      logits_fn, x, y, key, eps, norm, n_iter, rho, mask: as in ``apgd``.
      n_target_classes: how many targets, ``>= 1`` (9 in the standard
        version; capped at ``K - 1``).

    Returns:
      ``(x_adv, robust)`` as ``apgd``.

    Raises:
      ValueError: as ``apgd``, and if the model has fewer than 4 classes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = jnp.eye(4)
      >>> x, y = jnp.array([[0.6, 0.55, 0.1, 0.1]]), jnp.array([0])
      >>> apgd_targeted(lambda v: v @ w, x, y, jax.random.key(0), eps=0.1,
      ...               norm="linf", n_iter=10)[1]
      Array([False], dtype=bool)
    """
    norm, eps, n_iter, rho = _check_apgd_args(norm, eps, n_iter, rho)
    n_target_classes = c.check_int("n_target_classes", n_target_classes, low=1)
    c.check_batch(x, y)
    k = c.num_classes(logits_fn, x)
    if k < 4:
        raise ValueError(f"APGD-T (targeted DLR loss) needs K >= 4 classes, the model has {k}")
    run = c.compiled(
        _apgd_targeted,
        logits_fn,
        eps=eps,
        norm=norm,
        n_iter=n_iter,
        rho=rho,
        n_targets=c.n_targets(n_target_classes, k),
    )
    return run(x, y, c.as_key(key), mask)
