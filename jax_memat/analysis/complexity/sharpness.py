"""Sharpness measures found by search: PAC-Bayes sigma and worst-case sharpness.

Following Jiang et al., "Fantastic generalization measures and where to find
them" (ICLR 2020, Sec. 7 and Appendix C.3; after Keskar et al., "On
large-batch training for deep learning: generalization gap and sharp minima",
ICLR 2017, and the PAC-Bayes bounds of Neyshabur et al., 2017), each measure
is the largest perturbation scale at which the accuracy drop on a data set
stays at a target (0.1), found by bisection (``bisect``):

- ``pac_bayes_sigma``: the largest ``sigma`` such that the mean accuracy of
  ``f_{w+u}``, ``u ~ N(0, sigma^2 I)`` over ``num_samples`` (10) draws, is
  ``target`` below the accuracy of ``f_w``. Reports ``1 / sigma^2`` and the
  PAC-Bayes bound ``||w - w0||^2 / (4 sigma^2) + log(m / sigma) + 10`` (and the
  same with ``||w||^2``). With ``magnitude_aware=True`` the noise is
  ``u_i ~ N(0, sigma'^2 w_i^2 + eps^2)``, ``eps = 1e-3`` (Jiang et al.'s
  magnitude-aware perturbation), and the bound is their
  ``1/4 sum_i log((eps^2 + (sigma'^2 + 1) ||w - w0||^2 / omega) /
  (eps^2 + sigma'^2 (w_i - w0_i)^2)) + log(m / sigma') + 10``, ``omega`` the
  number of perturbed parameters.
- ``worst_case_sharpness``: the largest ``alpha`` such that projected
  gradient ascent of the cross-entropy over ``|u_i| <= alpha`` (magnitude
  aware: ``alpha |w_i| + 1e-3``), with random restarts, drops the accuracy by
  ``target``. Reports ``1 / alpha^2``.

Conventions:

- BatchNorm runs in inference mode; the perturbed parameters are the
  ``which`` set of ``perturb`` (default ``"weights"``: conv and dense kernels
  and biases, not BatchNorm).
- ``inputs="adversarial"`` measures *robust* accuracy: the attack is re-run
  against every perturbed model (and, in the sharpness ascent, after every
  ascent step), never reused from the unperturbed one.
- The accuracy drop is signed (``acc(w) - acc(w + u)``), where Jiang et al.
  take its absolute value: a perturbation that raises accuracy does not count
  as reaching the target.
- Common random numbers: every step of a search draws the same noise
  directions (scaled by the current ``sigma``) and attack starts, so the
  bisection searches one fixed curve ``drop(sigma)`` instead of a new random
  curve at each step.
- Saturation: the search first evaluates the upper end (2). If the drop there
  is still below ``target - tolerance`` the result is ``saturated=True`` with
  ``sigma = 2``: the measure only says "at least that flat", and a table must
  show it as such.
- The search stops as soon as the measured drop is within ``tolerance``
  (0.01) of the target, or after ``max_steps`` (15) bisection steps.
- ``m`` in the bounds is the number of rows of the arrays passed (the size of
  the training set when the training split is passed), not ``num_examples``.
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
from jax.sharding import Mesh

from jax_memat.analysis.complexity import perturb
from jax_memat.attacks import AttackSpec

MAGNITUDE_EPS = 1e-3
SHARPNESS_EPS = 1e-3

Progress = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The outcome of ``bisect``.

    Attributes:
      value: the scale found (``upper`` when saturated).
      deviation: the deviation measured at ``value``.
      saturated: the deviation at ``upper`` stayed below ``target - tolerance``.
      converged: ``|deviation - target| <= tolerance``.
      history: every ``(scale, deviation)`` evaluated, in order.
    """

    value: float
    deviation: float
    saturated: bool
    converged: bool
    history: tuple[tuple[float, float], ...]


def check_search_args(
    *, target: object, tolerance: object, upper: object, max_steps: object
) -> None:
    """Raises ``ValueError`` unless ``0 < tolerance < target < 1``, ``upper > 0``, steps >= 1."""

    def real(name: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be a real number; got {value!r}.")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite; got {value!r}.")
        return value

    t = real("target", target)
    if not 0 < t < 1:
        raise ValueError(f"target is an accuracy drop: accepted 0 < target < 1; got {target!r}.")
    tol = real("tolerance", tolerance)
    if not 0 < tol < t:
        raise ValueError(f"tolerance must be in (0, target={t}); got {tolerance!r}.")
    if real("upper", upper) <= 0:
        raise ValueError(f"upper (the largest scale searched) must be > 0; got {upper!r}.")
    if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral) or max_steps < 1:
        raise ValueError(f"max_steps must be an int >= 1; got {max_steps!r}.")


def bisect(
    deviation_fn: Callable[[float], float],
    *,
    target: float = 0.1,
    tolerance: float = 0.01,
    upper: float = 2.0,
    max_steps: int = 15,
    progress: Progress | None = None,
) -> SearchResult:
    """The largest scale in ``(0, upper]`` whose deviation reaches ``target``, by bisection.

    ``deviation_fn`` is assumed to grow with the scale, from 0 at scale 0. The
    upper end is evaluated first (saturation); then the interval ``[lo, hi]``
    keeps ``deviation(lo) < target < deviation(hi)`` and is halved until a
    midpoint's deviation is within ``tolerance`` of the target or
    ``max_steps`` midpoints were evaluated (the last midpoint is returned,
    ``converged=False``).

    Args:
      deviation_fn: scale -> deviation (a Python float).
      target: the deviation sought, in (0, 1).
      tolerance: how close to ``target`` is close enough, in (0, target).
      upper: the largest scale searched.
      max_steps: bisection steps after the evaluation of ``upper``.
      progress: called as ``progress(done, max_steps + 1)`` after each
        evaluation, and with ``done = max_steps + 1`` when the search ends
        early (saturated or within tolerance), so the last call always says done.

    Returns:
      A ``SearchResult``.

    Example:
      >>> bisect(lambda s: s / 2, target=0.1).value  # deviation 0.1 at s = 0.2
      0.1875
    """
    check_search_args(target=target, tolerance=tolerance, upper=upper, max_steps=max_steps)
    total = max_steps + 1
    history = []

    def evaluate(scale: float) -> float:
        deviation = float(deviation_fn(scale))
        history.append((scale, deviation))
        if progress is not None:
            progress(len(history), total)
        return deviation

    def finish(result: SearchResult) -> SearchResult:
        if progress is not None and len(history) < total:
            progress(total, total)
        return result

    deviation = evaluate(upper)
    if deviation < target - tolerance:
        return finish(SearchResult(upper, deviation, True, False, tuple(history)))
    lo, hi, value = 0.0, upper, upper
    for _ in range(max_steps):
        if abs(deviation - target) <= tolerance:
            break
        value = (lo + hi) / 2
        deviation = evaluate(value)
        if deviation > target:
            hi = value
        else:
            lo = value
    return finish(
        SearchResult(value, deviation, False, abs(deviation - target) <= tolerance, tuple(history))
    )


def _flat(tree: Any, mask: Any) -> np.ndarray:
    """The masked leaves of ``tree`` as one float64 vector (host)."""
    parts = [
        np.asarray(x, np.float64).ravel()
        for m, x in zip(*map(jax.tree.leaves, (mask, tree)), strict=True)
        if m
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def pac_bayes_bound(sq_norm: float, sigma: float, m: int) -> float:
    """``||w - w_ref||^2 / (4 sigma^2) + log(m / sigma) + 10`` (Jiang et al., 2020, eq. 46).

    Example:
      >>> pac_bayes_bound(4.0, 1.0, 1)
      11.0
    """
    return sq_norm / (4 * sigma**2) + math.log(m / sigma) + 10


def pac_bayes_mag_bound(ref: np.ndarray, sigma: float, m: int, eps: float = MAGNITUDE_EPS) -> float:
    """Jiang et al.'s magnitude-aware bound for reference vector ``ref`` (``w - w0`` or ``w``).

    ``1/4 sum_i log((eps^2 + (sigma^2 + 1) ||ref||^2 / omega) / (eps^2 + sigma^2 ref_i^2))
    + log(m / sigma) + 10``, ``omega = len(ref)``, in float64.

    Example:
      >>> round(pac_bayes_mag_bound(np.ones(4), 1.0, 1), 3)  # 4 * log(2.0) / 4 + 10
      10.693
    """
    ref = np.asarray(ref, np.float64)
    omega = ref.size
    numerator = eps**2 + (sigma**2 + 1) * np.sum(ref**2) / omega
    denominator = eps**2 + sigma**2 * ref**2
    return float(0.25 * np.sum(np.log(numerator / denominator)) + math.log(m / sigma) + 10)


def _prepare(
    apply_fn, variables, images, labels, *, inputs, attack, which, num_examples, batch_size, mesh
):
    perturb.check_inputs(inputs, attack)
    perturb.check_perturb_set(which)
    mesh = perturb.resolve_mesh(mesh)
    n = perturb.check_data(images, labels, num_examples)
    batch_size = perturb.check_batch(batch_size, mesh)
    subset = perturb.data_subset(images, labels, num_examples=n, batch_size=batch_size, mesh=mesh)
    variables = perturb.place_variables(variables, mesh)
    mask = perturb.perturbation_mask(variables["params"], which)
    metrics = perturb.subset_metrics(apply_fn, attack if inputs == "adversarial" else None)
    return mesh, subset, variables, mask, metrics


def _check_samples(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}.")
    return int(value)


def pac_bayes_sigma(
    apply_fn: perturb.ApplyFn,
    variables: Mapping[str, Any],
    images: Any,
    labels: Any,
    *,
    key: jax.Array,
    inputs: str = "clean",
    attack: AttackSpec | None = None,
    init_variables: Mapping[str, Any] | None = None,
    magnitude_aware: bool = False,
    which: str = perturb.DEFAULT_PERTURB,
    target: float = 0.1,
    tolerance: float = 0.01,
    upper: float = 2.0,
    max_steps: int = 15,
    num_samples: int = 10,
    num_examples: int | None = None,
    batch_size: int = 256,
    mesh: Mesh | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """PAC-Bayes sigma (Jiang et al., 2020): the largest weight-noise scale with drop ``target``.

    Args:
      apply_fn: the model function ``(variables, images, train) -> (logits, state)``.
      variables: ``{"params": ..., "batch_stats": ...}`` of the measured model.
      images: float images ``[N, ...]`` in ``[0, 1]`` (the training split for the bounds).
      labels: integer labels ``[N]`` (a random-label model's noisy training labels).
      key: seeds the noise (and the attack's starts).
      inputs: ``"clean"`` or ``"adversarial"`` (robust accuracy; the attack
        re-run against every perturbed model).
      attack: the attack for ``inputs="adversarial"``.
      init_variables: the initialization, for the ``||w - w0||`` bound (optional).
      magnitude_aware: noise ``N(0, sigma^2 w_i^2 + 1e-6)`` instead of ``N(0, sigma^2)``.
      which: the perturbed parameters (``perturb.PERTURB_SETS``).
      target, tolerance, upper, max_steps: the search (``bisect``).
      num_samples: noise draws averaged per scale.
      num_examples: the first ``num_examples`` rows (default all).
      batch_size: examples per device step, a multiple of the device count.
      mesh: device mesh (default: all devices); batches split, weights replicated.
      progress: ``progress(done, total)`` after each evaluated scale.

    Returns:
      A dict: ``sigma``, ``inverse_sigma_sq`` (the measure), ``bound_origin``
      (with ``||w||^2``) and, with ``init_variables``, ``bound_init`` (with
      ``||w - w0||^2``); ``saturated``, ``converged``, ``accuracy`` (unperturbed),
      ``drop`` (at ``sigma``), ``history`` ([(sigma, drop)]), ``m`` and
      ``num_examples``.

    Raises:
      ValueError: bad arguments, before anything compiles.

    Example:
      >>> r = pac_bayes_sigma(apply_fn, variables, x_train, y_train, key=jax.random.key(0),
      ...                     num_examples=1000, init_variables=init)
      >>> r["inverse_sigma_sq"], r["bound_init"], r["saturated"]
    """
    check_search_args(target=target, tolerance=tolerance, upper=upper, max_steps=max_steps)
    num_samples = _check_samples("num_samples", num_samples)
    if init_variables is not None and jax.tree.structure(init_variables["params"]) != (
        jax.tree.structure(variables["params"])
    ):
        raise ValueError("init_variables['params'] must have the structure of variables['params'].")
    mesh, subset, variables, mask, metrics = _prepare(
        apply_fn,
        variables,
        images,
        labels,
        inputs=inputs,
        attack=attack,
        which=which,
        num_examples=num_examples,
        batch_size=batch_size,
        mesh=mesh,
    )
    key = perturb.as_key(key)
    noise_key, attack_key = jax.random.split(key)
    params = variables["params"]

    @jax.jit
    def clean_accuracy(variables, subset, attack_key):
        return metrics(variables, subset, attack_key)[0]

    @jax.jit
    def mean_accuracy(variables, subset, sigma, noise_key, attack_key):
        def one(sample_key):
            z = perturb.gaussian_direction(sample_key, variables["params"], mask)
            if magnitude_aware:
                std = jax.tree.map(
                    lambda w: jnp.sqrt(sigma**2 * jnp.square(w) + MAGNITUDE_EPS**2),
                    variables["params"],
                )
                u = jax.tree.map(jnp.multiply, z, std)
            else:
                u = jax.tree.map(lambda x: sigma * x, z)
            return metrics(perturb.add_to_params(variables, u), subset, attack_key)[0]

        keys = jax.random.split(noise_key, num_samples)
        return jnp.mean(jax.lax.map(one, keys))

    accuracy = float(clean_accuracy(variables, subset, attack_key))

    def drop(sigma: float) -> float:
        perturbed = mean_accuracy(variables, subset, jnp.float32(sigma), noise_key, attack_key)
        return accuracy - float(perturbed)

    result = bisect(
        drop,
        target=target,
        tolerance=tolerance,
        upper=upper,
        max_steps=max_steps,
        progress=progress,
    )
    sigma = result.value
    m = int(np.shape(images)[0])
    w = _flat(params, mask)
    refs = {"origin": w}
    if init_variables is not None:
        refs["init"] = w - _flat(init_variables["params"], mask)
    out: dict[str, Any] = {
        "sigma": sigma,
        "inverse_sigma_sq": 1.0 / sigma**2,
        "saturated": result.saturated,
        "converged": result.converged,
        "accuracy": accuracy,
        "drop": result.deviation,
        "history": list(result.history),
        "magnitude_aware": magnitude_aware,
        "inputs": inputs,
        "m": m,
        "num_examples": subset.num_examples,
    }
    for name, ref in refs.items():
        if magnitude_aware:
            out[f"bound_{name}"] = pac_bayes_mag_bound(ref, sigma, m)
        else:
            out[f"bound_{name}"] = pac_bayes_bound(float(np.sum(ref**2)), sigma, m)
    return out


def box_ascent(
    value_and_grad_fn: Callable[[Any, jax.Array], tuple[jax.Array, Any]],
    params: Any,
    bound: Any,
    key: jax.Array,
    *,
    steps: int,
    step_fraction: float | None = None,
) -> Any:
    """Projected sign-gradient ascent over the box ``|u_i| <= bound_i`` (traceable).

    Starts uniformly in the box and takes ``steps`` steps
    ``u += step_fraction * bound * sign(grad)``, clipping back to the box after
    each: the steepest ascent for an L-inf (box) constraint, as PGD in input
    space. ``bound`` is zero outside the perturbed set, so those parameters
    never move.

    Args:
      value_and_grad_fn: ``(params, key) -> (loss, grad)``; ``key`` is
        ``fold_in(key, t)`` at step ``t`` (e.g. for an attack regenerated at
        each step).
      params: the weights ``w``.
      bound: a pytree like ``params`` of per-coordinate bounds (>= 0).
      key: PRNG key (start and per-step keys).
      steps: number of ascent steps (static).
      step_fraction: step length relative to the bound (default ``2.5 / steps``).

    Returns:
      The final perturbation ``u`` (a pytree like ``params``).

    Example:
      >>> vg = jax.value_and_grad(lambda p, k: jnp.sum(p ** 2))
      >>> u = box_ascent(vg, jnp.zeros(3), jnp.ones(3), jax.random.key(0), steps=5)
      >>> jnp.abs(u)  # the loss grows outwards: a corner of the box
      Array([1., 1., 1.], dtype=float32)
    """
    frac = 2.5 / max(steps, 1) if step_fraction is None else step_fraction
    start_key, step_key = jax.random.split(key)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(start_key, len(leaves))
    b_leaves = jax.tree.leaves(bound)
    u = jax.tree.unflatten(
        treedef,
        [
            jax.random.uniform(k, jnp.shape(w), jnp.float32, -1.0, 1.0) * b
            for k, w, b in zip(keys, leaves, b_leaves, strict=True)
        ],
    )

    def step(t, u):
        moved = jax.tree.map(jnp.add, params, u)
        _, g = value_and_grad_fn(moved, jax.random.fold_in(step_key, t))
        return jax.tree.map(
            lambda u, g, b: jnp.clip(u + frac * b * jnp.sign(g), -b, b), u, g, bound
        )

    return jax.lax.fori_loop(0, steps, step, u)


def box_bound(params: Any, mask: Any, alpha: jax.Array | float, magnitude_aware: bool) -> Any:
    """Per-coordinate bound ``alpha`` (or ``alpha |w_i| + 1e-3``) where ``mask``; 0 elsewhere."""

    def one(m: bool, w: jax.Array) -> jax.Array:
        if not m:
            return jnp.zeros_like(w, jnp.float32)
        if magnitude_aware:
            return alpha * jnp.abs(w).astype(jnp.float32) + SHARPNESS_EPS
        return jnp.full(jnp.shape(w), alpha, jnp.float32)

    return jax.tree.map(one, mask, params)


def worst_case_sharpness(
    apply_fn: perturb.ApplyFn,
    variables: Mapping[str, Any],
    images: Any,
    labels: Any,
    *,
    key: jax.Array,
    inputs: str = "clean",
    attack: AttackSpec | None = None,
    magnitude_aware: bool = False,
    which: str = perturb.DEFAULT_PERTURB,
    target: float = 0.1,
    tolerance: float = 0.01,
    upper: float = 2.0,
    max_steps: int = 15,
    ascent_steps: int = 10,
    restarts: int = 3,
    num_examples: int | None = None,
    batch_size: int = 256,
    mesh: Mesh | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Worst-case sharpness (Keskar et al., 2017; Jiang et al., 2020): ``1 / alpha^2``.

    For a box half-width ``alpha``, ``restarts`` runs of ``box_ascent`` (each
    from its own uniform start, ``ascent_steps`` steps) maximize the mean
    cross-entropy of ``f_{w+u}`` over the subset (with ``inputs="adversarial"``,
    on the attack regenerated against ``w + u`` at every step); the deviation
    is the largest accuracy drop ``acc(w) - acc(w + u)`` among the restarts
    (robust accuracy, the attack re-run against the final ``w + u``). The
    search (``bisect``) finds the largest ``alpha`` whose deviation reaches
    ``target``.

    Args:
      apply_fn, variables, images, labels, key, inputs, attack, which, target,
        tolerance, upper, max_steps, num_examples, batch_size, mesh, progress:
        as ``pac_bayes_sigma``.
      magnitude_aware: bound ``alpha |w_i| + 1e-3`` instead of ``alpha``.
      ascent_steps: sign-gradient steps per restart.
      restarts: random restarts per ``alpha``.

    Returns:
      A dict: ``alpha``, ``inverse_alpha_sq`` (the measure), ``saturated``,
      ``converged``, ``accuracy``, ``drop`` (at ``alpha``), ``history``.

    Example:
      >>> r = worst_case_sharpness(apply_fn, variables, x_train, y_train,
      ...                          key=jax.random.key(0), num_examples=1000)
      >>> r["inverse_alpha_sq"], r["saturated"]
    """
    check_search_args(target=target, tolerance=tolerance, upper=upper, max_steps=max_steps)
    ascent_steps = _check_samples("ascent_steps", ascent_steps)
    restarts = _check_samples("restarts", restarts)
    mesh, subset, variables, mask, metrics = _prepare(
        apply_fn,
        variables,
        images,
        labels,
        inputs=inputs,
        attack=attack,
        which=which,
        num_examples=num_examples,
        batch_size=batch_size,
        mesh=mesh,
    )
    loss_grad = perturb.subset_loss_and_grad(apply_fn, attack if inputs == "adversarial" else None)
    key = perturb.as_key(key)
    ascent_key, attack_key = jax.random.split(key)

    @jax.jit
    def clean_accuracy(variables, subset, attack_key):
        return metrics(variables, subset, attack_key)[0]

    @jax.jit
    def worst_accuracy(variables, subset, alpha, ascent_key, attack_key):
        bound = box_bound(variables["params"], mask, alpha, magnitude_aware)

        def value_and_grad(params, k):
            return loss_grad({**variables, "params": params}, subset, k)

        def one(restart_key):
            u = box_ascent(
                value_and_grad, variables["params"], bound, restart_key, steps=ascent_steps
            )
            return metrics(perturb.add_to_params(variables, u), subset, attack_key)[0]

        return jnp.min(jax.lax.map(one, jax.random.split(ascent_key, restarts)))

    accuracy = float(clean_accuracy(variables, subset, attack_key))

    def drop(alpha: float) -> float:
        worst = worst_accuracy(variables, subset, jnp.float32(alpha), ascent_key, attack_key)
        return accuracy - float(worst)

    result = bisect(
        drop,
        target=target,
        tolerance=tolerance,
        upper=upper,
        max_steps=max_steps,
        progress=progress,
    )
    return {
        "alpha": result.value,
        "inverse_alpha_sq": 1.0 / result.value**2,
        "saturated": result.saturated,
        "converged": result.converged,
        "accuracy": accuracy,
        "drop": result.deviation,
        "history": list(result.history),
        "magnitude_aware": magnitude_aware,
        "inputs": inputs,
        "num_examples": subset.num_examples,
    }
