"""Output margins, the margin gamma of the norm measures, and normalized margins.

The output margin of an example is ``f(x)[y] - max_{j != y} f(x)[j]``
(positive iff it is classified correctly). Margin-normalized measures divide
by gamma^2 where gamma is a low percentile of the margins over a dataset split
(the 10th by default, as Jiang et al. 2020, "Fantastic Generalization Measures
and Where to Find Them", section 7: a percentile is more robust than the
minimum). For robust generalization the margins can be taken at adversarial
points instead: PGD on the margin (CW) loss against the measured model.

If gamma <= 0 (more than that percentile of the examples misclassified) the
over-margin measures are undefined: ``margin_gamma`` says so
(``MarginStats.positive``), ``require_positive`` raises, and nothing ever
takes ``|gamma|``.

Bartlett et al. 2017 ("Spectrally-normalized margin bounds for neural
networks", section 2) compare networks by the distribution of margins divided
by the spectral complexity R: ``normalized_margins``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_memat.attacks import AttackSpec, make_attack
from jax_memat.objectives import margin


def check_percentile(percentile: float) -> None:
    """Raises ``ValueError`` unless ``percentile`` is a real number in [0, 100]."""
    if (
        isinstance(percentile, bool)
        or not isinstance(percentile, numbers.Real)
        or not 0 <= percentile <= 100
    ):
        raise ValueError(f"margin percentile must be a number in [0, 100], got {percentile!r}.")


def check_inputs(images: Any, labels: Any, batch_size: int) -> None:
    """Raises ``ValueError`` unless images ``[N, H, W, C]``, labels ``[N]`` and batch_size fit."""
    if np.ndim(images) != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {np.shape(images)}.")
    if np.ndim(labels) != 1 or np.shape(labels)[0] != np.shape(images)[0]:
        raise ValueError(
            f"labels must be [N] with N = {np.shape(images)[0]} (the images), got shape "
            f"{np.shape(labels)}."
        )
    if np.shape(images)[0] == 0:
        raise ValueError("images is empty: margins need at least one example.")
    if not np.issubdtype(np.asarray(labels).dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {np.asarray(labels).dtype}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")


def output_margins(
    apply_fn: Callable[..., Any],
    variables: Mapping[str, Any],
    images: np.ndarray | jax.Array,
    labels: np.ndarray | jax.Array,
    *,
    attack: AttackSpec | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> np.ndarray:
    """Per-example output margins, clean or at adversarial points, in inference mode.

    Batches have a fixed size (the last one padded and the padding dropped),
    so one compilation serves the whole split.

    Args:
      apply_fn: ``apply(variables, images, train) -> (logits, state)``.
      variables: the model's variables.
      images: ``[N, H, W, C]``, uint8 (divided by 255) or float in [0, 1].
      labels: ``[N]`` integer labels.
      attack: None for clean inputs, else the attack crafted against this
        model (e.g. ``AttackSpec("cw", eps=8 / 255, step_size=2 / 255, steps=10)``:
        PGD on the margin loss).
      seed: seed of the attack's random starts (batch ``b`` uses ``fold_in(key, b)``).
      batch_size: examples per batch.

    Returns:
      ``[N]`` float32 margins.

    Raises:
      ValueError: for inputs of the wrong shape or an invalid attack.

    Example:
      >>> apply_fn = lambda variables, images, train: (images.reshape(-1, 2), {})
      >>> output_margins(apply_fn, {}, np.array([[[[0.75]], [[0.25]]]]), np.array([0]))
      array([0.5], dtype=float32)
    """
    check_inputs(images, labels, batch_size)
    attack_fn = make_attack(attack) if attack is not None else None
    images = np.asarray(images)
    scale = 1.0 / 255.0 if images.dtype == np.uint8 else 1.0
    labels = np.asarray(labels, np.int32)
    count = images.shape[0]
    size = min(batch_size, count)

    @jax.jit
    def batch_margins(variables, x, y, key):
        x = x.astype(jnp.float32) * scale
        if attack_fn is not None:
            x = attack_fn(apply_fn, variables, x, y, key)
        logits, _ = apply_fn(variables, x, False)
        return margin(logits, y)

    key = jax.random.key(seed)
    out = []
    for batch, start in enumerate(range(0, count, size)):
        x = images[start : start + size]
        y = labels[start : start + size]
        real = x.shape[0]
        if real < size:
            x = np.concatenate([x, np.repeat(x[:1], size - real, axis=0)])
            y = np.concatenate([y, np.repeat(y[:1], size - real)])
        values = batch_margins(variables, x, y, jax.random.fold_in(key, batch))
        out.append(np.asarray(values)[:real])
    return np.concatenate(out).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class MarginStats:
    """The margin gamma of a split.

    Attributes:
      gamma: the ``percentile``-th percentile of the margins (numpy's linear interpolation).
      percentile: the percentile used.
      positive: whether gamma > 0 (over-margin measures are defined).
      fraction_nonpositive: share of examples with margin <= 0 (misclassified or tied).
      count: number of examples.
    """

    gamma: float
    percentile: float
    positive: bool
    fraction_nonpositive: float
    count: int


def margin_gamma(margins: np.ndarray, percentile: float = 10.0) -> MarginStats:
    """gamma = a low percentile of the output margins (Jiang et al. 2020 use the 10th).

    Args:
      margins: ``[N]`` margins (``output_margins``).
      percentile: in [0, 100].

    Returns:
      A ``MarginStats``; ``positive`` is False when gamma <= 0.

    Raises:
      ValueError: for a percentile out of range or empty/non-finite margins.

    Example:
      >>> margin_gamma(np.arange(11.0), 10).gamma
      1.0
    """
    check_percentile(percentile)
    margins = np.asarray(margins, np.float64)
    if margins.ndim != 1 or margins.size == 0:
        raise ValueError(f"margins must be a non-empty [N] array, got shape {margins.shape}.")
    if not np.all(np.isfinite(margins)):
        raise ValueError("margins contain NaN or infinite values (a diverged model?).")
    gamma = float(np.percentile(margins, percentile))
    return MarginStats(
        gamma=gamma,
        percentile=float(percentile),
        positive=gamma > 0,
        fraction_nonpositive=float(np.mean(margins <= 0)),
        count=int(margins.size),
    )


def require_positive(stats: MarginStats) -> float:
    """gamma, or a ``ValueError`` explaining why a measure cannot divide by it.

    Args:
      stats: from ``margin_gamma``.

    Returns:
      gamma (> 0).

    Example:
      >>> require_positive(margin_gamma(np.array([1.0, 2.0]), 0))
      1.0
    """
    if not stats.positive:
        raise ValueError(
            f"The {stats.percentile:g}th percentile of the margins is gamma = {stats.gamma:.4g} "
            f"<= 0 ({100 * stats.fraction_nonpositive:.1f}% of {stats.count} examples have "
            "margin <= 0): measures over the margin are undefined. Use a higher percentile or "
            "a split the model fits."
        )
    return stats.gamma


def normalized_margins(margins: np.ndarray, log_spectral_complexity: float) -> np.ndarray:
    """Bartlett et al.'s normalized margins ``margin / R``, given ``log R``.

    Args:
      margins: ``[N]`` margins.
      log_spectral_complexity: ``log R`` (``norms.log_bartlett_complexity``).

    Returns:
      ``[N]`` float64 normalized margins.

    Example:
      >>> normalized_margins(np.array([2.0, -1.0]), math.log(4.0))
      array([ 0.5 , -0.25])
    """
    if not math.isfinite(log_spectral_complexity):
        raise ValueError(f"log R must be finite, got {log_spectral_complexity}.")
    return np.asarray(margins, np.float64) * math.exp(-log_spectral_complexity)
