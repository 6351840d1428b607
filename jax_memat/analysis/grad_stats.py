"""Gradient statistics recorded during training, without changing the update.

Dong et al. (ICLR 2022, Sec. 3) explain why TRADES fails to fit random
labels by the instability of its gradients; their code logs the squared
global gradient norm each step. ``GradStats`` records that and more, as a
*probe* of the train step (``make_train_step(..., probe=GradStats(...))``):
it reads the step's gradient, parameters and batch and returns metrics, and
the step's new state is the same as without it (tested bit for bit).

Every step (cheap reductions of the step's gradient ``g_t``):

- ``grad_norm``: ``||g_t||`` (the step also returns ``grad_norm_sq``);
- ``grad_cosine_prev``: ``cos(g_t, g_{t-1})``, NaN at the first step. The
  previous gradient lives in the optimizer state: build the optimizer with
  ``grad_stats.optimizer(tx)`` = ``optax.chain(grad_recorder(), tx)``, where
  ``grad_recorder`` passes the gradient through unchanged and keeps a copy
  (one parameter-sized buffer, checkpointed with the optimizer state, so a
  resumed run continues the same cosines).

Every ``every_steps`` steps (at steps ``0, n, 2n, ...``; NaN on the others,
and ``grad_sampled`` is 1 on sampled steps), from the per-example gradients
of ``jax_memat.analysis.gradients`` (each example's loss term in the step's
own full-batch forward pass, so their mean is ``g_t``):

- ``grad_example_norm_{min,q25,median,q75,max,mean}``: the distribution of
  ``||g_i||`` over the batch;
- ``grad_example_cosine_mean``: the mean over examples of ``cos(g_i, g_t)``;
- ``grad_variance``: ``tr(Sigma)``, the unbiased per-example covariance trace
  ``sum_i ||g_i - g_t||^2 / (B - 1)``; ``grad_signal_sq``: the unbiased
  ``|G|^2 = ||g_t||^2 - tr(Sigma) / B``; ``grad_noise_scale``: their ratio
  ``B_simple`` (McCandlish et al., *An Empirical Model of Large-Batch
  Training*, 2018, App. A.1);
- ``grad_smoothness``: ``||g(theta_{t+1}) - g(theta_t)|| / ||theta_{t+1} -
  theta_t||`` on the same batch, key (attack) and model/objective state: a
  local estimate of the gradient's Lipschitz constant along the training path.

(With ``examples=K``, the per-example statistics are those of the batch's
first ``K`` examples, with their own mean in place of ``g_t`` and ``K`` in
place of ``B``.)

Cost on a sampled step: one forward pass of the objective (with its attack)
and ``K`` backward passes of the batch for the per-example gradients, one
forward-mode pass for the cosines, and one forward-backward pass for the
smoothness. Which steps are sampled is decided by the caller when it passes
the train step's static ``sample`` argument (``GradStats.samples(step)``, as
the training loop does: no branch in the program), else on the device with a
``lax.cond``. ``docs/gradients.md`` has measured figures.

``summarize_epoch`` turns one epoch's step metrics into the row the training
loop writes: every-step values averaged over the steps where they are
defined, sampled values over the sampled steps, and ``grad_noise_scale`` as
the ratio of the epoch means of ``grad_variance`` and ``grad_signal_sq``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_memat.analysis.gradients import (
    check_examples,
    check_microbatch,
    grad_reductions,
    noise_scale,
    tree_dot,
    tree_sq_norm,
)
from jax_memat.training.train_step import StepView

EVERY_STEP_KEYS = ("grad_norm", "grad_cosine_prev")
NORM_QUANTILES = (
    ("grad_example_norm_min", 0.0),
    ("grad_example_norm_q25", 0.25),
    ("grad_example_norm_median", 0.5),
    ("grad_example_norm_q75", 0.75),
    ("grad_example_norm_max", 1.0),
)
PER_EXAMPLE_KEYS = (
    *(name for name, _ in NORM_QUANTILES),
    "grad_example_norm_mean",
    "grad_example_cosine_mean",
    "grad_variance",
    "grad_signal_sq",
    "grad_noise_scale",
)
SMOOTHNESS_KEYS = ("grad_smoothness",)
SAMPLED_FLAG = "grad_sampled"


class GradRecorderState(NamedTuple):
    """The state of ``grad_recorder``.

    Attributes:
      previous: the gradient of the last update (zeros before the first).
      count: updates seen.
    """

    previous: Any
    count: jax.Array


def grad_recorder() -> optax.GradientTransformation:
    """An identity ``GradientTransformation`` that keeps the last gradient in its state.

    Chain it first, ``optax.chain(grad_recorder(), tx)``, so that it sees the
    raw gradient and the updates ``tx`` computes are unchanged.

    Returns:
      The transformation; its state is a ``GradRecorderState``.

    Example:
      >>> tx = optax.chain(grad_recorder(), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(grads, state, params)
      >>> state[0].previous  # grads
    """

    def init(params):
        return GradRecorderState(jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        del params
        return updates, GradRecorderState(updates, state.count + 1)

    return optax.GradientTransformation(init, update)


def find_recorder_state(opt_state: Any) -> GradRecorderState:
    """The one ``GradRecorderState`` inside an optimizer state.

    Raises:
      ValueError: there is none (the optimizer was not built with
        ``GradStats.optimizer``) or more than one.
    """
    found = [
        node
        for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, GradRecorderState))
        if isinstance(node, GradRecorderState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"GradStats needs exactly one grad_recorder in the optimizer state; found "
            f"{len(found)}. Build the optimizer as tx = grad_stats.optimizer(tx) and create the "
            "train state with that tx."
        )
    return found[0]


def _sqrt(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.maximum(x, 0.0))


@dataclasses.dataclass(frozen=True)
class GradStats:
    """A train-step probe recording gradient statistics (see the module docstring).

    Attributes:
      every_steps: compute the sampled statistics at steps ``0, n, 2n, ...``
        (a positive integer).
      microbatch: examples whose gradients are computed at once on a sampled
        step (None: the whole batch); bounds the memory, not the result.
      examples: estimate the per-example statistics from the batch's first
        ``examples`` examples (a random sample: batches are shuffled), at
        ``examples / B`` of the cost (None: the whole batch). Their gradients
        are still taken in the full-batch pass; the cosines are then with their
        mean, and the noise scale is estimated from them alone.
      per_example: record the per-example statistics (norms, cosines,
        variance, noise scale) on sampled steps.
      smoothness: record ``grad_smoothness`` on sampled steps.
      unroll: how the per-example chunks run (``grad_reductions``'s
        ``unroll``; None: unrolled on the CPU, a loop on accelerators).

    Example:
      >>> stats = GradStats(every_steps=50, microbatch=16)
      >>> tx = stats.optimizer(make_optimizer("sgd", 0.1, momentum=0.9))
      >>> state = create_train_state(module, key, image_shape, tx, mesh)
      >>> step = make_train_step(objective, tx, mesh, probe=stats)
      >>> state, metrics = step(state, batch)  # metrics["grad_cosine_prev"], ...
    """

    every_steps: int
    microbatch: int | None = None
    examples: int | None = None
    per_example: bool = True
    smoothness: bool = True
    unroll: bool | None = None

    def __post_init__(self):
        n = self.every_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(
                f"GradStats every_steps={n!r} is not accepted; use a positive integer."
            )
        check_microbatch(self.microbatch)
        check_examples(self.examples)
        if self.examples == 1:
            raise ValueError(
                "GradStats examples=1 is not accepted: a variance needs at least 2 examples; "
                "use None (the whole batch) or an integer >= 2."
            )

    @property
    def sampled_keys(self) -> tuple[str, ...]:
        """The metrics computed on sampled steps only (NaN on the others)."""
        keys = PER_EXAMPLE_KEYS if self.per_example else ()
        return keys + (SMOOTHNESS_KEYS if self.smoothness else ())

    @property
    def keys(self) -> tuple[str, ...]:
        """Every metric name this probe returns."""
        return (*EVERY_STEP_KEYS, SAMPLED_FLAG, *self.sampled_keys)

    def optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
        """``tx`` with the gradient recorder chained first (its updates are unchanged)."""
        return optax.chain(grad_recorder(), tx)

    def __call__(self, view: StepView) -> dict[str, jax.Array]:
        """The metrics of one step (traced inside the jitted train step)."""
        recorder = find_recorder_state(view.state.opt_state)
        norm_sq = tree_sq_norm(view.grads)
        denominator = _sqrt(norm_sq * tree_sq_norm(recorder.previous))
        defined = (recorder.count > 0) & (denominator > 0)
        cosine = tree_dot(view.grads, recorder.previous) / jnp.where(defined, denominator, 1.0)
        metrics = {
            "grad_norm": _sqrt(norm_sq),
            "grad_cosine_prev": jnp.where(defined, cosine, jnp.nan),
        }
        if view.sample is None:
            # Decided on the device: only sampled steps run the branch's passes.
            sampled = view.state.step % self.every_steps == 0
            metrics[SAMPLED_FLAG] = sampled.astype(jnp.float32)
            if self.sampled_keys:
                metrics.update(
                    jax.lax.cond(sampled, lambda: self._sampled(view), self._not_sampled)
                )
        else:
            # Decided by the caller (one program each): no branch in the step.
            metrics[SAMPLED_FLAG] = jnp.float32(view.sample)
            metrics.update(self._sampled(view) if view.sample else self._not_sampled())
        return metrics

    def samples(self, step: int) -> bool:
        """Whether the step numbered ``step`` (steps taken before it) is sampled.

        Pass it as the train step's static ``sample`` argument when the step
        number is known on the host, as the training loop does.
        """
        return step % self.every_steps == 0

    def _not_sampled(self) -> dict[str, jax.Array]:
        return {k: jnp.full((), jnp.nan, jnp.float32) for k in self.sampled_keys}

    def _sampled(self, view: StepView) -> dict[str, jax.Array]:
        state, out = view.state, {}
        args = (state.model_state, state.objective_state, view.batch, view.info)
        if self.per_example:
            size = view.batch["label"].shape[0]
            if size < 2:
                raise ValueError(
                    f"GradStats per-example statistics need a batch of at least 2; got {size}."
                )
            if self.examples is not None and self.examples > size:
                raise ValueError(
                    f"GradStats examples={self.examples} exceeds the batch of {size}; accepted: "
                    f"None (the whole batch) or an integer in [2, {size}]."
                )
            reductions = grad_reductions(
                view.objective,
                microbatch=self.microbatch,
                examples=self.examples,
                unroll=self.unroll,
            )
            r = reductions(state.params, *args)
            quantiles = jnp.quantile(r.norms, jnp.array([q for _, q in NORM_QUANTILES]))
            out.update({name: quantiles[i] for i, (name, _) in enumerate(NORM_QUANTILES)})
            out["grad_example_norm_mean"] = jnp.mean(r.norms)
            out["grad_example_cosine_mean"] = jnp.nanmean(r.cosine)
            scale = noise_scale(r)
            out["grad_variance"] = scale["trace"]
            out["grad_signal_sq"] = scale["signal_sq"]
            out["grad_noise_scale"] = scale["noise_scale"]
        if self.smoothness:

            def mean_loss(params):  # the train step's own reduction
                return jnp.mean(view.objective.loss(params, *args)[0])

            g_next = jax.grad(mean_loss)(view.new_state.params)
            change = jax.tree.map(jnp.subtract, g_next, view.grads)
            moved = jax.tree.map(jnp.subtract, view.new_state.params, state.params)
            out["grad_smoothness"] = _sqrt(tree_sq_norm(change)) / _sqrt(tree_sq_norm(moved))
        return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}


def _finite_or_none(value: float) -> float | None:
    # Rows are JSON: a non-finite number is written as null rather than NaN/Infinity.
    return value if math.isfinite(value) else None


def summarize_epoch(step_metrics: Sequence[Mapping[str, Any]]) -> dict[str, float | int | None]:
    """One epoch's gradient statistics from its steps' metrics (host values).

    Every-step values are averaged over the steps where they are defined
    (``grad_cosine_prev`` is NaN at the run's first step); sampled values over
    the steps where ``grad_sampled`` is 1 (a NaN there is kept: it is a real
    value, not a skipped step). ``grad_noise_scale`` is the ratio of the epoch
    means of ``grad_variance`` and ``grad_signal_sq`` (McCandlish et al.
    average numerator and denominator separately), None when the mean signal
    is not positive. Non-finite results are None (JSON null).

    Args:
      step_metrics: the step metrics of one epoch, fetched to the host.

    Returns:
      ``{}`` when the steps carry no gradient statistics; else the averaged
      values plus ``grad_sampled_steps`` (how many steps were sampled).
      Sampled keys are left out when no step of the epoch was sampled.

    Example:
      >>> row.update(summarize_epoch(jax.device_get(epoch_metrics)))
    """
    if not step_metrics or "grad_norm" not in step_metrics[0]:
        return {}
    out: dict[str, float | int | None] = {}
    for key in EVERY_STEP_KEYS:
        values = np.asarray([float(m[key]) for m in step_metrics])
        defined = values[~np.isnan(values)]
        if defined.size:
            out[key] = _finite_or_none(float(np.mean(defined)))
    sampled = [m for m in step_metrics if float(m[SAMPLED_FLAG]) == 1.0]
    out["grad_sampled_steps"] = len(sampled)
    if not sampled:
        return out
    keys = [k for k in (*PER_EXAMPLE_KEYS, *SMOOTHNESS_KEYS) if k in sampled[0]]
    means = {k: float(np.mean([float(m[k]) for m in sampled])) for k in keys}
    if "grad_noise_scale" in means:
        signal = means["grad_signal_sq"]
        means["grad_noise_scale"] = means["grad_variance"] / signal if signal > 0 else math.nan
    out.update({k: _finite_or_none(v) for k, v in means.items()})
    return out
