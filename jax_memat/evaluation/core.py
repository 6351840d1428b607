"""Natural and adversarial accuracy with per-example results.

Evaluation walks the dataset in fixed-shape batches (the last one padded and
masked) so it compiles once, and returns per-example arrays (correctness, loss
and margin under each attack) for the memorization analyses, plus
the means of the correctness and loss arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jax_memat.attacks import AttackSpec, make_attack
from jax_memat.attacks.losses import cross_entropy
from jax_memat.data import eval_batches
from jax_memat.objectives import margin
from jax_memat.parallel import batch_sharded, replicated, shard_batch, to_host

EvalFn = Callable[..., dict]


def make_eval_fn(apply_fn, attacks: Mapping[str, AttackSpec], mesh: Mesh) -> EvalFn:
    """Jitted ``eval_fn(variables, images_u8, labels, indices, key) -> per-example dict``.

    Args:
      apply_fn: the model function (called in inference mode only).
      attacks: name -> attack spec, e.g. ``{"pgd10": AttackSpec("pgd", ...)}``.
      mesh: the device mesh; the dataset is replicated, the indices split.

    Returns:
      A function whose output has, per example, ``natural_correct``,
      ``natural_loss`` and ``natural_margin`` and, for every attack name ``a``,
      ``a_correct``, ``a_loss`` (cross-entropy at the adversarial point) and
      ``a_margin``. A margin is ``logit[y] - max_{k != y} logit[k]`` on the
      evaluated label ``y``: positive when the example is classified as ``y``,
      and how far from it when not (the memorization analyses read it).
    """
    runners = {}
    for name, spec in attacks.items():
        spec.validate()
        runners[name] = make_attack(spec)

    def eval_fn(variables, images, labels, indices, key):
        x = images[indices].astype(jnp.float32) / 255.0
        y = labels[indices]
        logits, _ = apply_fn(variables, x, False)
        out = {
            "natural_correct": jnp.argmax(logits, -1) == y,
            "natural_loss": cross_entropy(logits, y),
            "natural_margin": margin(logits, y),
        }
        for i, (name, run) in enumerate(sorted(runners.items())):
            x_adv = run(apply_fn, variables, x, y, jax.random.fold_in(key, i))
            adv_logits, _ = apply_fn(variables, x_adv, False)
            out[f"{name}_correct"] = jnp.argmax(adv_logits, -1) == y
            out[f"{name}_loss"] = cross_entropy(adv_logits, y)
            out[f"{name}_margin"] = margin(adv_logits, y)
        return out

    rep, split = replicated(mesh), batch_sharded(mesh)
    return jax.jit(eval_fn, in_shardings=(rep, rep, rep, split, rep), out_shardings=split)


def evaluate(
    eval_fn: EvalFn,
    variables: Any,
    images: jax.Array,
    labels: jax.Array,
    *,
    batch_size: int,
    key: jax.Array,
    mesh: Mesh,
    num_examples: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Runs ``eval_fn`` over the first ``num_examples`` rows of a device dataset.

    Args:
      eval_fn: from ``make_eval_fn``.
      variables: model variables.
      images, labels: the device-resident dataset (uint8 images, int labels).
      batch_size: global evaluation batch (a multiple of the device count).
      key: attack randomness; batch ``i`` uses ``fold_in(key, i)``.
      mesh: the device mesh.
      num_examples: evaluate rows ``[0, num_examples)``; default all.
      progress: called as ``progress(batches_done)`` each time a batch's
        results reach the host (``batches_done`` = 1, 2, ... up to the number
        of batches, ``ceil(num_examples / batch_size)``), e.g. to advance a
        progress bar by one batch.

    Returns:
      ``(per_example, summary)``: numpy arrays of length ``num_examples`` (with
      ``index``, the row of each example) and the mean of every ``*_correct``
      array as ``*_accuracy`` and of every ``*_loss`` array (margins have no
      summary).
    """
    n = int(labels.shape[0]) if num_examples is None else int(num_examples)
    if not 0 < n <= labels.shape[0]:
        raise ValueError(f"num_examples must be in [1, {labels.shape[0]}]; got {n}.")
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    indices, mask = eval_batches(n, batch_size)
    outputs, in_flight = [], None
    for i, idx in enumerate(indices):
        # Batch i is dispatched before batch i - 1 is fetched, so the devices
        # always have the next batch queued while the host waits: the fetch
        # costs no device time, and progress counts batches that finished.
        dispatched = eval_fn(
            variables, images, labels, shard_batch(idx, mesh), jax.random.fold_in(key, i)
        )
        if in_flight is not None:
            outputs.append(to_host(in_flight))
            if progress is not None:
                progress(len(outputs))
        in_flight = dispatched
    outputs.append(to_host(in_flight))
    if progress is not None:
        progress(len(outputs))
    keep = mask.reshape(-1) > 0
    per_example = {k: np.concatenate([o[k] for o in outputs])[keep] for k in outputs[0]}
    per_example["index"] = indices.reshape(-1)[keep]
    summary = {}
    for k, v in per_example.items():
        if k.endswith("_correct"):
            summary[k[: -len("_correct")] + "_accuracy"] = float(np.mean(v))
        elif k.endswith("_loss"):
            summary[k] = float(np.mean(v))
    return per_example, summary
