"""Complexity measures of trained classifiers (claim C3 of Dong et al. 2022).

Norm- and margin-based measures (``layers``, ``norms``, ``margins``): the
weight layers of a Flax model with a BatchNorm policy (fold or diagonal),
the Frobenius and spectral families, distance to initialization, path norm,
Bartlett et al.'s spectral complexity, and output margins (clean or
adversarial). ``norm_measures`` computes all of them. See docs/complexity.md.

Example:
  >>> import jax, numpy as np
  >>> from jax_memat import models
  >>> from jax_memat.analysis.complexity import norm_measures
  >>> model = models.get_model("small_cnn", 10)
  >>> init = models.init_model(model, jax.random.key(0), (28, 28, 1))
  >>> images, labels = np.zeros((8, 28, 28, 1), np.uint8), np.arange(8) % 10
  >>> measures = norm_measures(models.make_apply_fn(model), init, init, images, labels)
"""

from jax_memat.analysis.complexity.layers import (
    BN_POLICIES,
    Layers,
    LayerTrace,
    TracedOp,
    WeightLayer,
    apply_layers,
    bn_policy,
    extract_layers,
    trace_layers,
)
from jax_memat.analysis.complexity.margins import (
    MarginStats,
    margin_gamma,
    normalized_margins,
    output_margins,
    require_positive,
)
from jax_memat.analysis.complexity.norms import (
    CONV_NORMS,
    LayerNorms,
    conv_operator_norm,
    l21_norm,
    layer_norms,
    log_bartlett_complexity,
    norm_measures,
    path_norm,
    spectral_norm,
)

__all__ = [
    "BN_POLICIES",
    "CONV_NORMS",
    "LayerNorms",
    "LayerTrace",
    "Layers",
    "MarginStats",
    "TracedOp",
    "WeightLayer",
    "apply_layers",
    "bn_policy",
    "conv_operator_norm",
    "extract_layers",
    "l21_norm",
    "layer_norms",
    "log_bartlett_complexity",
    "margin_gamma",
    "norm_measures",
    "normalized_margins",
    "output_margins",
    "path_norm",
    "require_positive",
    "spectral_norm",
    "trace_layers",
]
