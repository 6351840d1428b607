"""Complexity measures of trained classifiers (claim C3 of Dong et al. 2022).

Norm- and margin-based measures (``layers``, ``norms``, ``margins``): the
weight layers of a Flax model with a BatchNorm policy (fold or diagonal),
the Frobenius and spectral families, distance to initialization, path norm,
Bartlett et al.'s spectral complexity, and output margins (clean or
adversarial). ``norm_measures`` computes all of them.

Measures that perturb the weights or read a data set (``perturb``,
``sharpness``, ``flatness``, ``input_space``): PAC-Bayes sigma and its
magnitude-aware variant, worst-case sharpness, average- and worst-case
robust flatness, the adversarial weight-loss landscape, local Lipschitzness
and input-gradient norms. ``correlation`` ranks a measure against the robust
generalization gap over a family of runs (Kendall's tau-b, Jiang et al.'s
granulated tau). See docs/complexity.md.

Example:
  >>> import jax, numpy as np
  >>> from jax_memat import models
  >>> from jax_memat.analysis.complexity import norm_measures
  >>> model = models.get_model("small_cnn", 10)
  >>> init = models.init_model(model, jax.random.key(0), (28, 28, 1))
  >>> images, labels = np.zeros((8, 28, 28, 1), np.uint8), np.arange(8) % 10
  >>> measures = norm_measures(models.make_apply_fn(model), init, init, images, labels)
"""

from jax_memat.analysis.complexity.correlation import (
    correlate,
    granulated_tau,
    kendall_tau_b,
    robust_gap,
)
from jax_memat.analysis.complexity.flatness import (
    average_robust_flatness,
    plot_weight_loss_landscape,
    weight_loss_landscape,
    worst_case_robust_flatness,
)
from jax_memat.analysis.complexity.input_space import input_gradient_norm, local_lipschitz
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
from jax_memat.analysis.complexity.perturb import PERTURB_SETS
from jax_memat.analysis.complexity.sharpness import pac_bayes_sigma, worst_case_sharpness

__all__ = [
    "BN_POLICIES",
    "CONV_NORMS",
    "LayerNorms",
    "LayerTrace",
    "Layers",
    "MarginStats",
    "PERTURB_SETS",
    "TracedOp",
    "WeightLayer",
    "apply_layers",
    "average_robust_flatness",
    "bn_policy",
    "conv_operator_norm",
    "correlate",
    "extract_layers",
    "granulated_tau",
    "input_gradient_norm",
    "kendall_tau_b",
    "l21_norm",
    "layer_norms",
    "local_lipschitz",
    "log_bartlett_complexity",
    "margin_gamma",
    "norm_measures",
    "normalized_margins",
    "output_margins",
    "pac_bayes_sigma",
    "path_norm",
    "plot_weight_loss_landscape",
    "require_positive",
    "robust_gap",
    "spectral_norm",
    "trace_layers",
    "weight_loss_landscape",
    "worst_case_robust_flatness",
    "worst_case_sharpness",
]
