"""Robust flatness (Stutz et al., 2021) and the weight-loss landscape (Wu et al., 2020).

Both measure the robust cross-entropy ``RCE(w)``: the mean cross-entropy of
``f_w`` at adversarial examples crafted against ``f_w`` itself, so the attack
is re-run after every weight perturbation (``perturb.subset_metrics``), with
BatchNorm in inference mode.

- **Average-case robust flatness** (Stutz et al., "Relating adversarially
  robust generalization to flat minima", ICCV 2021, Sec. 4):
  ``E_nu[RCE(w + nu)] - RCE(w)`` over ``num_samples`` (10) random ``nu`` on the
  layer-wise relative sphere ``||nu_l||_2 = xi ||w_l||_2`` (``xi = 0.5``); every
  parameter tensor of the ``which`` set is a layer (default ``"weights"``:
  normalization layers excluded, as theirs).
- **Worst-case robust flatness** (same paper): ``max_{||nu_l|| <= xi ||w_l||}
  RCE(w + nu) - RCE(w)`` with a small ``xi`` (0.003), approximated by ``steps``
  (20) steps of layer-wise normalized gradient ascent from a random point of
  the ball, each step on the attack regenerated against the current
  ``w + nu`` (the weight and input attacks run jointly), then projected back
  onto the ball.
- **Weight-loss landscape** (Wu et al., "Adversarial weight perturbation helps
  robust generalization", NeurIPS 2020, Sec. 3): ``g(a) = RCE(w + a d)`` over a
  grid of ``a`` along a filter-normalized Gaussian direction ``d`` (Li et al.,
  2018) and along the adversarial direction (the gradient of RCE in the
  weights, normalized the same way), on (training) adversarial examples; the
  summary is ``g(a0) - g(0)``. ``plot_weight_loss_landscape`` draws both curves.

The generic parts (``sphere_deviation``, ``ball_ascent``) take any loss of the
parameters, which is how the tests pin them down on a known quadratic.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jax_memat.analysis.complexity import perturb
from jax_memat.attacks import AttackSpec
from jax_memat.fileio import atomic_write

Progress = Callable[[int, int], None]


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number > 0; got {value!r}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}.")
    return float(value)


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}.")
    return int(value)


def _check_attack(attack: object) -> AttackSpec:
    if not isinstance(attack, AttackSpec):
        raise ValueError(
            "the robust cross-entropy needs attack=AttackSpec(...), e.g. "
            f"AttackSpec('pgd', eps=8 / 255, step_size=2 / 255, steps=20); got {attack!r}."
        )
    attack.validate()
    return attack


def sphere_deviation(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    mask: Any,
    xi: float | jax.Array,
    key: jax.Array,
    *,
    num_samples: int,
    base: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``loss(w + nu) - loss(w)`` for ``num_samples`` random ``nu`` on the layer-wise sphere.

    ``nu`` is a Gaussian direction rescaled tensor by tensor to
    ``||nu_l|| = xi ||w_l||`` (``perturb.layer_normalize``). Traceable.

    Args:
      loss_fn: ``params -> scalar`` loss (close over any attack key, so every
        ``nu`` sees the same attack starts and only the weights differ).
      params: the weights ``w``.
      mask: which leaves move (``perturb.perturbation_mask``).
      xi: the relative radius.
      key: PRNG key of the directions.
      num_samples: number of directions (static).
      base: ``loss(w)`` if already known (else computed).

    Returns:
      ``(deviations [num_samples], loss(w))``.

    Example:
      >>> dev, base = sphere_deviation(lambda p: jnp.sum(p ** 2), w, True, 0.5,
      ...                              jax.random.key(0), num_samples=10)
    """
    base = loss_fn(params) if base is None else base

    def one(k):
        nu = perturb.layer_normalize(perturb.gaussian_direction(k, params, mask), params, mask, xi)
        return loss_fn(jax.tree.map(jnp.add, params, nu)) - base

    return jax.lax.map(one, jax.random.split(key, num_samples)), base


def _project_ball(nu: Any, params: Any, mask: Any, xi: float | jax.Array) -> Any:
    def one(m: bool, n: jax.Array, w: jax.Array) -> jax.Array:
        if not m:
            return jnp.zeros_like(n)
        radius = xi * jnp.sqrt(jnp.sum(jnp.square(w)))
        norm = jnp.sqrt(jnp.sum(jnp.square(n)))
        return n * jnp.minimum(1.0, radius / jnp.where(norm > 0, norm, 1.0))

    return jax.tree.map(one, mask, nu, params)


def ball_start(params: Any, mask: Any, xi: float | jax.Array, key: jax.Array) -> Any:
    """A random point of the layer-wise ball ``||nu_l|| <= xi ||w_l||`` (traceable).

    A layer-normalized Gaussian direction times one uniform radius fraction:
    the ascent must not start at ``nu = 0``, where a loss symmetric around
    ``w`` has no gradient.
    """
    direction_key, radius_key = jax.random.split(key)
    direction = perturb.gaussian_direction(direction_key, params, mask)
    fraction = jax.random.uniform(radius_key, (), jnp.float32)
    return perturb.layer_normalize(direction, params, mask, xi * fraction)


def ball_step(
    nu: Any, grad: Any, params: Any, mask: Any, xi: float | jax.Array, frac: float
) -> Any:
    """One ascent step ``nu_l += frac * xi ||w_l|| g_l / ||g_l||``, projected onto the ball."""
    step = perturb.layer_normalize(grad, params, mask, frac * xi)
    return _project_ball(jax.tree.map(jnp.add, nu, step), params, mask, xi)


def ball_ascent(
    value_and_grad_fn: Callable[[Any, jax.Array], tuple[jax.Array, Any]],
    params: Any,
    mask: Any,
    xi: float | jax.Array,
    key: jax.Array,
    *,
    steps: int,
    step_fraction: float | None = None,
) -> Any:
    """Layer-wise normalized gradient ascent in ``||nu_l|| <= xi ||w_l||`` (traceable).

    ``ball_start``, then ``steps`` times ``ball_step`` on the gradient of the
    loss at ``w + nu``. ``worst_case_robust_flatness`` runs the same pieces
    one jitted step at a time (to show progress).

    Args:
      value_and_grad_fn: ``(params, key) -> (loss, grad)``; step ``t`` gets
        ``fold_in(key, t)`` (an input attack is regenerated each step).
      params: the weights ``w``.
      mask: which leaves move.
      xi: the relative radius.
      key: PRNG key.
      steps: ascent steps (static).
      step_fraction: step length relative to the ball's radius (default ``2.5 / steps``).

    Returns:
      The final ``nu``.

    Example:
      >>> vg = jax.value_and_grad(lambda p, k: jnp.sum(p ** 2))
      >>> nu = ball_ascent(vg, w, True, 0.1, jax.random.key(0), steps=20)
    """
    frac = _step_fraction(step_fraction, steps)
    start_key, step_key = jax.random.split(key)

    def step(t, nu):
        _, g = value_and_grad_fn(jax.tree.map(jnp.add, params, nu), jax.random.fold_in(step_key, t))
        return ball_step(nu, g, params, mask, xi, frac)

    return jax.lax.fori_loop(0, steps, step, ball_start(params, mask, xi, start_key))


def _step_fraction(step_fraction: object, steps: int) -> float:
    if step_fraction is None:
        return 2.5 / max(steps, 1)
    return _check_positive("step_fraction", step_fraction)


def _prepare(apply_fn, variables, images, labels, attack, which, num_examples, batch_size, mesh):
    attack = _check_attack(attack)
    perturb.check_perturb_set(which)
    mesh = perturb.resolve_mesh(mesh)
    n = perturb.check_data(images, labels, num_examples)
    batch_size = perturb.check_batch(batch_size, mesh)
    subset = perturb.data_subset(images, labels, num_examples=n, batch_size=batch_size, mesh=mesh)
    variables = perturb.place_variables(variables, mesh)
    mask = perturb.perturbation_mask(variables["params"], which)
    return subset, variables, mask, attack


def average_robust_flatness(
    apply_fn: perturb.ApplyFn,
    variables: Mapping[str, Any],
    images: Any,
    labels: Any,
    *,
    attack: AttackSpec,
    key: jax.Array,
    xi: float = 0.5,
    num_samples: int = 10,
    which: str = perturb.DEFAULT_PERTURB,
    num_examples: int | None = None,
    batch_size: int = 256,
    mesh: Mesh | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Average-case robust flatness: mean ``RCE(w + nu) - RCE(w)`` on the relative sphere.

    Args:
      apply_fn: the model function.
      variables: ``{"params": ..., "batch_stats": ...}``.
      images, labels: the split (floats in [0, 1], integer labels).
      attack: the attack of the robust cross-entropy (Stutz et al. use PGD-20),
        re-run against every ``w + nu``.
      key: seeds the directions and the attack starts (the same starts for
        every ``nu``).
      xi: relative radius of the sphere.
      num_samples: random directions averaged (each one jitted call, one
        ``progress`` tick).
      which: perturbed parameters (default ``"weights"``: no normalization layers).
      num_examples, batch_size, mesh: the subset and its data parallelism.
      progress: ``progress(done, num_samples)``.

    Returns:
      A dict: ``flatness`` (the mean deviation), ``deviations`` (per sample),
      ``rce`` (unperturbed), ``xi``, ``num_examples``.

    Example:
      >>> pgd20 = AttackSpec("pgd", eps=8 / 255, step_size=2 / 255, steps=20)
      >>> average_robust_flatness(apply_fn, variables, x, y, attack=pgd20,
      ...                         key=jax.random.key(0), num_examples=1000)["flatness"]
    """
    xi = _check_positive("xi", xi)
    num_samples = _check_count("num_samples", num_samples)
    subset, variables, mask, attack = _prepare(
        apply_fn, variables, images, labels, attack, which, num_examples, batch_size, mesh
    )
    metrics = perturb.subset_metrics(apply_fn, attack)
    noise_key, attack_key = jax.random.split(perturb.as_key(key))

    @jax.jit
    def rce(variables, subset, attack_key):
        return metrics(variables, subset, attack_key)[1]

    @jax.jit
    def deviation(variables, subset, base, sample_key, attack_key):
        def loss_fn(params):
            return metrics({**variables, "params": params}, subset, attack_key)[1]

        dev, _ = sphere_deviation(
            loss_fn, variables["params"], mask, xi, sample_key, num_samples=1, base=base
        )
        return dev[0]

    base = rce(variables, subset, attack_key)
    # One jitted call per direction, so progress can tick between them; every
    # direction sees the same attack starts (attack_key).
    deviations = []
    for i in range(num_samples):
        dev = deviation(variables, subset, base, jax.random.fold_in(noise_key, i), attack_key)
        deviations.append(float(dev))
        if progress is not None:
            progress(i + 1, num_samples)
    return {
        "flatness": float(np.mean(deviations)),
        "deviations": deviations,
        "rce": float(base),
        "xi": xi,
        "num_examples": subset.num_examples,
    }


def worst_case_robust_flatness(
    apply_fn: perturb.ApplyFn,
    variables: Mapping[str, Any],
    images: Any,
    labels: Any,
    *,
    attack: AttackSpec,
    key: jax.Array,
    xi: float = 0.003,
    steps: int = 20,
    step_fraction: float | None = None,
    which: str = perturb.DEFAULT_PERTURB,
    num_examples: int | None = None,
    batch_size: int = 256,
    mesh: Mesh | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Worst-case robust flatness: ``max RCE(w + nu) - RCE(w)`` over the relative ball.

    ``ball_start`` and ``steps`` jitted ``ball_step``s; each step re-runs the
    attack against the current ``w + nu`` and ascends the cross-entropy at
    those points (the joint weight and input attack of Stutz et al., 2021);
    the final ``RCE(w + nu)`` is measured on a fresh attack against it.

    Args:
      apply_fn, variables, images, labels, attack, key, which, num_examples,
        batch_size, mesh: as ``average_robust_flatness``.
      xi: relative radius of the ball (small: 0.003).
      steps: weight ascent steps.
      step_fraction: step length relative to the radius (default ``2.5 / steps``).
      progress: ``progress(done, steps + 1)`` after each step and the final measurement.

    Returns:
      A dict: ``flatness``, ``rce`` (at ``w``), ``rce_perturbed``, ``xi``,
      ``relative_norm`` (``||nu|| / ||w||`` over the perturbed set, <= ``xi``),
      ``num_examples``.

    Example:
      >>> worst_case_robust_flatness(apply_fn, variables, x, y, attack=pgd20,
      ...                            key=jax.random.key(0), num_examples=1000)["flatness"]
    """
    xi = _check_positive("xi", xi)
    steps = _check_count("steps", steps)
    frac = _step_fraction(step_fraction, steps)
    subset, variables, mask, attack = _prepare(
        apply_fn, variables, images, labels, attack, which, num_examples, batch_size, mesh
    )
    metrics = perturb.subset_metrics(apply_fn, attack)
    loss_grad = perturb.subset_loss_and_grad(apply_fn, attack)
    start_key, step_key, attack_key = jax.random.split(perturb.as_key(key), 3)

    @jax.jit
    def rce(variables, subset, nu, attack_key):
        return metrics(perturb.add_to_params(variables, nu), subset, attack_key)[1]

    @jax.jit
    def start(variables, start_key):
        return ball_start(variables["params"], mask, xi, start_key)

    @jax.jit
    def step(variables, subset, nu, step_key):
        _, g = loss_grad(perturb.add_to_params(variables, nu), subset, step_key)
        return ball_step(nu, g, variables["params"], mask, xi, frac)

    zero = jax.tree.map(jnp.zeros_like, variables["params"])
    base = float(rce(variables, subset, zero, attack_key))
    nu = start(variables, start_key)
    for t in range(steps):
        nu = step(variables, subset, nu, jax.random.fold_in(step_key, t))
        if progress is not None:
            progress(t + 1, steps + 1)
    perturbed = float(rce(variables, subset, nu, attack_key))
    if progress is not None:
        progress(steps + 1, steps + 1)
    w_sq = float(perturb.masked_sq_norm(variables["params"], mask))
    return {
        "flatness": perturbed - base,
        "rce": base,
        "rce_perturbed": perturbed,
        "xi": xi,
        "relative_norm": math.sqrt(float(perturb.tree_sq_norm(nu)) / w_sq) if w_sq > 0 else 0.0,
        "num_examples": subset.num_examples,
    }


DEFAULT_ALPHAS = tuple(np.round(np.linspace(-1.0, 1.0, 21), 10).tolist())
LANDSCAPE_DIRECTIONS = ("random", "adversarial")


def _normalize_direction(direction: Any, params: Any, mask: Any, which: str) -> Any:
    if which == "filter_normalized":
        return perturb.filter_normalize(direction, params, mask)
    return perturb.layer_normalize(direction, params, mask, 1.0)


def weight_loss_landscape(
    apply_fn: perturb.ApplyFn,
    variables: Mapping[str, Any],
    images: Any,
    labels: Any,
    *,
    attack: AttackSpec,
    key: jax.Array,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    a0: float = 0.5,
    directions: Sequence[str] = LANDSCAPE_DIRECTIONS,
    which: str = "filter_normalized",
    num_examples: int | None = None,
    batch_size: int = 256,
    mesh: Mesh | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The weight-loss landscape ``g(a) = RCE(w + a d)`` of Wu et al. (2020).

    Directions ``d``: ``"random"``, a Gaussian direction, and
    ``"adversarial"``, the gradient of ``RCE`` in the weights at ``w``; both
    normalized the same way: filter by filter to the weights' filter norms
    (``which="filter_normalized"``, Li et al., 2018; 1-D parameters fixed) or,
    for the other sets, tensor by tensor to the weights' tensor norms. ``a``
    is then a perturbation relative to the weights' own scale. Every ``g(a)``
    re-runs the attack against ``w + a d``, with the same starts.

    Args:
      apply_fn, variables: the model.
      images, labels: the split (the training split, as Wu et al.).
      attack: the attack of the robust cross-entropy.
      key: seeds the random direction and the attack's starts.
      alphas: the grid of ``a``; must contain 0 and ``a0``.
      a0: where the summary ``g(a0) - g(0)`` is read.
      directions: a subset of ``LANDSCAPE_DIRECTIONS``.
      which: ``perturb.PERTURB_SETS`` (default ``"filter_normalized"``).
      num_examples, batch_size, mesh: the subset and its data parallelism.
      progress: ``progress(done, total)`` after each evaluated ``g(a)``.

    Returns:
      A dict: ``alphas``, ``a0``, ``rce`` (``g(0)``) and, per direction ``k``,
      ``k`` (the list of ``g(a)``) and ``k_summary`` (``g(a0) - g(0)``).

    Example:
      >>> land = weight_loss_landscape(apply_fn, variables, x_train, y_train, attack=pgd10,
      ...                              key=jax.random.key(0), num_examples=1000)
      >>> plot_weight_loss_landscape(land, "landscape.png")
    """
    alphas = [float(a) for a in alphas]
    if not alphas or not all(math.isfinite(a) for a in alphas):
        raise ValueError(f"alphas must be a non-empty sequence of finite numbers; got {alphas!r}.")
    if not any(a == 0 for a in alphas):
        raise ValueError(f"alphas must contain 0 (g(0) is the unperturbed RCE); got {alphas}.")
    if not isinstance(a0, numbers.Real) or not np.any(np.isclose(alphas, a0, rtol=0, atol=1e-9)):
        raise ValueError(f"a0={a0!r} must be one of alphas={alphas}.")
    directions = list(directions)
    if not directions or any(d not in LANDSCAPE_DIRECTIONS for d in directions):
        raise ValueError(
            f"directions must be a non-empty subset of {LANDSCAPE_DIRECTIONS}; got {directions!r}."
        )
    subset, variables, mask, attack = _prepare(
        apply_fn, variables, images, labels, attack, which, num_examples, batch_size, mesh
    )
    metrics = perturb.subset_metrics(apply_fn, attack)
    loss_grad = perturb.subset_loss_and_grad(apply_fn, attack)
    direction_key, attack_key = jax.random.split(perturb.as_key(key))

    @functools.partial(jax.jit, static_argnames="adversarial")
    def make_direction(variables, subset, direction_key, attack_key, adversarial):
        params = variables["params"]
        if adversarial:
            d = loss_grad(variables, subset, attack_key)[1]
        else:
            d = perturb.gaussian_direction(direction_key, params, mask)
        return _normalize_direction(d, params, mask, which)

    @jax.jit
    def g(variables, subset, d, a, attack_key):
        moved = perturb.add_to_params(variables, jax.tree.map(lambda x: a * x, d))
        return metrics(moved, subset, attack_key)[1]

    total, done = len(directions) * len(alphas), 0
    out: dict[str, Any] = {"alphas": alphas, "a0": float(a0), "which": which}
    i0 = alphas.index(0.0)
    i_a0 = int(np.argmin(np.abs(np.asarray(alphas) - a0)))
    for name in directions:
        d = make_direction(
            variables, subset, direction_key, attack_key, adversarial=name == "adversarial"
        )
        values = []
        for a in alphas:
            values.append(float(g(variables, subset, d, jnp.float32(a), attack_key)))
            done += 1
            if progress is not None:
                progress(done, total)
        out[name] = values
        out[f"{name}_summary"] = values[i_a0] - values[i0]
        out["rce"] = values[i0]
    out["num_examples"] = subset.num_examples
    return out


def plot_weight_loss_landscape(landscape: Mapping[str, Any], path: str, title: str = "") -> str:
    """Saves a PNG of ``g(a)`` along each direction of a ``weight_loss_landscape`` result.

    Args:
      landscape: the dict ``weight_loss_landscape`` returns.
      path: the PNG (written atomically: a temporary file, then a rename).
      title: a title (e.g. the run's name).

    Returns:
      ``path``.

    Example:
      >>> plot_weight_loss_landscape(land, "landscape.png", "PGD-AT, 40% noise")
      'landscape.png'
    """
    names = [n for n in LANDSCAPE_DIRECTIONS if n in landscape]
    if "alphas" not in landscape or not names:
        raise ValueError(
            "landscape must be the dict weight_loss_landscape returns (alphas and at least one "
            f"of {LANDSCAPE_DIRECTIONS}); got keys {sorted(landscape)}."
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    try:
        for name in names:
            ax.plot(
                landscape["alphas"], landscape[name], marker="o", ms=3, label=f"{name} direction"
            )
        ax.set_xlabel("a (relative to the weights' filter norms)")
        ax.set_ylabel("robust cross-entropy  g(a)")
        ax.set_title(title or "weight-loss landscape")
        ax.legend()
        fig.tight_layout()
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
    return path
