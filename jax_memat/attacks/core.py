"""Projected gradient attacks: the PGD family as pure, jit-compatible functions.

An attack here is built from three pieces and nothing else:

* a *logits function* ``x -> logits``: the caller closes over the model
  variables, with BatchNorm in inference mode, so attacks never see (or
  update) model state;
* a *per-example objective* ``logits -> [B]`` to **maximise** (cross-entropy,
  CW margin, TRADES KL, plus whatever a caller adds, e.g. a temporal-ensembling
  term), so new objectives need no edit here;
* a norm ball (L-inf or L2) around the clean input, intersected with the image
  box ``[0, 1]``.

The ascent direction for each example is the gradient of the *sum* of the
per-example objective: in inference mode examples do not interact, so this is
the per-example gradient at the cost of one backward pass. The steps run in a
``lax.fori_loop`` and the result is behind ``lax.stop_gradient``: training
treats adversarial inputs as data.

Hyper-parameters (``eps``, ``step_size``, ``steps``, ``norm``, ``init``,
``clip_start``) are static Python values, checked eagerly with ``ValueError``s before anything is
traced; pass them as Python floats/ints (not JAX arrays), and mark them static
if you jit a wrapper that takes them as arguments.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp

NORMS = ("linf", "l2")
INITS = ("uniform", "normal", "none")

LogitsFn = Callable[[jax.Array], jax.Array]
ObjectiveFn = Callable[[jax.Array], jax.Array]

# Inputs live in [0, 1] (the paper's models have no normalisation layer in front).
_BOX_MIN, _BOX_MAX = 0.0, 1.0


def _per_example_l2(v: jax.Array) -> jax.Array:
    """L2 norm over all but the leading axis, shaped to broadcast against ``v``.

    Differentiable at ``v == 0`` (gradient 0 instead of ``0 * inf = nan``).
    """
    sum_sq = jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=True)
    positive = sum_sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sum_sq, 1.0)), 0.0)


def _unit(v: jax.Array) -> jax.Array:
    """``v / ||v||_2`` per example, and 0 where ``v == 0`` (no step along a zero gradient)."""
    length = _per_example_l2(v)
    positive = length > 0
    # The inner where keeps the division (and its gradient) finite at zero.
    return jnp.where(positive, v / jnp.where(positive, length, 1.0), 0.0)


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def eps_problem(eps: object, norm: str, *, positive: bool = False) -> str:
    """What is wrong with a radius (``""`` when nothing): the one rule for ``eps``.

    Config validation, ``AttackSpec``, every attack function, AutoAttack and the
    evaluate CLI all check ``eps`` with this rule and its words: a Python
    number (it shapes the computation, so it must be known before tracing),
    finite, ``>= 0`` (``> 0`` with ``positive``, as AutoAttack needs), and under
    L-inf at most 1, since images live in [0, 1] (a larger value is almost
    surely a unit mistake, 8 for 8/255).
    """
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        return f"eps must be a Python float, got {eps!r} ({type(eps).__name__})"
    if not math.isfinite(eps):
        return f"eps must be finite, got {eps}"
    low_ok = eps > 0 if positive else eps >= 0
    if norm == "linf":
        if not (low_ok and eps <= 1):
            bracket = "(0" if positive else "[0"
            return (
                f"eps must be in {bracket}, 1] under L-inf (images are in [0, 1]; the paper's "
                f"radius is 8/255 = 0.0314), got {eps}"
            )
    elif not low_ok:
        return f"eps must be {'> 0' if positive else '>= 0'}, got {eps}"
    return ""


def step_size_problem(step_size: object) -> str:
    """What is wrong with a step size (``""`` when nothing): a finite number > 0."""
    if (
        isinstance(step_size, bool)
        or not isinstance(step_size, numbers.Real)
        or not math.isfinite(step_size)
        or step_size <= 0
    ):
        return f"step_size must be a finite float > 0, got {step_size!r}"
    return ""


def threat_model_problems(
    norm: object, eps: object, step_size: object = None, *, prefix: str = ""
) -> list[str]:
    """Every problem of a threat model, each naming its field (``prefix`` + name).

    Args:
      norm: ``"linf"`` or ``"l2"``.
      eps: the radius (``eps_problem``'s rule).
      step_size: checked when not None (``step_size_problem``'s rule).
      prefix: put before each field name, e.g. ``"attack."`` for a config.

    Returns:
      A list of messages; empty when the threat model is valid.

    Example:
      >>> threat_model_problems("linf", 8.0, 2 / 255, prefix="attack.")
      ['attack.eps must be in [0, 1] under L-inf (...), got 8.0']
    """
    problems = []
    if norm not in NORMS:
        problems.append(f"norm must be one of {NORMS}, got {norm!r}")
    else:
        problems.append(eps_problem(eps, norm))
    if step_size is not None:
        problems.append(step_size_problem(step_size))
    return [prefix + p for p in problems if p]


def _check_real(name: str, value: object) -> float:
    # numbers.Real covers Python and NumPy scalars but not JAX arrays: these
    # values shape the computation and must be known before tracing.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a Python float, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_args(
    eps: object, step_size: object, steps: object, norm: str, init: str, init_std: object
) -> tuple[float, float, int, float]:
    """Validates the static attack arguments; returns them as Python numbers."""
    _check_norm(norm)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    problem = eps_problem(eps, norm)
    if problem:
        raise ValueError(problem)
    eps = float(eps)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    steps = int(steps)
    step_size = _check_real("step_size", step_size)
    if steps > 0 and step_size <= 0:
        raise ValueError(f"step_size must be > 0 when steps > 0, got {step_size}")
    init_std = _check_real("init_std", init_std)
    if init_std < 0:
        raise ValueError(f"init_std must be >= 0, got {init_std}")
    return eps, step_size, steps, init_std


def project(delta: jax.Array, eps: float, norm: str) -> jax.Array:
    """Projects each example's perturbation onto the ``eps``-ball of ``norm``.

    L-inf clips every coordinate to ``[-eps, eps]``; L2 rescales by
    ``min(1, eps / ||delta||_2)`` per example (a zero perturbation stays zero,
    with finite gradients). Norms are taken over all axes but the leading
    (batch) one.

    Args:
      delta: ``[B, ...]`` perturbations.
      eps: ball radius, ``>= 0``.
      norm: one of ``NORMS``.

    Returns:
      The projected perturbations, same shape and dtype as ``delta``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jax_memat.attacks import project
      >>> project(jnp.array([[3.0, 4.0]]), 1.0, "l2")
      Array([[0.6, 0.8]], dtype=float32)
    """
    _check_norm(norm)
    if norm == "linf":
        return jnp.clip(delta, -eps, eps)
    length = _per_example_l2(delta)
    inside = length <= eps
    scale = jnp.where(inside, 1.0, eps / jnp.where(inside, 1.0, length))
    return delta * scale.astype(delta.dtype)


def _project_and_clip(x_adv: jax.Array, x: jax.Array, eps: float, norm: str) -> jax.Array:
    # Projecting first and clipping second keeps both constraints: clipping to
    # the box moves every coordinate towards x (x is in the box), so it can
    # only shrink the perturbation.
    return jnp.clip(x + project(x_adv - x, eps, norm), _BOX_MIN, _BOX_MAX)


def _start(
    x: jax.Array,
    key: jax.Array | None,
    eps: float,
    norm: str,
    init: str,
    init_std: float,
    clip_start: bool,
) -> jax.Array:
    """The first iterate of PGD (see ``pgd`` for the three schemes and ``clip_start``)."""
    if init == "none":
        return x
    if key is None:
        raise ValueError(f"init={init!r} draws random numbers: pass a PRNG key")
    if init == "normal":
        # The TRADES start: Gaussian noise, not projected onto the ball (the
        # TRADES code projects only after each step).
        start = x + init_std * jax.random.normal(key, x.shape, x.dtype)
        return jnp.clip(start, _BOX_MIN, _BOX_MAX) if clip_start else start
    if norm == "linf":
        delta = jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
    else:
        # Uniform in the L2 ball: isotropic direction, radius eps * u^(1/d).
        dir_key, radius_key = jax.random.split(key)
        direction = _unit(jax.random.normal(dir_key, x.shape, x.dtype))
        dim = math.prod(x.shape[1:])
        u = jax.random.uniform(radius_key, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype)
        delta = direction * (eps * u ** (1.0 / dim))
    if not clip_start:
        # delta is drawn inside the ball, so only the box is left unenforced.
        return x + delta
    return _project_and_clip(x + delta, x, eps, norm)


def pgd(
    logits_fn: LogitsFn,
    objective_fn: ObjectiveFn,
    x: jax.Array,
    key: jax.Array | None,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "linf",
    init: str = "uniform",
    init_std: float = 0.001,
    clip_start: bool = True,
) -> jax.Array:
    """Projected gradient ascent on a per-example objective within an ``eps``-ball.

    Each step takes ``g = grad_x sum(objective_fn(logits_fn(x_adv)))`` and
    moves ``x_adv += step_size * sign(g)`` (L-inf) or
    ``x_adv += step_size * g / ||g||_2`` (L2, per example; no move where
    ``g == 0``), then projects ``x_adv - x`` onto the ball and clips ``x_adv``
    to ``[0, 1]``. The last iterate is returned (not the best one), as in the
    PGD-AT and TRADES reference code.

    Starts (``init``):
      * ``"uniform"``: uniform in the ball (L-inf: per coordinate in
        ``[-eps, eps]``; L2: a Gaussian direction with radius
        ``eps * u^(1/d)``), clipped to the box. The PGD-AT start.
      * ``"normal"``: ``x + init_std * N(0, 1)`` clipped to the box but, as in
        the TRADES code, not projected onto the ball before the first step.
      * ``"none"``: ``x`` itself.

    ``clip_start=False`` leaves the random start unclipped, so the first
    gradient may be taken outside ``[0, 1]``: the start of the authors' TRADES,
    TRADES+TE and PGD-AT+TE attacks (Dong et al., 2022; their plain PGD-AT
    attack clips it, as the default here). Every step still projects onto the
    ball and clips to the box, so the result is in both either way.

    With ``steps == 0`` the start point is returned, projected and clipped
    (whatever ``clip_start`` says); with ``eps == 0`` the clean input is
    returned unchanged.

    Args:
      logits_fn: ``x -> [B, K]`` logits; a closure over the model variables in
        inference mode (examples must not interact, e.g. through batch
        statistics, for the summed gradient to be per-example).
      objective_fn: ``[B, K]`` logits ``-> [B]`` values to maximise.
      x: ``[B, ...]`` clean inputs in ``[0, 1]``.
      key: PRNG key for the random start; may be ``None`` when ``init="none"``.
      eps: ball radius, a finite Python float ``>= 0``.
      step_size: step length, a Python float ``> 0`` (unused if ``steps == 0``).
      steps: number of ascent steps, a non-negative Python int (static).
      norm: one of ``NORMS``.
      init: one of ``"uniform"``, ``"normal"``, ``"none"``.
      init_std: standard deviation of the ``"normal"`` start.
      clip_start: clip the random start to ``[0, 1]`` (the default) or not.

    Returns:
      ``[B, ...]`` adversarial inputs, behind ``lax.stop_gradient``, with
      ``||x_adv - x|| <= eps`` per example (up to float rounding) and values
      in ``[0, 1]``.

    Raises:
      ValueError: on an unknown ``norm``/``init`` or an out-of-range number.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax_memat.attacks import cross_entropy, pgd
      >>> w = jnp.array([[1.0, -1.0], [-2.0, 2.0]])
      >>> x = jnp.full((1, 2), 0.5)
      >>> x_adv = pgd(lambda v: v @ w, lambda z: cross_entropy(z, jnp.array([0])),
      ...             x, jax.random.key(0), eps=0.1, step_size=0.05, steps=4)
      >>> x_adv  # moves to raise logit 1 and lower logit 0
      Array([[0.4, 0.6]], dtype=float32)
    """
    eps, step_size, steps, init_std = _check_args(eps, step_size, steps, norm, init, init_std)
    if not isinstance(clip_start, bool):
        raise ValueError(f"clip_start must be True or False, got {clip_start!r}")
    if eps == 0:
        return jax.lax.stop_gradient(x)
    x = jax.lax.stop_gradient(x)

    def total_objective(x_adv: jax.Array) -> jax.Array:
        values = objective_fn(logits_fn(x_adv))
        if values.shape != x.shape[:1]:
            raise ValueError(
                f"objective_fn must return one value per example, shape {x.shape[:1]}, "
                f"got {values.shape}"
            )
        return jnp.sum(values)

    grad_fn = jax.grad(total_objective)

    def step(_: int, x_adv: jax.Array) -> jax.Array:
        g = grad_fn(x_adv)
        if norm == "linf":
            direction = jnp.sign(g)
        else:
            direction = _unit(g)
        return _project_and_clip(x_adv + step_size * direction, x, eps, norm)

    x_adv = _start(x, key, eps, norm, init, init_std, clip_start)
    if steps == 0:
        x_adv = _project_and_clip(x_adv, x, eps, norm)
    else:
        x_adv = jax.lax.fori_loop(0, steps, step, x_adv)
    return jax.lax.stop_gradient(x_adv)


def fgsm(
    logits_fn: LogitsFn,
    objective_fn: ObjectiveFn,
    x: jax.Array,
    key: jax.Array | None,
    *,
    eps: float,
    norm: str = "linf",
    init: str = "none",
    step_size: float | None = None,
    clip_start: bool = True,
) -> jax.Array:
    """Fast gradient (sign) method: one PGD step, of size ``eps`` by default.

    With ``init="none"`` this is FGSM (Goodfellow et al.) for L-inf and the
    fast gradient method for L2. With ``init="uniform"`` it is "FGSM with
    random start" (Wong et al., 2020); note the step is still ``eps`` unless
    ``step_size`` says otherwise (Wong et al. use ``1.25 * eps``). The result is
    projected onto the ball and clipped to ``[0, 1]`` as in ``pgd``.

    Args:
      logits_fn: ``x -> [B, K]`` logits in inference mode (see ``pgd``).
      objective_fn: ``[B, K]`` logits ``-> [B]`` values to maximise.
      x: ``[B, ...]`` clean inputs in ``[0, 1]``.
      key: PRNG key for a random start; may be ``None`` when ``init="none"``.
      eps: ball radius, a finite Python float ``>= 0``.
      norm: one of ``NORMS``.
      init: one of ``"uniform"``, ``"normal"``, ``"none"`` (see ``pgd``).
      step_size: step length; ``None`` means ``eps``.
      clip_start: clip the random start to ``[0, 1]`` (see ``pgd``).

    Returns:
      ``[B, ...]`` adversarial inputs behind ``lax.stop_gradient``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jax_memat.attacks import cross_entropy, fgsm
      >>> w = jnp.array([[1.0, -1.0], [-2.0, 2.0]])
      >>> fgsm(lambda v: v @ w, lambda z: cross_entropy(z, jnp.array([0])),
      ...      jnp.full((1, 2), 0.5), None, eps=0.1)
      Array([[0.4, 0.6]], dtype=float32)
    """
    eps = _check_real("eps", eps)
    if step_size is None:
        step_size = eps
    # With eps == 0 there is nothing to do (and a step of size eps would be
    # rejected by pgd's step_size check), so take no step.
    return pgd(
        logits_fn,
        objective_fn,
        x,
        key,
        eps=eps,
        step_size=step_size,
        steps=1 if eps > 0 else 0,
        norm=norm,
        init=init,
        clip_start=clip_start,
    )
