"""Norm-based complexity measures of a network's weight layers (claim C3 of Dong et al. 2022).

The measures are those of Jiang et al. 2020 ("Fantastic Generalization
Measures and Where to Find Them", section 7 and appendix C), after Neyshabur
et al. 2017 ("Exploring Generalization in Deep Learning") and Bartlett et al.
2017 ("Spectrally-normalized margin bounds for neural networks"), computed on
the ``WeightLayer``s of ``layers.extract_layers`` (BatchNorm folded or as
diagonal layers). Formulas are in docs/complexity.md; with d layers W_i:

* Frobenius family: ``log prod_i ||W_i||_F^2``, the same over gamma^2,
  ``sum-of-fro = d (prod_i ||W_i||_F^2)^(1/d)`` (and over gamma^2 inside the
  root), ``param_norm = sum_i ||W_i||_F^2``.
* Spectral family: ``log prod_i ||W_i||_2^2`` (and over gamma^2),
  ``fro/spec = sum_i ||W_i||_F^2 / ||W_i||_2^2``, the spectral bound
  ``prod_i ||W_i||_2^2 / gamma^2 * sum_j ||W_j||_F^2 / ||W_j||_2^2`` and its
  variant with ``||W_j - W_j^0||_F^2``.
* Distance to initialization: ``sum_i ||W_i - W_i^0||_F^2`` and ``sum_i ||W_i - W_i^0||_2^2``.
* Path norm: ``sum_k f_{w^2}(1)[k]`` (``path_norm``).
* Bartlett et al.'s spectral complexity
  ``R = prod_i ||W_i||_2 * (sum_i (||W_i^T - M_i^T||_{2,1} / ||W_i||_2)^(2/3))^(3/2)``.

A conv layer's spectral norm is either the reshaped kernel's (the HWIO kernel
as a ``(kh kw c_in) x c_out`` matrix: ``conv_norm="reshaped"``) or the true
operator norm of the convolution at the layer's input shape, stride and
padding, by power iteration on the convolution and its transpose
(``conv_norm="operator"``). Norms are reduced in float64 on the host and
products are returned as logarithms: over ~30 layers they overflow.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_memat.analysis.complexity import margins as margins_lib
from jax_memat.analysis.complexity.layers import (
    Layers,
    WeightLayer,
    apply_layers,
    check_bn_policy,
    check_same_structure,
    extract_layers,
)
from jax_memat.attacks import AttackSpec

CONV_NORMS: tuple[str, ...] = ("operator", "reshaped")


def check_conv_norm(conv_norm: str) -> None:
    """Raises ``ValueError`` unless ``conv_norm`` is one of ``CONV_NORMS``."""
    if conv_norm not in CONV_NORMS:
        raise ValueError(
            f"Unknown conv_norm={conv_norm!r}; accepted: {', '.join(CONV_NORMS)} "
            "(operator: power iteration on the convolution; reshaped: the kernel as a matrix)."
        )


def _as_matrix(layer: WeightLayer, kernel: np.ndarray) -> np.ndarray:
    """The kernel as a ``[inputs, outputs]`` matrix (a diagonal layer: ``diag(s)``)."""
    if layer.kind == "bn":
        return np.diag(kernel)
    return kernel.reshape(-1, kernel.shape[-1])


def conv_operator_norm(
    module: nn.Module,
    kernel: np.ndarray | jax.Array,
    input_shape: Sequence[int],
    *,
    iterations: int = 1000,
    tol: float = 1e-6,
    seed: int = 0,
    info: dict | None = None,
    _cache: dict | None = None,
) -> float:
    """The largest singular value of a linear layer as an operator on its input.

    Power iteration on ``A^T A`` where ``A`` applies ``module`` (an unbound
    bias-free ``nn.Conv`` or ``nn.Dense``) with ``kernel`` to one example of
    ``input_shape``, and ``A^T`` is ``jax.linear_transpose`` of it: padding
    and stride are the module's own. The estimate ``||A v||`` (``v`` the unit
    iterate) never exceeds the true norm and increases towards it, at the rate
    ``(s_2 / s_1)^2`` per iteration. The iteration stops when one step raises
    the estimate by at most ``tol`` relatively, or after ``iterations``
    steps. At rate ``rho`` the remaining error is about ``rho / (1 - rho)``
    times the last step, so the stopping rule is tight when the top singular
    value is separated. Convolutions often have nearly equal top singular
    values (symmetric kernels, small maps); the estimate then lies between
    ``s_2`` and ``s_1`` and its relative error is at most the gap.

    Args:
      module: the layer (``WeightLayer.module``).
      kernel: its kernel.
      input_shape: one example's input shape at the layer, e.g. ``(8, 8, 16)``.
      iterations: the most power iterations (float32, on the default device).
      tol: relative increase of the estimate below which the iteration stops;
        0 stops only when an iteration does not raise it at all.
      seed: seed of the random start.
      info: if a dict, receives ``"iterations"`` (the steps taken) and
        ``"converged"`` (whether the stopping rule was met before the limit).

    Returns:
      The estimated operator 2-norm.

    Raises:
      ValueError: for ``iterations < 1`` or ``tol`` outside ``[0, 1)``.

    Example:
      >>> conv = nn.Conv(1, (1, 1), use_bias=False)
      >>> conv_operator_norm(conv, np.full((1, 1, 1, 1), 3.0), (4, 4, 1))  # doctest: +ELLIPSIS
      3.0...
    """
    check_power_iteration(iterations, tol)
    input_shape = tuple(int(d) for d in input_shape)
    key = (repr(module), input_shape, tuple(np.shape(kernel)))
    cache = {} if _cache is None else _cache
    if key not in cache:

        def run(kernel, start, max_steps, tol):
            def forward(x: jax.Array) -> jax.Array:
                return module.apply({"params": {"kernel": kernel}}, x)

            transpose = jax.linear_transpose(forward, start)

            def keep_going(carry):
                step, _, previous, current = carry
                rising = current - previous > tol * current
                return (step < max_steps) & ((step < 2) | rising)

            def body(carry):
                step, v, _, current = carry
                w = transpose(forward(v))[0]
                # A zero operator maps everything to 0: keep v rather than divide by 0.
                norm = jnp.linalg.norm(w)
                v = jnp.where(norm > 0, w / jnp.where(norm > 0, norm, 1.0), v)
                return step + 1, v, current, jnp.linalg.norm(forward(v))

            v = start / jnp.linalg.norm(start)
            sigma = jnp.linalg.norm(forward(v))
            carry = (jnp.int32(0), v, jnp.zeros_like(sigma), sigma)
            steps, _, previous, sigma = jax.lax.while_loop(keep_going, body, carry)
            return sigma, steps, (steps >= 2) & (sigma - previous <= tol * sigma)

        cache[key] = jax.jit(run)
    start = jax.random.normal(jax.random.key(seed), (1, *input_shape), jnp.float32)
    sigma, steps, converged = cache[key](
        jnp.asarray(kernel, jnp.float32), start, jnp.int32(iterations), jnp.float32(tol)
    )
    if info is not None:
        info["iterations"] = int(steps)
        info["converged"] = bool(converged)
    return float(sigma)


def check_power_iteration(
    iterations: int, tol: float, names: tuple[str, str] = ("iterations", "tol")
) -> None:
    """Raises ``ValueError`` unless ``iterations >= 1`` is an int and ``0 <= tol < 1``.

    ``names`` are the arguments' names as the caller spells them, for the message.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"{names[0]} must be a positive int, got {iterations!r}.")
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 <= tol < 1:
        raise ValueError(
            f"{names[1]} must be a number in [0, 1) (0: stop only when the estimate stops "
            f"rising), got {tol!r}."
        )


def spectral_norm(
    layer: WeightLayer,
    kernel: np.ndarray | None = None,
    *,
    conv_norm: str = "operator",
    iterations: int = 1000,
    tol: float = 1e-6,
    seed: int = 0,
    info: dict | None = None,
    _cache: dict | None = None,
) -> float:
    """``||W||_2`` of one layer (or of another kernel of its shape, e.g. ``W - W0``).

    Dense kernels and reshaped conv kernels: the exact largest singular value
    (float64 SVD). Conv kernels with ``conv_norm="operator"``: the
    convolution's operator norm (``conv_operator_norm``). Diagonal
    BatchNorm layers: ``max |s|``.

    Args:
      layer: a ``WeightLayer``.
      kernel: the kernel to measure (default ``layer.kernel``).
      conv_norm: ``"operator"`` or ``"reshaped"``.
      iterations: the most power iterations for the operator norm.
      tol: the power iteration's stopping rule (``conv_operator_norm``).
      seed: seed of the power iteration's start.
      info: filled by ``conv_operator_norm`` when it runs (else left alone).

    Returns:
      The spectral norm.

    Example:
      >>> layer = WeightLayer("d", ("d",), "dense", np.diag([3.0, 1.0]), None, (2,), None, None)
      >>> spectral_norm(layer)
      3.0
    """
    check_conv_norm(conv_norm)
    kernel = layer.kernel if kernel is None else np.asarray(kernel, np.float64)
    if layer.kind == "bn":
        return float(np.max(np.abs(kernel)))
    if layer.kind == "conv" and conv_norm == "operator":
        return conv_operator_norm(
            layer.module,
            kernel,
            layer.input_shape,
            iterations=iterations,
            tol=tol,
            seed=seed,
            info=info,
            _cache=_cache,
        )
    return float(np.linalg.norm(_as_matrix(layer, kernel), 2))


def l21_norm(layer: WeightLayer, kernel: np.ndarray | None = None) -> float:
    """Bartlett et al.'s ``||W^T||_{2,1}``: the sum of the l2 norms of W's rows.

    In Bartlett et al.'s notation a layer maps ``x -> W x``, so the columns of
    ``W^T`` are the weight vectors of the output units; here that is the sum
    over output channels of the l2 norm of each output's kernel slice (a conv
    counts each output channel once, as its reshaped kernel), and ``sum |s|``
    for a diagonal layer.

    Args:
      layer: a ``WeightLayer``.
      kernel: the kernel to measure (default ``layer.kernel``; pass ``W - M`` for a reference M).

    Returns:
      The (2,1) norm.

    Example:
      >>> layer = WeightLayer("d", ("d",), "dense", np.array([[3.0, 0.0], [4.0, 1.0]]),
      ...                     None, (2,), None, None)
      >>> l21_norm(layer)  # columns (3, 4) and (0, 1)
      6.0
    """
    kernel = layer.kernel if kernel is None else np.asarray(kernel, np.float64)
    if layer.kind == "bn":
        return float(np.sum(np.abs(kernel)))
    return float(np.sum(np.linalg.norm(_as_matrix(layer, kernel), axis=0)))


@dataclasses.dataclass(frozen=True)
class LayerNorms:
    """Per-layer norms, float64 arrays over the d weight layers.

    Attributes:
      names: layer names.
      fro_sq: ``||W_i||_F^2``.
      spec: ``||W_i||_2`` (which conv norm: ``conv_norm``).
      l21: ``||W_i^T||_{2,1}``.
      dist_fro_sq: ``||W_i - W_i^0||_F^2`` (None without init layers).
      dist_spec: ``||W_i - W_i^0||_2`` (None without init layers).
      dist_l21: ``||W_i^T - W_i^0T||_{2,1}`` (None without init layers).
      conv_norm: ``"operator"`` or ``"reshaped"``.
      power_iterations: the most power iterations any operator norm took
        (0 when none ran).
      power_converged: whether every operator norm met its stopping rule.
    """

    names: tuple[str, ...]
    fro_sq: np.ndarray
    spec: np.ndarray
    l21: np.ndarray
    dist_fro_sq: np.ndarray | None
    dist_spec: np.ndarray | None
    dist_l21: np.ndarray | None
    conv_norm: str
    power_iterations: int = 0
    power_converged: bool = True


def layer_norms(
    layers: Layers,
    init_layers: Layers | None = None,
    *,
    conv_norm: str = "operator",
    iterations: int = 1000,
    tol: float = 1e-6,
    seed: int = 0,
) -> LayerNorms:
    """Frobenius, spectral and (2,1) norms of every layer, and of its distance to init.

    Args:
      layers: from ``extract_layers``.
      init_layers: the same model's layers at initialization, extracted with
        the same policy (``extract_layers(None, init_variables, bn=...,
        trace=layers.trace)``), or None.
      conv_norm: ``"operator"`` or ``"reshaped"``.
      iterations: the most power iterations of each conv operator norm.
      tol: their stopping rule (``conv_operator_norm``).
      seed: seed of the power iterations.

    Returns:
      A ``LayerNorms``.

    Raises:
      ValueError: for an unknown ``conv_norm`` or init layers that do not match.

    Example:
      >>> from jax_memat import models
      >>> model = models.get_model("small_cnn", 10)
      >>> variables = models.init_model(model, jax.random.key(0), (28, 28, 1))
      >>> layers = extract_layers(models.make_apply_fn(model), variables, (28, 28, 1))
      >>> layer_norms(layers, conv_norm="reshaped").names
      ('conv1+bn1', 'conv2+bn2', 'fc1', 'linear')
    """
    check_conv_norm(conv_norm)
    check_power_iteration(iterations, tol)
    if init_layers is not None:
        same = len(init_layers.layers) == len(layers.layers) and all(
            a.name == b.name and a.kernel.shape == b.kernel.shape
            for a, b in zip(layers.layers, init_layers.layers, strict=False)
        )
        if not same:
            raise ValueError(
                "init_layers do not match layers (another model or another BatchNorm policy)."
            )
    cache: dict = {}
    runs: list[dict] = []

    def spec(layer: WeightLayer, kernel: np.ndarray) -> float:
        info: dict = {}
        value = spectral_norm(
            layer,
            kernel,
            conv_norm=conv_norm,
            iterations=iterations,
            tol=tol,
            seed=seed,
            info=info,
            _cache=cache,
        )
        if info:
            runs.append(info)
        return value

    fro_sq, specs, l21 = [], [], []
    dist_fro_sq, dist_spec, dist_l21 = [], [], []
    for index, layer in enumerate(layers.layers):
        fro_sq.append(float(np.sum(layer.kernel**2)))
        specs.append(spec(layer, layer.kernel))
        l21.append(l21_norm(layer))
        if init_layers is not None:
            delta = layer.kernel - init_layers.layers[index].kernel
            dist_fro_sq.append(float(np.sum(delta**2)))
            dist_spec.append(spec(layer, delta))
            dist_l21.append(l21_norm(layer, delta))
    with_init = init_layers is not None
    return LayerNorms(
        names=tuple(layer.name for layer in layers.layers),
        fro_sq=np.asarray(fro_sq, np.float64),
        spec=np.asarray(specs, np.float64),
        l21=np.asarray(l21, np.float64),
        dist_fro_sq=np.asarray(dist_fro_sq, np.float64) if with_init else None,
        dist_spec=np.asarray(dist_spec, np.float64) if with_init else None,
        dist_l21=np.asarray(dist_l21, np.float64) if with_init else None,
        conv_norm=conv_norm,
        power_iterations=max((r["iterations"] for r in runs), default=0),
        power_converged=all(r["converged"] for r in runs),
    )


def _log(x: float | np.ndarray) -> Any:
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(x, np.float64))


def log_bartlett_complexity(spec: np.ndarray, l21: np.ndarray) -> float:
    """``log R``, Bartlett et al.'s spectral complexity, from per-layer norms.

    ``R = prod_i ||W_i||_2 * (sum_i (||W_i^T - M_i^T||_{2,1} / ||W_i||_2)^(2/3))^(3/2)``
    (Bartlett et al. 2017, Theorem 1.1, with the activations' Lipschitz
    constants 1 and the reference matrices M_i either 0 (pass ``l21``) or the
    initialization (pass ``dist_l21``)).

    Args:
      spec: ``||W_i||_2`` per layer.
      l21: ``||W_i^T - M_i^T||_{2,1}`` per layer.

    Returns:
      ``log R`` (float64).

    Example:
      >>> float(np.exp(log_bartlett_complexity(np.array([2.0, 1.0]), np.array([2.0, 1.0]))))
      5.656854...
    """
    spec = np.asarray(spec, np.float64)
    ratio_sum = np.sum((np.asarray(l21, np.float64) / spec) ** (2.0 / 3.0))
    return float(np.sum(_log(spec)) + 1.5 * _log(ratio_sum))


def path_norm(apply_fn: Callable[..., Any], variables: Mapping[str, Any], layers: Layers) -> float:
    """The squared l2 path norm, ``sum_k f_{w^2}(1)[k]`` (Neyshabur et al. 2015; Jiang et al. 2020).

    Every weight layer's kernel and bias are squared elementwise (after
    BatchNorm folding; a diagonal BatchNorm becomes ``x -> s^2 x + t^2`` with
    ``t = beta - s * mean`` its shift), the network runs once in inference
    mode on an all-ones input of the traced image shape, and the logits are
    summed. With nonnegative weights and inputs ReLU is the identity, so a
    network of conv/dense layers gives the sum over all input-output paths of
    the product of the squared weights on the path (paths starting at a bias
    count too). What the trick does not square:

    * average pooling (and the global average pool before the classifier)
      keeps its coefficient ``1/k`` instead of ``1/k^2``;
    * a max pool passes the largest of its (nonnegative) inputs, i.e. only
      the window position with the largest path sum, instead of summing over
      the window: it is a lower bound of the sum over the pool's paths.

    Computed in float64 on the host's CPU (``jax.enable_x64`` for this one
    forward pass): the sum has one term per path, and products of squared
    weights over tens of layers overflow float32 (``3.4e38``) long before
    float64 (``1.8e308``). A result that still overflows is ``inf``.

    Args:
      apply_fn: the model function ``layers`` was traced with.
      variables: the variables ``layers`` was extracted from (only their
        structure is used; the layers hold the values).
      layers: from ``extract_layers``.

    Returns:
      The path norm (squared), a float.

    Example:
      >>> from jax_memat import models
      >>> model = models.get_model("small_cnn", 10)
      >>> variables = models.init_model(model, jax.random.key(0), (28, 28, 1))
      >>> apply = models.make_apply_fn(model)
      >>> path_norm(apply, variables, extract_layers(apply, variables, (28, 28, 1))) > 0
      True
    """
    squared = dataclasses.replace(
        layers,
        layers=tuple(
            dataclasses.replace(
                layer,
                kernel=layer.kernel**2,
                bias=None if layer.bias is None else layer.bias**2,
            )
            for layer in layers.layers
        ),
    )
    ones = np.ones((1, *layers.trace.image_shape), np.float64)
    with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
        logits = apply_layers(apply_fn, variables, squared, ones, dtype=jnp.float64)
        return float(jnp.sum(logits))


def norm_measures(
    apply_fn: Callable[..., Any],
    variables: Mapping[str, Any],
    init_variables: Mapping[str, Any],
    images: np.ndarray | jax.Array,
    labels: np.ndarray | jax.Array,
    *,
    bn: str = "fold",
    conv_norm: str = "operator",
    margin_percentile: float = 10.0,
    attack: AttackSpec | None = None,
    seed: int = 0,
    batch_size: int = 256,
    power_iterations: int = 1000,
    power_tol: float = 1e-6,
) -> dict[str, float]:
    """Every norm- and margin-based measure of one model, by name (docs/complexity.md).

    gamma is the ``margin_percentile``-th percentile of the output margins on
    ``(images, labels)``: clean, or at adversarial points of ``attack``
    (e.g. ``AttackSpec("cw", eps=8/255, step_size=2/255, steps=10)``)
    against this model. When gamma <= 0 the ``*_over_margin`` measures and
    the spectral bounds are NaN (never computed with ``|gamma|``) and
    ``margin_positive`` is 0.

    Keys (logs are natural logarithms; "fro"/"spec" are squared norms in products):

    * ``num_layers``; ``param_norm``; ``log_prod_fro``,
      ``log_prod_fro_over_margin``; ``sum_of_fro``, ``sum_of_fro_over_margin``;
    * ``log_prod_spec``, ``log_prod_spec_over_margin``; ``fro_over_spec``;
      ``log_spec_bound``, ``log_spec_bound_init``;
    * ``dist_fro``, ``dist_spec``;
    * ``path_norm``, ``path_norm_over_margin``;
    * ``log_bartlett``, ``log_bartlett_over_margin`` (M_i = 0) and
      ``log_bartlett_init``, ``log_bartlett_init_over_margin`` (M_i = init);
    * settings: ``margin_gamma``, ``margin_percentile``, ``margin_positive``
      (1/0), ``margin_adversarial`` (1/0), ``conv_norm_operator`` (1: conv
      spectral norms are operator norms, 0: reshaped kernels),
      ``bn_folded`` and ``bn_diagonal`` (BatchNorm counts under the policy);
      ``power_iterations`` (the most any conv operator norm took) and
      ``power_converged`` (1 when every one met its stopping rule, 0 when
      one ran out of iterations: its norm is then a lower bound).

    Args:
      apply_fn: ``apply(variables, images, train) -> (logits, state)`` of
        Flax modules, unjitted (``models.make_apply_fn``).
      variables: the measured variables.
      init_variables: the same model's variables at initialization.
      images: ``[N, H, W, C]`` inputs, uint8 or float in [0, 1].
      labels: ``[N]`` integer labels (those the margins are taken against).
      bn: BatchNorm policy, ``"fold"`` or ``"diagonal"`` (``layers``).
      conv_norm: conv spectral norm, ``"operator"`` or ``"reshaped"``.
      margin_percentile: percentile of the margins taken as gamma, in [0, 100].
      attack: None for clean margins, else the attack (run in inference mode).
      seed: seed of the attack's random start and of the power iterations.
      batch_size: examples per margin batch.
      power_iterations: the most iterations of each conv operator norm.
      power_tol: their stopping rule: the relative rise of the estimate in
        one iteration below which it stops (``conv_operator_norm``).

    Returns:
      ``{name: float}``.

    Raises:
      ValueError: for a bad argument, before anything is traced or compiled.

    Example:
      >>> from jax_memat import models
      >>> model = models.get_model("small_cnn", 10)
      >>> init = models.init_model(model, jax.random.key(0), (28, 28, 1))
      >>> images = np.zeros((8, 28, 28, 1), np.uint8)
      >>> labels = np.arange(8) % 10
      >>> measures = norm_measures(models.make_apply_fn(model), init, init, images, labels,
      ...                          conv_norm="reshaped")
      >>> measures["dist_fro"]
      0.0
    """
    check_bn_policy(bn)
    check_conv_norm(conv_norm)
    margins_lib.check_percentile(margin_percentile)
    check_same_structure(variables, init_variables)
    margins_lib.check_inputs(images, labels, batch_size)
    if attack is not None:
        attack.validate()
    check_power_iteration(power_iterations, power_tol, ("power_iterations", "power_tol"))

    image_shape = tuple(np.shape(images)[1:])
    layers = extract_layers(apply_fn, variables, image_shape, bn=bn)
    init_layers = extract_layers(None, init_variables, bn=bn, trace=layers.trace)
    norms = layer_norms(
        layers,
        init_layers,
        conv_norm=conv_norm,
        iterations=power_iterations,
        tol=power_tol,
        seed=seed,
    )
    margin_values = margins_lib.output_margins(
        apply_fn, variables, images, labels, attack=attack, seed=seed, batch_size=batch_size
    )
    stats = margins_lib.margin_gamma(margin_values, margin_percentile)
    log_gamma_sq = 2.0 * math.log(stats.gamma) if stats.positive else math.nan

    d = len(norms.names)
    log_prod_fro = float(np.sum(_log(norms.fro_sq)))
    log_prod_spec = float(2.0 * np.sum(_log(norms.spec)))
    fro_over_spec = float(np.sum(norms.fro_sq / norms.spec**2))
    dist_over_spec = float(np.sum(norms.dist_fro_sq / norms.spec**2))
    log_bartlett = log_bartlett_complexity(norms.spec, norms.l21)
    log_bartlett_init = log_bartlett_complexity(norms.spec, norms.dist_l21)
    paths = path_norm(apply_fn, variables, layers)
    policy = list(layers.bn_policy.values())
    return {
        "num_layers": float(d),
        "param_norm": float(np.sum(norms.fro_sq)),
        "log_prod_fro": log_prod_fro,
        "log_prod_fro_over_margin": log_prod_fro - log_gamma_sq,
        "sum_of_fro": float(d * np.exp(log_prod_fro / d)),
        "sum_of_fro_over_margin": float(d * np.exp((log_prod_fro - log_gamma_sq) / d)),
        "log_prod_spec": log_prod_spec,
        "log_prod_spec_over_margin": log_prod_spec - log_gamma_sq,
        "fro_over_spec": fro_over_spec,
        "log_spec_bound": log_prod_spec - log_gamma_sq + float(_log(fro_over_spec)),
        "log_spec_bound_init": log_prod_spec - log_gamma_sq + float(_log(dist_over_spec)),
        "dist_fro": float(np.sum(norms.dist_fro_sq)),
        "dist_spec": float(np.sum(norms.dist_spec**2)),
        "path_norm": paths,
        "path_norm_over_margin": paths / stats.gamma**2 if stats.positive else math.nan,
        "log_bartlett": log_bartlett,
        "log_bartlett_over_margin": log_bartlett - log_gamma_sq / 2.0,
        "log_bartlett_init": log_bartlett_init,
        "log_bartlett_init_over_margin": log_bartlett_init - log_gamma_sq / 2.0,
        "margin_gamma": stats.gamma,
        "margin_percentile": float(margin_percentile),
        "margin_positive": float(stats.positive),
        "margin_adversarial": float(attack is not None),
        "conv_norm_operator": float(conv_norm == "operator"),
        "bn_folded": float(sum(p != "diagonal" for p in policy)),
        "bn_diagonal": float(sum(p == "diagonal" for p in policy)),
        "power_iterations": float(norms.power_iterations),
        "power_converged": float(norms.power_converged),
    }
