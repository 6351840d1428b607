"""Pieces shared by the AutoAttack attacks: argument checks, norms, targets.

Every public attack validates its static arguments here, eagerly, so a bad
value raises a ``ValueError`` naming the accepted values before anything is
traced or compiled.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jax_memat.attacks.core import NORMS, eps_problem

LogitsFn = Callable[[jax.Array], jax.Array]

F32 = jnp.float32


def check_norm(norm: object) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return str(norm)


def check_real(name: str, value: object, *, low: float, high: float = math.inf) -> float:
    """A finite Python real in ``(low, high]``; JAX arrays are refused (static value)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a Python float, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not (math.isfinite(value) and low < value <= high):
        raise ValueError(f"{name} must be a finite float in ({low}, {high}], got {value}")
    return value


def check_eps(eps: object, norm: str) -> float:
    """The library's one rule for radii (``attacks.core.eps_problem``), positive here."""
    problem = eps_problem(eps, norm, positive=True)
    if problem:
        raise ValueError(problem)
    return float(eps)


def check_int(name: str, value: object, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be a Python int >= {low}, got {value!r}")
    return int(value)


def check_batch(x: jax.Array, y: jax.Array, *, image: bool = False) -> None:
    """Shapes only (values may be tracers): ``x`` is ``[B, ...]``, ``y`` is ``[B]`` ints."""
    min_ndim = 4 if image else 2
    if x.ndim < min_ndim or (image and x.ndim != 4):
        want = "[B, H, W, C] (NHWC)" if image else "[B, ...] with at least one feature axis"
        raise ValueError(f"x must be {want}, got shape {x.shape}")
    if y.shape != x.shape[:1] or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"y must be [B] = {x.shape[:1]} integer labels, got {y.shape} {y.dtype}")


def num_classes(logits_fn: LogitsFn, x: jax.Array) -> int:
    """The number of classes, from shapes alone (``jax.eval_shape`` compiles nothing)."""
    out = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(x.shape, F32))
    if len(out.shape) != 2 or out.shape[0] != x.shape[0]:
        raise ValueError(f"logits_fn must return [B, K] logits, got shape {out.shape}")
    return int(out.shape[1])


def as_key(key: jax.Array) -> jax.Array:
    """Accepts new-style typed keys and legacy ``uint32[2]`` keys."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def flat_norm(v: jax.Array, norm: str) -> jax.Array:
    """Per-example L-inf or L2 norm over all but the leading axis, ``[B]``."""
    v = v.reshape(v.shape[0], -1)
    if norm == "linf":
        return jnp.max(jnp.abs(v), axis=1)
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=1))


def expand(v: jax.Array, like: jax.Array) -> jax.Array:
    """Reshapes a per-example ``[B]`` array to broadcast against ``like``."""
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def where_rows(cond: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """``a`` on the rows where ``cond`` ([B]) holds, ``b`` elsewhere."""
    return jnp.where(expand(cond, a), a, b)


def predictions(logits: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def target_by_rank(logits: jax.Array, rank: int | jax.Array) -> jax.Array:
    """The class with the ``rank``-th largest logit, per example (rank 1 = argmax).

    AutoAttack's targeted attacks aim, in turn, at the classes ranked 2, 3, ...
    by the clean logits. ``rank`` may be traced (one compilation for all
    targets).

    Args:
      logits: ``[B, K]`` logits.
      rank: an int in ``[1, K]``, Python or a scalar array.

    Returns:
      ``[B]`` int32 class indices.

    Example:
      >>> import jax.numpy as jnp
      >>> target_by_rank(jnp.array([[0.1, 3.0, 2.0, -1.0]]), 2)
      Array([2], dtype=int32)
    """
    k = logits.shape[-1]
    order = jnp.argsort(logits, axis=-1)  # ascending
    index = jnp.broadcast_to(jnp.asarray(k - rank, jnp.int32), logits.shape[:1])[:, None]
    return jnp.take_along_axis(order, index, axis=-1)[:, 0].astype(jnp.int32)


def n_targets(n_target_classes: int, k: int) -> int:
    """The standard version's target count: ``n_target_classes`` or ``K - 1`` if fewer."""
    return min(n_target_classes, k - 1)


# Compiled standalone attacks per logits function, held weakly: calling an
# attack again with the same function (e.g. batch after batch) reuses the
# compiled loop, and nothing here keeps a closure over model variables alive.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled(impl: Callable[..., Any], logits_fn: LogitsFn, **static: Any) -> Callable[..., Any]:
    """``jax.jit`` of ``impl(logits_fn, *args, **static)``, cached per ``logits_fn``.

    Inside a trace the call is simply inlined by the enclosing jit.
    """
    key = (impl, tuple(sorted(static.items())))
    try:
        ref = weakref.ref(logits_fn)
    except TypeError:  # not weak-referenceable: compile for this call only
        return jax.jit(lambda *args: impl(logits_fn, *args, **static))
    per_fn = _COMPILED.setdefault(logits_fn, {})
    if key not in per_fn:
        # Only a weak reference inside: the cache entry must not keep its key alive.
        per_fn[key] = jax.jit(lambda *args: impl(ref(), *args, **static))
    return per_fn[key]
