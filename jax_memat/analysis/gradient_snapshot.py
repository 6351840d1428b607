"""Per-example gradients of a model state over many examples: the ``gradients`` analysis.

``grad_reductions`` (``analysis/gradients.py``) reduces the per-example
gradients of one batch. ``gradient_snapshot`` runs it over the first ``n``
examples of a dataset, batch by batch, on a train state: a live one (from a
training hook or a notebook) or one restored from a checkpoint
(``jax_memat.experiment.analyses``). Each batch is one full-batch pass of the
run's own objective (its attack, BatchNorm in training mode, any transform),
exactly as the train step would take it, so ``g_i`` is example ``i``'s share of
that step's gradient. It answers the questions of Dong et al., *Exploring
Memorization in Adversarial Training* (ICLR 2022, Sec. 3.2, claim C2) about
one state: how large and how aligned the per-example gradients are, on clean
and on corrupted labels, and how noisy the gradient is (the noise scale).

``plot_gradient_snapshot`` draws the distributions; ``summarize_snapshot``
turns the arrays into the analysis's JSON summary.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jax_memat.analysis.gradients import grad_reductions, noise_scale, tree_sq_norm
from jax_memat.analysis.plots_gradients import _save_png
from jax_memat.data import eval_batches, make_batch
from jax_memat.objectives import Objective, StepInfo
from jax_memat.parallel import batch_sharded, replicated, shard_batch

SNAPSHOT_KEYS = ("index", "loss", "grad_norm", "grad_cosine")


def gradient_snapshot(
    objective: Objective,
    state: Any,
    images: jax.Array | np.ndarray,
    labels: jax.Array | np.ndarray,
    *,
    mesh: Mesh,
    batch_size: int,
    key: jax.Array,
    num_examples: int | None = None,
    epoch: int | None = None,
    microbatch: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Per-example gradient norms and cosines of ``objective`` at ``state``, batch by batch.

    Args:
      objective: the run's objective (``RunSetup.objective``).
      state: a ``TrainState`` (its ``params``, ``model_state``,
        ``objective_state`` and ``step`` are used; nothing is updated).
      images: uint8 images [N, H, W, C] (scaled to [0, 1] here, not augmented).
      labels: the labels to take gradients on (the run's trained-on labels).
      mesh: the device mesh; each batch is split over it, the state replicated.
      batch_size: examples per pass; use the run's ``batch_size`` so BatchNorm
        sees batches as in training. A multiple of the device count.
      key: the attack's randomness; batch ``b`` uses ``fold_in(key, b)``.
      num_examples: the first ``num_examples`` rows (default all), a whole
        number of batches (a partial batch would change BatchNorm's statistics).
      epoch: the 1-based epoch the objective is told (temporal ensembling's
        ramp reads it); default: none (objectives that need it raise).
      microbatch: per-example gradients computed at once (memory, not results).
      progress: called with the number of finished batches.

    Returns:
      Numpy arrays: per example ``index``, ``loss``, ``grad_norm`` and
      ``grad_cosine`` (with the mean gradient of its batch) [n]; per batch
      ``batch_trace`` and ``batch_signal_sq`` (the noise-scale estimates of
      ``noise_scale``), ``batch_variance`` and ``batch_mean_grad_norm`` [n / batch].

    Raises:
      ValueError: a batch size that does not split over the devices or
        ``num_examples`` that is not a whole number of batches (before any compile).

    Example:
      >>> run = load_run("workdirs/quickstart", "best")
      >>> snap = gradient_snapshot(run.setup.objective, run.state, run.train.images,
      ...                          run.train.labels, mesh=run.mesh, batch_size=128,
      ...                          key=jax.random.key(0), num_examples=512)
      >>> snap["grad_norm"].shape
      (512,)
    """
    total = int(labels.shape[0])
    n = total if num_examples is None else int(num_examples)
    devices = mesh.devices.size
    if not isinstance(batch_size, int) or batch_size < 2 or batch_size % devices:
        raise ValueError(
            f"batch_size must be an integer >= 2 and a multiple of the {devices} devices; got "
            f"{batch_size!r}."
        )
    if not 0 < n <= total or n % batch_size:
        raise ValueError(
            f"num_examples must be a multiple of batch_size={batch_size} in [{batch_size}, "
            f"{total - total % batch_size}] (whole batches: a partial one would change "
            f"BatchNorm's batch statistics); got {num_examples!r}."
        )
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    reduce = grad_reductions(objective, microbatch=microbatch)
    epoch_value = None if epoch is None else jnp.int32(epoch)

    def one_batch(params, model_state, objective_state, step, images, labels, indices, batch_key):
        batch = make_batch(images, labels, indices, batch_key, augment=False)
        info = StepInfo(step=step, epoch=epoch_value, key=batch_key)
        r = reduce(params, model_state, objective_state, batch, info)
        scale = noise_scale(r)
        return {
            "loss": r.loss.astype(jnp.float32),
            "grad_norm": r.norms,
            "grad_cosine": r.cosine,
            "trace": scale["trace"],
            "signal_sq": scale["signal_sq"],
            "variance": r.variance,
            "mean_grad_norm": jnp.sqrt(tree_sq_norm(r.mean)),
        }

    rep, split = replicated(mesh), batch_sharded(mesh)
    per_example = ("loss", "grad_norm", "grad_cosine")
    out_shardings = {k: (split if k in per_example else rep) for k in (*per_example, "trace")}
    out_shardings |= {k: rep for k in ("signal_sq", "variance", "mean_grad_norm")}
    fn = jax.jit(
        one_batch,
        # The objective state stays where it is (a large table may be split over the mesh).
        in_shardings=(rep, rep, None, rep, rep, rep, split, rep),
        out_shardings=out_shardings,
    )
    images = jax.device_put(jnp.asarray(images), rep)
    labels = jax.device_put(jnp.asarray(labels), rep)
    indices, _ = eval_batches(n, batch_size)
    outputs = []
    for b, idx in enumerate(indices):
        outputs.append(
            jax.device_get(
                fn(
                    state.params,
                    state.model_state,
                    state.objective_state,
                    state.step,
                    images,
                    labels,
                    shard_batch(idx, mesh),
                    jax.random.fold_in(key, b),
                )
            )
        )
        if progress is not None:
            progress(b + 1)
    result = {k: np.concatenate([o[k] for o in outputs]) for k in per_example}
    result["index"] = indices.reshape(-1)
    for k in ("trace", "signal_sq", "variance", "mean_grad_norm"):
        result[f"batch_{k}"] = np.array([float(o[k]) for o in outputs])
    return result


def _quantiles(x: np.ndarray) -> dict[str, float | None]:
    x = x[np.isfinite(x)]
    if not x.size:
        return {q: None for q in ("min", "q25", "median", "q75", "max", "mean")}
    q = np.quantile(x, [0.0, 0.25, 0.5, 0.75, 1.0])
    names = ("min", "q25", "median", "q75", "max")
    return dict(zip(names, map(float, q), strict=True)) | {"mean": float(np.mean(x))}


def summarize_snapshot(snapshot: dict[str, np.ndarray], corrupted: np.ndarray | None) -> dict:
    """The JSON summary of a snapshot: distributions overall and by clean/corrupted label.

    The noise scale is ``mean(trace) / mean(signal_sq)`` over the batches
    (McCandlish et al., 2018, App. A.1, average before dividing).

    Args:
      snapshot: from ``gradient_snapshot``.
      corrupted: bool per training row (``labels.npz``'s ``changed``), or None.
    """
    trace, signal = snapshot["batch_trace"], snapshot["batch_signal_sq"]
    mean_signal = float(np.mean(signal))
    summary = {
        "num_examples": int(snapshot["index"].size),
        "num_batches": int(trace.size),
        "grad_norm": _quantiles(snapshot["grad_norm"]),
        "grad_cosine": _quantiles(snapshot["grad_cosine"]),
        "loss": _quantiles(snapshot["loss"]),
        "grad_variance": float(np.mean(snapshot["batch_variance"])),
        "mean_grad_norm": float(np.mean(snapshot["batch_mean_grad_norm"])),
        "noise_scale": float(np.mean(trace)) / mean_signal if mean_signal > 0 else None,
    }
    if corrupted is not None:
        mask = np.asarray(corrupted, bool)[snapshot["index"]]
        summary["num_corrupted"] = int(mask.sum())
        for name, rows in (("clean", ~mask), ("corrupted", mask)):
            summary[name] = {
                "count": int(rows.sum()),
                "grad_norm": _quantiles(snapshot["grad_norm"][rows]),
                "grad_cosine": _quantiles(snapshot["grad_cosine"][rows]),
                "loss": _quantiles(snapshot["loss"][rows]),
            }
    return summary


def plot_gradient_snapshot(
    snapshot: dict[str, np.ndarray],
    path: str,
    *,
    corrupted: np.ndarray | None = None,
    title: str = "",
) -> str:
    """Histograms of per-example gradient norms and cosines, clean vs corrupted labels.

    Left: ``||g_i||`` on a log axis; middle: ``cos(g_i, batch mean)``; right:
    ``||g_i||`` against the example's loss. Written atomically; returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms, cosine, loss = snapshot["grad_norm"], snapshot["grad_cosine"], snapshot["loss"]
    groups = [("all examples", np.ones(norms.size, bool), "tab:blue")]
    if corrupted is not None:
        mask = np.asarray(corrupted, bool)[snapshot["index"]]
        if mask.any() and (~mask).any():
            groups = [
                ("clean labels", ~mask, "tab:blue"),
                ("corrupted labels", mask, "tab:red"),
            ]
        elif mask.all():
            groups = [("corrupted labels", mask, "tab:red")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    positive = norms[np.isfinite(norms) & (norms > 0)]
    if positive.size:
        low, high = positive.min(), positive.max()
        if high <= low:
            low, high = low / 2, high * 2
        bins = np.logspace(math.log10(low), math.log10(high), 40)
    else:
        bins = 40
    for name, rows, color in groups:
        label = f"{name} ({rows.sum()})"
        axes[0].hist(norms[rows], bins=bins, alpha=0.55, color=color, label=label)
        c = cosine[rows]
        axes[1].hist(c[np.isfinite(c)], bins=40, range=(-1, 1), alpha=0.55, color=color, label=name)
        axes[2].scatter(loss[rows], norms[rows], s=6, alpha=0.5, color=color, label=name)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("per-example gradient norm ||g_i||")
    axes[0].set_ylabel("examples")
    axes[1].set_xlabel("cos(g_i, mean gradient of its batch)")
    axes[2].set_xlabel("per-example training loss")
    axes[2].set_ylabel("||g_i||")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title or "Per-example gradients")
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return path


def save_snapshot(path: str, snapshot: dict[str, np.ndarray]) -> str:
    """Writes the snapshot's arrays as one ``.npz`` (atomically); returns ``path``."""
    from jax_memat.fileio import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "wb") as f:
        np.savez(f, **snapshot)
    return path
