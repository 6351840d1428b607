"""Input-space measures: local Lipschitzness of the logits and input-gradient norms.

- ``local_lipschitz`` (Yang et al., "A closer look at accuracy vs.
  robustness", NeurIPS 2020, Sec. 4): the mean over examples of
  ``max_{||x' - x||_inf <= eps} ||f(x) - f(x')||_1 / ||x - x'||_inf`` on the
  logits, approximated by ``steps`` (10) sign-gradient ascent steps of size
  ``step_size`` (0.003) from ``x + 0.001 N(0, 1)``, each projected onto the
  ball and the image box. The largest ratio met along the ascent is kept (a
  lower bound of the local Lipschitz constant either way). Compute it on the
  training and the test split separately.
- ``input_gradient_norm``: the mean ``||grad_x CE(f(x), y)||_1`` at clean
  inputs or at adversarial ones (the attack against the model).

Both run the model in inference mode, batch by batch (the last batch padded
and masked), each batch split over a device mesh with the weights replicated.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_memat.analysis.complexity import perturb
from jax_memat.attacks import AttackSpec, cross_entropy

Progress = Callable[[int, int], None]


def _positive(name: str, value: object, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}; got {value!r}.")
    return float(value)


def _batched(
    batch_fn: Callable[..., jax.Array],
    variables: Any,
    images: Any,
    labels: Any,
    *,
    key: jax.Array,
    num_examples: int,
    batch_size: int,
    mesh: Mesh,
    progress: Progress | None,
) -> np.ndarray:
    """Runs ``batch_fn(variables, x, y, key) -> [B]`` over the subset; per-example values."""
    subset = perturb.data_subset(
        images, labels, num_examples=num_examples, batch_size=batch_size, mesh=mesh
    )
    variables = perturb.place_variables(variables, mesh)
    split = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))

    def one_batch(variables, images, labels, s, key):
        return batch_fn(variables, images[s], labels[s], jax.random.fold_in(key, s))

    fn = jax.jit(one_batch, out_shardings=split)
    total = subset.labels.shape[0]
    outputs, in_flight = [], None
    for s in range(total):
        # Batch s is dispatched before batch s - 1 is fetched, so the devices
        # have work queued while the host waits; progress counts finished batches.
        dispatched = fn(variables, subset.images, subset.labels, jnp.int32(s), key)
        if in_flight is not None:
            outputs.append(np.asarray(in_flight))
            if progress is not None:
                progress(len(outputs), total)
        in_flight = dispatched
    outputs.append(np.asarray(in_flight))
    if progress is not None:
        progress(total, total)
    return np.concatenate(outputs)[:num_examples]


def local_lipschitz(
    apply_fn: perturb.ApplyFn,
    variables: Mapping[str, Any],
    images: Any,
    *,
    eps: float,
    key: jax.Array,
    steps: int = 10,
    step_size: float = 0.003,
    init_std: float = 0.001,
    num_examples: int | None = None,
    batch_size: int = 256,
    mesh: Mesh | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Empirical local Lipschitz constant of the logits (Yang et al., 2020).

    Args:
      apply_fn: the model function (inference mode).
      variables: the model's variables.
      images: float images ``[N, ...]`` in ``[0, 1]`` (no labels needed).
      eps: the L-inf radius (e.g. the attack's ``8 / 255``).
      key: seeds the Gaussian starts.
      steps: sign-gradient ascent steps.
      step_size: L-inf step length.
      init_std: standard deviation of the start ``x + init_std * N(0, 1)``.
      num_examples: the first ``num_examples`` rows (default all).
      batch_size: a multiple of the device count.
      mesh: the device mesh (default all devices).
      progress: ``progress(done, total)`` per finished batch.

    Returns:
      A dict: ``local_lipschitz`` (the mean) and ``per_example`` (numpy ``[n]``).

    Example:
      >>> local_lipschitz(apply_fn, variables, x_test, eps=8 / 255, key=jax.random.key(0),
      ...                 num_examples=1000)["local_lipschitz"]
    """
    eps = _positive("eps", eps)
    step_size = _positive("step_size", step_size)
    init_std = _positive("init_std", init_std)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}.")
    mesh = perturb.resolve_mesh(mesh)
    n = perturb.check_data(images, None, num_examples)
    batch_size = perturb.check_batch(batch_size, mesh)
    labels = np.zeros(np.shape(images)[0], np.int32)

    def batch_fn(variables, x, y, key):
        del y
        clean = jax.lax.stop_gradient(apply_fn(variables, x, False)[0].astype(jnp.float32))
        axes = tuple(range(1, x.ndim))

        def ratios(x_adv):
            logits = apply_fn(variables, x_adv, False)[0].astype(jnp.float32)
            num = jnp.sum(jnp.abs(clean - logits), axis=-1)
            den = jnp.max(jnp.abs(x_adv - x), axis=axes)
            # den > 0 always (the start is off x); the guard only keeps NaNs out.
            return num / jnp.maximum(den, jnp.finfo(jnp.float32).tiny)

        def project(x_adv):
            return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)

        def step(_, carry):
            x_adv, best = carry
            g = jax.grad(lambda z: jnp.sum(ratios(z)))(x_adv)
            x_adv = project(x_adv + step_size * jnp.sign(g))
            return x_adv, jnp.maximum(best, ratios(x_adv))

        start = project(x + init_std * jax.random.normal(key, x.shape, x.dtype))
        _, best = jax.lax.fori_loop(0, steps, step, (start, ratios(start)))
        return best

    per_example = _batched(
        batch_fn,
        variables,
        images,
        labels,
        key=perturb.as_key(key),
        num_examples=n,
        batch_size=batch_size,
        mesh=mesh,
        progress=progress,
    )
    return {"local_lipschitz": float(np.mean(per_example)), "per_example": per_example}


def input_gradient_norm(
    apply_fn: perturb.ApplyFn,
    variables: Mapping[str, Any],
    images: Any,
    labels: Any,
    *,
    key: jax.Array,
    inputs: str = "clean",
    attack: AttackSpec | None = None,
    num_examples: int | None = None,
    batch_size: int = 256,
    mesh: Mesh | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Mean L1 norm of the input gradient of the cross-entropy, per example.

    Args:
      apply_fn: the model function (inference mode).
      variables: the model's variables.
      images, labels: the split.
      key: seeds the attack's starts.
      inputs: ``"clean"`` (at ``x``) or ``"adversarial"`` (at the attack's point).
      attack: the attack for ``inputs="adversarial"``.
      num_examples, batch_size, mesh, progress: as ``local_lipschitz``.

    Returns:
      A dict: ``input_gradient_norm`` (the mean) and ``per_example`` (numpy ``[n]``).

    Example:
      >>> input_gradient_norm(apply_fn, variables, x, y, key=jax.random.key(0),
      ...                     inputs="adversarial", attack=pgd10)["input_gradient_norm"]
    """
    perturb.check_inputs(inputs, attack)
    mesh = perturb.resolve_mesh(mesh)
    n = perturb.check_data(images, labels, num_examples)
    batch_size = perturb.check_batch(batch_size, mesh)
    inputs_fn = perturb.make_inputs_fn(apply_fn, attack)

    def batch_fn(variables, x, y, key):
        x = inputs_fn(variables, x, y, key)

        def total_loss(z):
            logits = apply_fn(variables, z, False)[0].astype(jnp.float32)
            return jnp.sum(cross_entropy(logits, y))

        # Examples do not interact in inference mode, so the gradient of the
        # summed loss holds each example's own gradient in its row.
        g = jax.grad(total_loss)(x)
        return jnp.sum(jnp.abs(g).reshape(g.shape[0], -1), axis=-1)

    per_example = _batched(
        batch_fn,
        variables,
        images,
        labels,
        key=perturb.as_key(key),
        num_examples=n,
        batch_size=batch_size,
        mesh=mesh,
        progress=progress,
    )
    return {"input_gradient_norm": float(np.mean(per_example)), "per_example": per_example}
