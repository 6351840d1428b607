"""Per-example gradients of any ``Objective``, and their reductions.

A transform of an objective, in the style of JAX's function transforms:
``per_example_grads(objective)`` and ``grad_reductions(objective)`` return
functions with the objective's own loss signature,
``(params, model_state, objective_state, batch, info)``.

**What "the gradient of example i" means.** The per-example gradient is
``g_i = d l_i / d params`` where ``l_i`` is example ``i``'s term of the loss
*computed in the full-batch forward pass the train step makes* (same batch,
same ``info`` and so the same attack, BatchNorm in the mode the objective
uses). With BatchNorm in training mode the batch statistics depend on every
example of the batch, and ``g_i`` includes the path through them. So

    mean_i g_i = d mean_i l_i / d params,

the very gradient the train step hands the optimizer, for any model and any
objective (attacks with random starts, TRADES's two passes, the temporal-
ensembling regularizer), up to float rounding. For a model without
batch-dependent layers and an objective whose term ``l_i`` depends on example
``i`` alone, ``g_i`` is the gradient of that example's loss on its own.

The alternatives were rejected because they do not decompose the update:
with one-example batches (``vmap`` of ``grad`` over single examples)
BatchNorm normalizes each example by its own statistics, and the attack's
random start, drawn for the batch's shape, differs from the step's; with the
batch statistics frozen (``stop_gradient``), the mean of the ``g_i`` misses
the statistics' share of the gradient. Every model of this library has
BatchNorm.

**How it is computed.** One forward pass of the objective on the batch
(including the attack), linearized with respect to the parameters; then the
linear map's transpose (a backward pass) is applied to the unit cotangents
``e_i``, ``microbatch`` of them at a time (``vmap`` inside ``lax.scan``). Each
backward pass goes through the whole batch, so the cost is one forward pass
plus ``B`` backward passes of the batch, about ``2B / 3`` train steps of
standard training; memory grows with ``microbatch`` (``microbatch`` backward
passes and gradients at once), not with ``B``. The cosines with the mean
gradient need no second sweep: ``<g_i, g_mean>`` for all ``i`` at once is the
linearized loss applied to ``g_mean`` (a Jacobian-vector product, about one
more forward pass).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jax_memat.objectives import Objective, StepInfo

# (params, model_state, objective_state, batch, info) -> result
ObjectiveArgsFn = Callable[[Any, Any, Any, dict, StepInfo], Any]


class GradReductions(NamedTuple):
    """Reductions over per-example gradients ``g_i`` (see the module docstring).

    The ``K`` examples reduced over are the batch's first ``K`` (``K = B``
    unless ``grad_reductions`` was given ``examples``), each ``g_i`` taken in
    the full-batch forward pass.

    Attributes:
      loss: the per-example loss ``l_i`` [B], for the whole batch.
      mean: ``mean_i g_i`` (a pytree like the parameters); with ``K = B`` the
        gradient of the batch-mean loss.
      sq_norms: ``||g_i||^2`` over all parameters [K].
      norms: ``||g_i||`` [K].
      variance: ``mean_i ||g_i - mean||^2`` (scalar): the per-coordinate
        variance across the examples (population, divided by ``K``) summed
        over all parameters.
      cosine: ``cos(g_i, mean)`` [K] (NaN where ``g_i`` or the mean is 0), or
        None when not asked for.
    """

    loss: jax.Array
    mean: Any
    sq_norms: jax.Array
    norms: jax.Array
    variance: jax.Array
    cosine: jax.Array | None


def check_microbatch(microbatch: Any) -> None:
    """Raises ``ValueError`` unless ``microbatch`` is None or a positive integer."""
    if microbatch is None:
        return
    if isinstance(microbatch, bool) or not isinstance(microbatch, int) or microbatch < 1:
        raise ValueError(
            f"microbatch={microbatch!r} is not accepted; use None (every example of the batch "
            "at once) or a positive integer (that many examples at a time)."
        )


def check_examples(examples: Any) -> None:
    """Raises ``ValueError`` unless ``examples`` is None or a positive integer."""
    if examples is not None and (
        isinstance(examples, bool) or not isinstance(examples, int) or examples < 1
    ):
        raise ValueError(
            f"examples={examples!r} is not accepted; use None (the whole batch) or a positive "
            "integer (the batch's first that many examples)."
        )


def _check_unroll(unroll: Any) -> None:
    if unroll is not None and not isinstance(unroll, bool):
        raise ValueError(f"unroll={unroll!r} is not accepted; use None, True or False.")


def _check_objective(objective: Any, name: str) -> None:
    if not isinstance(objective, Objective):
        raise TypeError(
            f"{name} takes an Objective (from make_objective or a transform such as "
            f"with_temporal_ensembling); got {type(objective).__name__}."
        )


def _chunks(num: int, microbatch: int | None) -> jax.Array:
    """Rows ``0..num-1`` as ``[count, size]``; rows past ``num`` pad the last chunk.

    Padding rows get zero cotangents (``_unit_cotangents``), so they add
    nothing to sums; callers drop their results.
    """
    size = num if microbatch is None else min(microbatch, num)
    count = -(-num // size)
    return jnp.arange(count * size, dtype=jnp.int32).reshape(count, size)


def _scan_chunks(body, init, chunks: jax.Array, unroll: bool | None):
    """``lax.scan(body, init, chunks)``, or the same as straight-line code when unrolled."""
    if unroll is None:
        # XLA:CPU runs the batched backward passes 20-30x slower inside a loop than
        # unrolled (docs/gradients.md); accelerators keep the loop, which bounds the
        # memory to one chunk's.
        unroll = jax.default_backend() == "cpu"
    if not unroll and chunks.shape[0] > 1:
        return jax.lax.scan(body, init, chunks)
    carry, outputs = init, []
    for rows in chunks:
        carry, out = body(carry, rows)
        outputs.append(out)
    return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)


def _unit_cotangents(rows: jax.Array, batch_size: int, num: int, dtype) -> jax.Array:
    """``e_r`` for each row ``r < num``, zero rows for the padding (``r >= num``)."""
    # one_hot of an index >= batch_size is a zero row: padding contributes nothing.
    return jax.nn.one_hot(jnp.where(rows < num, rows, batch_size), batch_size, dtype=dtype)


def _sq_norms(stacked: Any) -> jax.Array:
    """``||x_j||^2`` over all leaves for each row ``j`` of a stacked pytree."""
    return sum(
        jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
        for x in jax.tree.leaves(stacked)
    )


def tree_sq_norm(tree: Any) -> jax.Array:
    """``||tree||^2``: the sum of squares of every entry of a pytree (float32 scalar)."""
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def tree_dot(a: Any, b: Any) -> jax.Array:
    """``<a, b>`` summed over every entry of two pytrees of the same structure."""
    return sum(
        jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _losses_of(objective: Objective, model_state, objective_state, batch, info):
    def losses(params):
        return objective.loss(params, model_state, objective_state, batch, info)

    return losses


def per_example_grads(
    objective: Objective, *, microbatch: int | None = None, unroll: bool | None = None
) -> ObjectiveArgsFn:
    """Per-example gradients of an objective, stacked along a leading batch axis.

    ``g_i`` is the gradient of example ``i``'s loss term within the full-batch
    forward pass (BatchNorm statistics of the whole batch, the step's attack);
    their mean is the train step's gradient. See the module docstring.

    Args:
      objective: an ``Objective``.
      microbatch: how many examples' gradients to compute at once (None: all
        ``B``); memory grows with it, the result does not depend on it.
      unroll: run the chunks as unrolled code (True) or in a ``lax.scan``
        loop (False), which keeps one chunk's memory alive at a time; None:
        unrolled on the CPU (where XLA runs the loop's backward passes 20-30x
        slower), a loop on accelerators. The values do not depend on it.

    Returns:
      ``fn(params, model_state, objective_state, batch, info) -> grads``,
      ``grads`` a pytree like ``params`` with a leading axis of size ``B``.
      Pure and jittable.

    Example:
      >>> fn = jax.jit(per_example_grads(objective, microbatch=16))
      >>> grads = fn(state.params, state.model_state, state.objective_state, batch, info)
      >>> jax.tree.map(lambda g: g.shape[0], grads)  # B everywhere
    """
    _check_objective(objective, "per_example_grads")
    check_microbatch(microbatch)
    _check_unroll(unroll)

    def fn(params, model_state, objective_state, batch, info):
        losses_fn = _losses_of(objective, model_state, objective_state, batch, info)
        losses, pullback, _ = jax.vjp(losses_fn, params, has_aux=True)
        size = losses.shape[0]

        def chunk(carry, rows):
            (grads,) = jax.vmap(pullback)(_unit_cotangents(rows, size, size, losses.dtype))
            return carry, grads

        _, stacked = _scan_chunks(chunk, None, _chunks(size, microbatch), unroll)
        return jax.tree.map(lambda g: g.reshape(-1, *g.shape[2:])[:size], stacked)

    return fn


def grad_reductions(
    objective: Objective,
    *,
    microbatch: int | None = None,
    examples: int | None = None,
    cosine: bool = True,
    unroll: bool | None = None,
) -> ObjectiveArgsFn:
    """Norms, mean, variance and cosines of per-example gradients, without stacking them.

    The gradients ``g_i`` are those of ``per_example_grads`` (see the module
    docstring). They are computed ``microbatch`` at a time and only sums are
    kept (``sum_i g_i``, each ``||g_i||^2``), so memory holds one parameter-
    sized accumulator and ``microbatch`` gradients, never ``B``.

    Cost: one linearized forward pass of the objective (with its attack) and
    ``K`` backward passes of the batch (``K``: ``examples``, else ``B``); a
    smaller ``K`` estimates the same statistics from a sample of the batch
    (the batch is shuffled, so its first ``K`` examples are one) at ``K / B``
    of the cost. ``cosine=True`` adds one forward-mode
    product (``<g_i, mean>`` for every ``i`` at once, about one forward pass)
    instead of a second sweep over the examples. The variance is taken as
    ``mean_i ||g_i||^2 - ||mean||^2`` (clipped at 0), exact up to float32
    rounding of ``mean_i ||g_i||^2``.

    Args:
      objective: an ``Objective``.
      microbatch: examples whose gradients are computed at once (None: all).
      examples: reduce over the batch's first ``examples`` examples only
        (None: all ``B``; at most ``B``); their loss terms are still those of
        the full-batch pass.
      cosine: also return ``cos(g_i, mean)``.
      unroll: run the chunks as unrolled code (True) or in a ``lax.scan``
        loop (False), which keeps one chunk's memory alive at a time; None:
        unrolled on the CPU (where XLA runs the loop's backward passes 20-30x
        slower), a loop on accelerators. The values do not depend on it.

    Returns:
      ``fn(params, model_state, objective_state, batch, info) -> GradReductions``;
      pure and jittable.

    Example:
      >>> fn = jax.jit(grad_reductions(objective, microbatch=16))
      >>> r = fn(state.params, state.model_state, state.objective_state, batch, info)
      >>> r.norms.shape, r.variance.shape
      ((128,), ())
    """
    _check_objective(objective, "grad_reductions")
    check_microbatch(microbatch)
    check_examples(examples)
    _check_unroll(unroll)

    def fn(params, model_state, objective_state, batch, info):
        losses_fn = _losses_of(objective, model_state, objective_state, batch, info)
        if cosine:
            # One forward pass serves both directions: J v (cosines) and J^T u (gradients).
            losses, jvp_fn, _ = jax.linearize(losses_fn, params, has_aux=True)
            pullback = jax.linear_transpose(jvp_fn, params)
        else:
            losses, pullback, _ = jax.vjp(losses_fn, params, has_aux=True)
        size = losses.shape[0]
        if examples is not None and examples > size:
            raise ValueError(
                f"grad_reductions: examples={examples} exceeds the batch of {size}; accepted: "
                f"None (all) or an integer in [1, {size}]."
            )
        count = size if examples is None else examples

        def body(total, rows):
            (grads,) = jax.vmap(pullback)(_unit_cotangents(rows, size, count, losses.dtype))
            total = jax.tree.map(lambda t, g: t + jnp.sum(g, axis=0), total, grads)
            return total, _sq_norms(grads)

        zeros = jax.tree.map(jnp.zeros_like, params)
        total, sq = _scan_chunks(body, zeros, _chunks(count, microbatch), unroll)
        sq = sq.reshape(-1)[:count]
        mean = jax.tree.map(lambda t: t / count, total)
        mean_sq = tree_sq_norm(mean)
        variance = jnp.maximum(jnp.mean(sq) - mean_sq, 0.0)
        norms = jnp.sqrt(sq)
        cos = None
        if cosine:
            dots = jvp_fn(mean).astype(jnp.float32)[:count]  # <g_i, mean> for every i
            denominator = norms * jnp.sqrt(mean_sq)
            defined = denominator > 0
            cos = jnp.where(defined, dots / jnp.where(defined, denominator, 1.0), jnp.nan)
        return GradReductions(losses, mean, sq, norms, variance, cos)

    return fn


def noise_scale(reductions: GradReductions) -> dict[str, jax.Array]:
    """The simple gradient noise scale of one batch (McCandlish et al., 2018, App. A.1).

    ``B_simple = tr(Sigma) / |G|^2`` with the unbiased estimates from the
    batch's ``B`` per-example gradients (the paper's two batch sizes being 1
    and ``B``): ``tr(Sigma) = B / (B - 1) * variance`` and ``|G|^2 = ||mean||^2
    - tr(Sigma) / B``. The ``|G|^2`` estimate can be <= 0 on one batch (then
    ``B_simple`` is negative or infinite); average ``trace`` and ``signal_sq``
    over batches before dividing, as McCandlish et al. do.

    Args:
      reductions: from ``grad_reductions`` (needs ``B >= 2``).

    Returns:
      ``{"trace": tr(Sigma), "signal_sq": |G|^2, "noise_scale": B_simple}``.

    Example:
      >>> r = grad_reductions(objective)(params, model_state, objective_state, batch, info)
      >>> noise_scale(r)["noise_scale"]
    """
    size = reductions.sq_norms.shape[0]
    if size < 2:
        raise ValueError(f"noise_scale needs a batch of at least 2 examples; got {size}.")
    trace = reductions.variance * (size / (size - 1))
    signal_sq = tree_sq_norm(reductions.mean) - trace / size
    return {"trace": trace, "signal_sq": signal_sq, "noise_scale": trace / signal_sq}
