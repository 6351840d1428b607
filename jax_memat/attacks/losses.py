"""Per-example losses on logits, used as attack objectives.

Every function maps logits ``[B, K]`` (and labels or targets) to one value
per example, ``[B]``; attacks *maximise* these values and training code takes
the mean in one place. All of them work on logits, never on probabilities,
and go through ``log_softmax`` so that large logits do not overflow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy with integer labels, one value per example.

    Args:
      logits: ``[B, K]`` unnormalised scores.
      labels: ``[B]`` integer class indices in ``[0, K)``.

    Returns:
      ``[B]`` values ``-log softmax(logits)[y]``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jax_memat.attacks import cross_entropy
      >>> cross_entropy(jnp.array([[0.0, 0.0]]), jnp.array([1]))  # log 2
      Array([0.6931472], dtype=float32)
    """
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def soft_cross_entropy(logits: jax.Array, target_probs: jax.Array) -> jax.Array:
    """Cross-entropy against a target distribution, one value per example.

    Args:
      logits: ``[B, K]`` unnormalised scores.
      target_probs: ``[B, K]`` target probabilities (rows summing to one, e.g.
        smoothed or temporally ensembled labels).

    Returns:
      ``[B]`` values ``-sum_k q_k log softmax(logits)_k``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jax_memat.attacks import soft_cross_entropy
      >>> soft_cross_entropy(jnp.array([[0.0, 0.0]]), jnp.array([[0.5, 0.5]]))
      Array([0.6931472], dtype=float32)
    """
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(target_probs * log_probs, axis=-1)


def kl_divergence(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """``KL(softmax(p) || softmax(q))`` summed over classes, one value per example.

    This is the TRADES term ``KL(f(x) || f(x'))`` with ``p_logits = f(x)``
    (clean) and ``q_logits = f(x')`` (adversarial), i.e. PyTorch's
    ``KLDivLoss(reduction="none")(log_softmax(q), softmax(p)).sum(1)``.
    Classes where ``softmax(p)`` underflows to zero contribute zero.

    Args:
      p_logits: ``[B, K]`` logits of the reference distribution ``P``.
      q_logits: ``[B, K]`` logits of the approximating distribution ``Q``.

    Returns:
      ``[B]`` non-negative values ``sum_k P_k (log P_k - log Q_k)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jax_memat.attacks import kl_divergence
      >>> kl_divergence(jnp.array([[1.0, 2.0]]), jnp.array([[1.0, 2.0]]))
      Array([0.], dtype=float32)
    """
    log_p = jax.nn.log_softmax(p_logits, axis=-1)
    log_q = jax.nn.log_softmax(q_logits, axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def cw_margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Carlini-Wagner margin ``max_{j != y} z_j - z_y``, one value per example.

    Positive exactly when the example is misclassified (ties aside); PGD-CW
    maximises it, as the CW loss in the robust-overfitting and TE evaluation
    code (without their confidence clamp, which does not change the ascent
    direction before the margin reaches the clamp).

    Args:
      logits: ``[B, K]`` unnormalised scores, ``K >= 2``.
      labels: ``[B]`` integer class indices.

    Returns:
      ``[B]`` margins.

    Example:
      >>> import jax.numpy as jnp
      >>> from jax_memat.attacks import cw_margin
      >>> cw_margin(jnp.array([[3.0, 1.0, 2.0]]), jnp.array([0]))
      Array([-1.], dtype=float32)
    """
    num_classes = logits.shape[-1]
    is_true = jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_)
    true_logit = jnp.sum(jnp.where(is_true, logits, 0), axis=-1)
    # -inf on the true class so that it never wins the max over the others.
    other_max = jnp.max(jnp.where(is_true, -jnp.inf, logits), axis=-1)
    return other_max - true_logit
