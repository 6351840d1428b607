"""Square Attack (Andriushchenko et al., 2020): score-based random search.

The attack only queries logits. It starts from a point on the boundary of
the ball (vertical stripes for L-inf, a grid of L2 "pulses" for L2) and
repeatedly redraws the perturbation in one random square window, shared by
the whole batch, keeping the candidate where it lowers the margin loss
``z_y - max_{j != y} z_j`` (or misclassifies). The window side shrinks with
the iteration count by the schedule of ``p_schedule``.

Implementation notes: the window has a traced position and (per schedule
level) size, so it is applied as a mask over the image, and the L2 pattern
comes from a small table with one entry per schedule level. "Only the
active points are queried" is emulated on a fixed-size batch: every row is
evaluated but only the active ones (margin still > 0) accept a candidate.
The loop is a ``lax.while_loop`` that stops when no row is active or the
queries run out. Images are NHWC.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_memat.attacks.autoattack import _common as c

# The 10,000-query schedule of the reference, not rescaled to n_queries: p is
# halved after each of these 0-based iterations.
_P_BOUNDARIES = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(i: int, p_init: float = 0.8) -> float:
    """The fraction ``p`` of the image a window covers at 0-based iteration ``i``.

    ``p_init`` up to iteration 10, then halved after iterations 50, 200, 500,
    1000, 2000, 4000 (and 6000, 8000, beyond the standard 5000 queries):
    0.8, 0.4, 0.2, 0.1, 0.05, 0.025, 0.0125, 0.00625 for ``p_init = 0.8``.

    Example:
      >>> [p_schedule(i) for i in (10, 11, 4999)]
      [0.8, 0.4, 0.00625]
    """
    level = sum(i > boundary for boundary in _P_BOUNDARIES)
    return p_init / 2**level


def square_side(p: float, h: int, w: int, norm: str) -> int:
    """The window side for fraction ``p`` of an ``h x w`` image.

    ``round(sqrt(p h w))`` (Python's round: half to even), at least 1 for
    L-inf, and for L2 at least 3 and made odd; finally at most ``min(h, w)``.

    Example:
      >>> square_side(0.8, 32, 32, "linf"), square_side(0.0125, 32, 32, "l2")
      (29, 5)
    """
    norm = c.check_norm(norm)
    s = round(math.sqrt(p * h * w))
    if norm == "linf":
        s = max(s, 1)
    else:
        s = max(s, 3)
        if s % 2 == 0:
            s += 1
    return min(s, h, w)


def _half_pattern(a: int, b: int) -> np.ndarray:
    """``M(a, b)``: nested squares around the centre, unit Frobenius norm (may be empty)."""
    if a == 0:
        return np.zeros((0, b))
    i = np.abs(np.arange(a) - a // 2)[:, None]
    j = np.abs(np.arange(b) - b // 2)[None, :]
    mu = np.maximum(i, j)
    depth = max(a // 2, b // 2) + 1
    # sum_{k=mu}^{depth-1} 1 / (k + 1)^2
    tail = np.cumsum((1.0 / np.arange(1, depth + 1) ** 2)[::-1])[::-1]
    m = tail[mu]
    return m / np.sqrt(np.sum(m**2))


def square_l2_pattern(s: int) -> np.ndarray:
    """The ``s x s`` L2 update ``eta(s)``: ``[M(s//2, s); -M(s - s//2, s)]``, unit norm.

    (Untransposed; the attack transposes it with probability 1/2.)

    Example:
      >>> import numpy as np
      >>> float(np.linalg.norm(square_l2_pattern(5)))
      1.0
    """
    top, bottom = _half_pattern(s // 2, s), _half_pattern(s - s // 2, s)
    eta = np.concatenate([top, -bottom], axis=0)
    return eta / np.sqrt(np.sum(eta**2))


def _margin(logits: jax.Array, y: jax.Array) -> jax.Array:
    z = logits.astype(c.F32)
    is_true = jax.nn.one_hot(y, z.shape[-1], dtype=jnp.bool_)
    z_true = jnp.sum(jnp.where(is_true, z, 0.0), axis=-1)
    return z_true - jnp.max(jnp.where(is_true, -jnp.inf, z), axis=-1)


def _rademacher(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.rademacher(key, shape, c.F32)


def _corner(key: jax.Array, room: jax.Array) -> jax.Array:
    """``floor(room * U)``, ``U ~ U[0, 1)``: a window corner in ``[0, room]``."""
    return jnp.floor(room * jax.random.uniform(key, (), c.F32)).astype(jnp.int32)


def _window(h: int, w: int, top: jax.Array, left: jax.Array, s: jax.Array) -> jax.Array:
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    return (rows >= top) & (rows < top + s) & (cols >= left) & (cols < left + s)


def _place(pattern: jax.Array, h: int, w: int, top: jax.Array, left: jax.Array) -> jax.Array:
    """A zero-padded ``S x S`` pattern written at ``(top, left)`` of an ``h x w`` canvas."""
    size = pattern.shape[0]
    canvas = jnp.zeros((h + size, w + size), pattern.dtype)
    return jax.lax.dynamic_update_slice(canvas, pattern, (top, left))[:h, :w]


def _levels(n_queries: int, p_init: float, h: int, w: int, norm: str) -> list[int]:
    """Window side of each schedule level reached within ``n_queries`` iterations."""
    last_level = sum(n_queries - 1 > boundary for boundary in _P_BOUNDARIES)
    return [square_side(p_init / 2**level, h, w, norm) for level in range(last_level + 1)]


def _linf_init(x, key, eps):
    b, _, w, ch = x.shape
    # One sign per (example, column, channel), shared down each column.
    return jnp.clip(x + eps * _rademacher(key, (b, 1, w, ch)), 0.0, 1.0)


def _l2_init(x, key, eps):
    b, h, w, ch = x.shape
    s = h // 5
    start = (h - 5 * s) // 2
    n_rows, n_cols = h // s, w // s
    # Tile (a, c) covers [start + a s, start + (a + 1) s) x [start + c s, ...);
    # tiles reaching past the border are cut, pixels outside the grid stay 0.
    i, j = np.arange(h) - start, np.arange(w) - start
    tile_i, tile_j = np.floor_divide(i, s), np.floor_divide(j, s)
    inside = ((i >= 0) & (tile_i < n_rows))[:, None] & ((j >= 0) & (tile_j < n_cols))[None, :]
    ti, tj = np.clip(tile_i, 0, n_rows - 1), np.clip(tile_j, 0, n_cols - 1)
    li, lj = np.mod(i, s), np.mod(j, s)
    flip_key, sign_key = jax.random.split(key)
    # Per tile: the pattern transposed with probability 1/2, a sign per (example, channel).
    flip = jax.random.uniform(flip_key, (n_rows, n_cols)) > 0.5
    signs = _rademacher(sign_key, (b, n_rows, n_cols, ch))
    pattern = jnp.asarray(square_l2_pattern(s), c.F32)
    value = jnp.where(
        flip[ti[:, None], tj[None, :]],
        pattern[lj[None, :], li[:, None]],
        pattern[li[:, None], lj[None, :]],
    )
    value = jnp.where(inside, value, 0.0)
    delta = value[None, :, :, None] * signs[:, ti[:, None], tj[None, :], :]
    norm = c.expand(c.flat_norm(delta, "l2"), delta)
    return jnp.clip(x + delta / (norm + 1e-12) * eps, 0.0, 1.0)


def _square(
    logits_fn: c.LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    mask: jax.Array | None,
    *,
    eps: float,
    norm: str,
    n_queries: int,
    p_init: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The attack (traceable): ``(x_adv, robust, iterations run)``."""
    x = jax.lax.stop_gradient(x.astype(c.F32))
    _, h, w, ch = x.shape
    clean_ok = c.predictions(logits_fn(x)) == y
    attacked = clean_ok if mask is None else clean_ok & mask

    sides = _levels(n_queries, p_init, h, w, norm)
    side_table = jnp.asarray(sides, jnp.int32)
    boundaries = jnp.asarray(_P_BOUNDARIES, jnp.int32)
    if norm == "l2":
        biggest = max(sides)
        table = np.zeros((len(sides), biggest, biggest), np.float32)
        for level, s in enumerate(sides):
            table[level, :s, :s] = square_l2_pattern(s)
        pattern_table = jnp.asarray(table)

    init_key, loop_key = jax.random.split(key)
    x_best = (_linf_init if norm == "linf" else _l2_init)(x, init_key, eps)
    x_best = c.where_rows(attacked, x_best, x)
    margin = _margin(logits_fn(x_best), y)

    def step_linf(i_key, x_best, s):
        k_top, k_left, k_sign = jax.random.split(i_key, 3)
        window = _window(h, w, _corner(k_top, h - s), _corner(k_left, w - s), s)
        # One sign per channel for the whole batch; the window moves to the
        # opposite face of the box.
        change = jnp.where(window[:, :, None], 2.0 * eps * _rademacher(k_sign, (ch,)), 0.0)
        x_new = jnp.minimum(jnp.maximum(x_best + change, x - eps), x + eps)
        return jnp.clip(x_new, 0.0, 1.0)

    def step_l2(i_key, x_best, s, level):
        keys = jax.random.split(i_key, 6)
        top, left = _corner(keys[0], h - s), _corner(keys[1], w - s)
        top2, left2 = _corner(keys[2], h - s), _corner(keys[3], w - s)
        w1 = _window(h, w, top, left, s)[None, :, :, None]
        w2 = _window(h, w, top2, left2, s)[None, :, :, None]
        delta = x_best - x

        def per_channel(v):  # L2 norm over the image plane, [B, 1, 1, C]
            return jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2), keepdims=True))

        norm_w1 = per_channel(jnp.where(w1, delta, 0.0))
        norm_windows = per_channel(jnp.where(w1 | w2, delta, 0.0))
        norm_image = c.expand(c.flat_norm(delta, "l2"), delta)
        pattern = pattern_table[level]
        pattern = jnp.where(jax.random.uniform(keys[4]) > 0.5, pattern.T, pattern)
        pattern = _place(pattern, h, w, top, left)[None, :, :, None]
        new = pattern * _rademacher(keys[5], (x.shape[0], 1, 1, ch))
        new = new + jnp.where(w1, delta, 0.0) / (1e-12 + norm_w1)
        budget = jnp.maximum(eps**2 - jnp.square(norm_image), 0.0) / ch + jnp.square(norm_windows)
        new = new / (1e-12 + per_channel(new)) * jnp.sqrt(budget)
        delta = jnp.where(w1, new, jnp.where(w2, 0.0, delta))
        norm_delta = c.expand(c.flat_norm(delta, "l2"), delta)
        return jnp.clip(x + delta / (norm_delta + 1e-12) * eps, 0.0, 1.0)

    def active(margin):
        return attacked & (margin > 0)

    def cond(carry):
        i, _, margin = carry
        return (i < n_queries) & jnp.any(active(margin))

    def body(carry):
        i, x_best, margin = carry
        level = jnp.sum(i > boundaries)
        s = side_table[jnp.minimum(level, len(sides) - 1)]
        i_key = jax.random.fold_in(loop_key, i)
        if norm == "linf":
            x_new = step_linf(i_key, x_best, s)
        else:
            x_new = step_l2(i_key, x_best, s, jnp.minimum(level, len(sides) - 1))
        margin_new = _margin(logits_fn(x_new), y)
        # Margin loss: "lower loss" and "lower margin" coincide; a candidate
        # that misclassifies is always taken.
        accept = active(margin) & ((margin_new < margin) | (margin_new <= 0))
        x_best = c.where_rows(accept, x_new, x_best)
        margin = jnp.where(accept, margin_new, margin)
        return i + 1, x_best, margin

    iterations, x_best, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), x_best, margin))
    fooled = attacked & (c.predictions(logits_fn(x_best)) != y)
    x_adv = c.where_rows(fooled, x_best, x)
    return jax.lax.stop_gradient(x_adv), clean_ok & ~fooled, iterations


def _check_square_args(x, norm, eps, n_queries, p_init) -> dict:
    norm = c.check_norm(norm)
    kwargs = {
        "norm": norm,
        "eps": c.check_eps(eps, norm),
        "n_queries": c.check_int("n_queries", n_queries, low=1),
        "p_init": c.check_real("p_init", p_init, low=0.0, high=1.0),
    }
    if norm == "l2" and x.ndim == 4 and x.shape[1] < 5:
        raise ValueError(f"L2 Square needs images at least 5 pixels high, got {x.shape}")
    return kwargs


def square_attack(
    logits_fn: c.LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    norm: str,
    n_queries: int = 5000,
    p_init: float = 0.8,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Square Attack with the margin loss, one restart, as in the standard version.

    L-inf: starts at ``clip(x + eps * sigma)`` with one random sign per
    (example, column, channel); each step draws a window of side
    ``square_side(p_schedule(i))`` at ``floor((H - s) U), floor((W - s) U)``
    and a sign per channel (shared by the batch) and moves the window to
    ``clip(x + sign eps)``. L2: starts from a grid of ``floor(H/5)`` tiles of
    ``square_l2_pattern`` with random signs, scaled to norm ``eps``; each step
    redraws window ``W1`` from the pattern plus the normalised old content,
    rescaled to the budget left by the image and the windows, zeroes a second
    window ``W2`` and rescales the whole perturbation to norm ``eps``. A
    candidate is kept where it lowers the margin (strictly) or misclassifies;
    rows whose margin reached 0 stop; the loop ends when none is left or after
    ``n_queries`` iterations (plus the query at the start point).

    Args:
      logits_fn: ``x -> [B, K]`` logits.
      x: ``[B, H, W, C]`` clean images in ``[0, 1]`` (L2 needs ``H >= 5``).
      y: ``[B]`` labels.
      key: PRNG key.
      eps: radius.
      norm: ``"linf"`` or ``"l2"``.
      n_queries: iterations after the first query (5000 in the standard version).
      p_init: initial window fraction (0.8).
      mask: optional ``[B]`` bool, rows to attack.

    Returns:
      ``(x_adv, robust)`` as ``apgd``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x, y = jnp.full((1, 8, 8, 1), 0.5), jnp.array([0])
      >>> f = lambda v: jnp.stack([jnp.zeros(1), v.mean((1, 2, 3)) - 0.55], -1)
      >>> square_attack(f, x, y, jax.random.key(0), eps=0.1, norm="linf",
      ...               n_queries=50)[1]
      Array([False], dtype=bool)
    """
    kwargs = _check_square_args(x, norm, eps, n_queries, p_init)
    c.check_batch(x, y, image=True)
    if c.num_classes(logits_fn, x) < 2:
        raise ValueError("Square needs K >= 2 classes")
    x_adv, robust, _ = c.compiled(_square, logits_fn, **kwargs)(x, y, c.as_key(key), mask)
    return x_adv, robust
