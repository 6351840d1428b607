"""AutoAttack's standard ensemble: APGD-CE, APGD-T, FAB-T, Square, data-parallel.

``autoattack`` evaluates a model the way the "standard" version of Croce &
Hein (ICML 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", and the authors' release,
github.com/fra31/auto-attack) does: a point is robust if it is classified
correctly and survives every attack; each attack (and, for APGD-T and FAB-T,
each target rank) runs only on the points still robust, and a point's first
adversarial input is kept. docs/autoattack.md describes the algorithm.

How it runs:

* The still-robust points are gathered on the host into chunks of
  ``chunk_size`` (a multiple of the device count); the last chunk is padded
  and its padding masked out, so every attack compiles once however many
  points drop out. Attacks and the model see each chunk split over the
  ``"data"`` axis of the mesh, the variables replicated (GSPMD via
  ``jax.jit`` shardings); all chunks of a stage are dispatched before any
  result is fetched, then the results are fetched chunk by chunk (so a
  progress callback sees finished chunks while later ones still run).
* The target rank of APGD-T/FAB-T is a traced argument: one compilation
  serves all nine targets.
* Every returned input is checked on the host in float64: its norm within
  ``eps + 1e-6``, values in ``[0, 1]``, finite, and the model's prediction on
  it re-evaluated (a separate forward pass). A point counts as broken only if
  the re-evaluated prediction is wrong and the checks pass; disagreements
  between the attack's own flag and the re-evaluation, and any failed check,
  are counted in ``AutoAttackResult.checks``.
* Randomness: attack ``a`` (its position in ``attacks``), target rank ``r``
  (0 for untargeted attacks) and chunk ``j`` use
  ``fold_in(fold_in(fold_in(key, a), r), j)``. FAB-T uses none.

Several processes (``jax_memat.distributed``): every process calls
``autoattack`` with the same arguments; the chunks are split over the devices
of all processes (each feeds its devices' rows), results are gathered back
to every process, and the bookkeeping on the host is the same everywhere, so
every process returns the whole result, equal point by point to one process
over the same number of devices.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jax_memat.attacks.autoattack import _common as c
from jax_memat.attacks.autoattack.autopgd import _apgd
from jax_memat.attacks.autoattack.fab import _fab
from jax_memat.attacks.autoattack.square import _check_square_args, _square
from jax_memat.parallel import (
    batch_sharded,
    make_mesh,
    replicate,
    replicated,
    shard_batch,
    to_host,
)

ApplyFn = Callable[[Any, jax.Array, bool], tuple[jax.Array, Any]]

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
VERSIONS = ("standard", "custom")
_STANDARD = {"n_iter": 100, "n_queries": 5000, "n_target_classes": 9}
# Tolerance of the norm check on returned inputs: room for float32 round-off
# of a point projected onto the eps-ball (the reference only prints the
# largest norm; here an input beyond eps + 1e-6 is rejected and counted).
NORM_TOLERANCE = 1e-6
_TARGETED = ("apgd-t", "fab-t")


@dataclasses.dataclass(frozen=True)
class AutoAttackResult:
    """What ``autoattack`` returns (host NumPy arrays and Python numbers).

    Attributes:
      robust: ``[N]`` bool, correctly classified and not broken by any attack.
      x_adv: ``[N, ...]`` float32 inputs: the first adversarial input found
        for broken points, the clean input for the others.
      clean_accuracy: fraction correctly classified.
      robust_accuracy: ``mean(robust)``.
      accuracy: ``{"clean": ..., attack: robust accuracy after it, ...}`` in
        the order the attacks ran.
      checks: ``max_perturbation`` (largest norm among the returned points),
        and counts of rejected outputs: ``outside_eps``, ``outside_box``,
        ``nonfinite``, and ``flag_mismatch`` (attack flag vs re-evaluated
        prediction). All counts are 0 in a correct run.
      seconds: wall time of the clean pass and of each attack.
    """

    robust: np.ndarray
    x_adv: np.ndarray
    clean_accuracy: float
    robust_accuracy: float
    accuracy: dict[str, float]
    checks: dict[str, float]
    seconds: dict[str, float]


@functools.lru_cache(maxsize=8)
def _predict_fn(apply_fn: ApplyFn, mesh: Mesh):
    def predict(variables, x):
        return c.predictions(apply_fn(variables, x, False)[0])

    return jax.jit(
        predict,
        in_shardings=(replicated(mesh), batch_sharded(mesh)),
        out_shardings=batch_sharded(mesh),
    )


@functools.lru_cache(maxsize=32)
def _attack_fn(
    apply_fn: ApplyFn, mesh: Mesh, name: str, eps: float, norm: str, n_iter: int, n_queries: int
):
    """Jitted ``(variables, x, y, mask, key, rank) -> (x_adv, fooled)`` for one attack."""

    def run(variables, x, y, mask, key, rank):
        def logits_fn(v):
            return apply_fn(variables, v, False)[0]

        common = {"eps": eps, "norm": norm}
        if name in ("apgd-ce", "apgd-dlr"):
            loss = "ce" if name == "apgd-ce" else "dlr"
            x_adv, robust = _apgd(
                logits_fn, x, y, key, None, mask, n_iter=n_iter, loss=loss, rho=0.75, **common
            )
        elif name == "apgd-t":
            target = c.target_by_rank(logits_fn(x), rank)
            x_adv, robust = _apgd(
                logits_fn,
                x,
                y,
                key,
                target,
                mask,
                n_iter=n_iter,
                loss="dlr_targeted",
                rho=0.75,
                **common,
            )
        elif name == "fab-t":
            target = c.target_by_rank(logits_fn(x), rank)
            x_adv, robust = _fab(
                logits_fn,
                x,
                y,
                target,
                mask,
                n_iter=n_iter,
                alpha_max=0.1,
                eta=1.05,
                beta=0.9,
                **common,
            )
        else:
            x_adv, robust, _ = _square(
                logits_fn, x, y, key, mask, n_queries=n_queries, p_init=0.8, **common
            )
        return x_adv, mask & ~robust

    rep, split = replicated(mesh), batch_sharded(mesh)
    return jax.jit(
        run, in_shardings=(rep, split, split, split, rep, rep), out_shardings=(split, split)
    )


def _validate(
    images,
    labels,
    eps,
    norm,
    version,
    attacks,
    n_target_classes,
    n_iter,
    n_queries,
    chunk_size,
    mesh,
) -> tuple[str, float, tuple[str, ...], int]:
    norm = c.check_norm(norm)
    eps = c.check_eps(eps, norm)
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    attacks = STANDARD_ATTACKS if attacks is None else tuple(attacks)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks or len(set(attacks)) != len(attacks):
        raise ValueError(f"attacks must be distinct names from {ATTACKS}, got {attacks!r}")
    n_target_classes = c.check_int("n_target_classes", n_target_classes, low=1)
    c.check_int("n_iter", n_iter, low=1)
    c.check_int("n_queries", n_queries, low=1)
    if version == "standard":
        given = {"n_iter": n_iter, "n_queries": n_queries, "n_target_classes": n_target_classes}
        if attacks != STANDARD_ATTACKS or given != _STANDARD:
            raise ValueError(
                f"version='standard' runs {STANDARD_ATTACKS} with {_STANDARD}; "
                f"got attacks={attacks} and {given}: use version='custom' to change them"
            )
    if images.ndim < 2 or images.shape[0] < 1:
        raise ValueError(f"images must be [N >= 1, ...], got shape {images.shape}")
    if "square" in attacks:
        _check_square_args(images, norm, eps, n_queries, 0.8)
        if images.ndim != 4:
            raise ValueError(f"Square needs NHWC images [N, H, W, C], got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be floats in [0, 1], got dtype {images.dtype}")
    if not (np.all(np.isfinite(images)) and images.min() >= 0.0 and images.max() <= 1.0):
        raise ValueError("images must be finite and in [0, 1] (no normalisation in front)")
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be [N] = {images.shape[:1]} ints, got {labels.shape} {labels.dtype}"
        )
    if not isinstance(mesh, Mesh) or len(mesh.axis_names) != 1:
        raise ValueError(f"mesh must be a one-axis (data-parallel) jax.sharding.Mesh, got {mesh!r}")
    n_dev = mesh.devices.size
    if chunk_size is None:
        chunk_size = 128 * n_dev
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, int)
        or chunk_size < 1
        or chunk_size % n_dev
    ):
        raise ValueError(
            f"chunk_size must be a positive multiple of the device count ({n_dev}), "
            f"got {chunk_size!r}"
        )
    return norm, eps, attacks, chunk_size


def _stages(attacks: Sequence[str], n_targets: int) -> list[tuple[int, str, int]]:
    """``(attack position, name, target rank)`` in running order (rank 0: untargeted)."""
    out = []
    for a, name in enumerate(attacks):
        ranks = range(2, n_targets + 2) if name in _TARGETED else [0]
        out.extend((a, name, r) for r in ranks)
    return out


def autoattack(
    apply_fn: ApplyFn,
    variables: Any,
    images: Any,
    labels: Any,
    *,
    eps: float,
    norm: str,
    key: jax.Array,
    mesh: Mesh | None = None,
    chunk_size: int | None = None,
    version: str = "standard",
    attacks: Sequence[str] | None = None,
    n_target_classes: int = 9,
    n_iter: int = 100,
    n_queries: int = 5000,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> AutoAttackResult:
    """Robust accuracy under AutoAttack (standard version), data-parallel.

    Runs APGD-CE (100 iterations), APGD-T (9 targets, or ``K - 1``), FAB-T (9
    targets) and Square (5000 queries) in that order, each on the points
    still robust, in fixed-size padded chunks over all devices of ``mesh``.
    The model is always called in inference mode.

    Args:
      apply_fn: the model function ``(variables, images, train) -> (logits, state)``.
      variables: model variables (replicated over the mesh here).
      images: ``[N, H, W, C]`` floats in ``[0, 1]`` (host or device array).
      labels: ``[N]`` integer labels.
      eps: radius (e.g. ``8 / 255`` for L-inf, ``0.5`` for L2).
      norm: ``"linf"`` or ``"l2"``.
      key: PRNG key; runs with the same key and ``chunk_size`` agree.
      mesh: a one-axis device mesh, e.g. ``jax_memat.parallel.make_mesh()``
        (default: all devices, of every process).
      chunk_size: points per compiled call, a multiple of the device count
        (default ``128 *`` device count).
      version: ``"standard"`` (the fixed settings above) or ``"custom"``
        (then ``attacks``, ``n_target_classes``, ``n_iter`` and ``n_queries``
        may differ, e.g. for quick checks).
      attacks: names from ``ATTACKS`` in running order (``"apgd-dlr"``: APGD
        on the untargeted DLR loss); default ``STANDARD_ATTACKS``.
      n_target_classes: targets of APGD-T and FAB-T.
      n_iter: iterations of APGD and FAB.
      n_queries: iterations of Square.
      progress: called as ``progress(attack, done, total, robust_accuracy)``
        when an attack starts (``done = 0``) and after each of its chunks
        finishes. The unit is one chunk of one stage (a compiled call on
        ``chunk_size`` points; APGD-T and FAB-T have a stage per target), so
        all units of an attack cost about the same. ``total`` is an estimate
        that only falls as points are broken (later stages run on fewer
        chunks) and equals ``done`` at the attack's last call;
        ``robust_accuracy`` is the fraction of all points still robust. An
        attack with no robust point left to attack reports ``(attack, 0, 0,
        robust_accuracy)`` once.

    Returns:
      An ``AutoAttackResult``.

    Raises:
      ValueError: on bad arguments, before anything compiles.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> def apply_fn(variables, images, train):  # a linear model on 8x8 RGB images
      ...     return images.reshape(len(images), -1) @ variables["w"], {}
      >>> variables = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(192, 10)))}
      >>> images = np.random.default_rng(1).uniform(size=(16, 8, 8, 3)).astype(np.float32)
      >>> labels = np.asarray(apply_fn(variables, images, False)[0].argmax(-1))
      >>> result = autoattack(apply_fn, variables, images, labels, eps=1 / 255,
      ...                     norm="linf", key=jax.random.key(0))
      >>> list(result.accuracy)
      ['clean', 'apgd-ce', 'apgd-t', 'fab-t', 'square']
      >>> result.clean_accuracy, result.robust_accuracy <= result.accuracy["apgd-ce"]
      (1.0, True)
    """
    images = np.asarray(to_host(images))
    labels = np.asarray(to_host(labels))
    mesh = make_mesh() if mesh is None else mesh
    norm, eps, attacks, chunk_size = _validate(
        images,
        labels,
        eps,
        norm,
        version,
        attacks,
        n_target_classes,
        n_iter,
        n_queries,
        chunk_size,
        mesh,
    )
    images = images.astype(np.float32)
    labels = labels.astype(np.int32)
    key = c.as_key(key)
    shape = jax.ShapeDtypeStruct((chunk_size, *images.shape[1:]), jnp.float32)
    logits_shape = jax.eval_shape(lambda v, x: apply_fn(v, x, False)[0], variables, shape).shape
    if len(logits_shape) != 2 or logits_shape[0] != chunk_size:
        raise ValueError(f"apply_fn must return [B, K] logits, got shape {logits_shape}")
    k = int(logits_shape[1])
    needs = {"apgd-t": 4, "apgd-dlr": 3}
    for name in attacks:
        if k < needs.get(name, 2):
            raise ValueError(f"{name} needs K >= {needs.get(name, 2)} classes, the model has {k}")
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels must be in [0, {k}), got range [{labels.min()}, {labels.max()}]")

    variables = replicate(variables, mesh)
    predict = _predict_fn(apply_fn, mesh)
    n = images.shape[0]

    def put(x):  # a chunk split over the mesh (each process feeds its devices' rows)
        return shard_batch(x, mesh)

    def chunks(indices):
        for j, start in enumerate(range(0, len(indices), chunk_size)):
            idx = indices[start : start + chunk_size]
            take = np.concatenate([idx, np.full(chunk_size - len(idx), idx[0])])
            yield j, idx, take

    seconds = {}
    start = time.perf_counter()
    preds = []
    for _, idx, take in chunks(np.arange(n)):
        preds.append((idx, predict(variables, put(images[take]))))
    robust = np.zeros(n, bool)
    for idx, p in to_host(preds):
        robust[idx] = p[: len(idx)] == labels[idx]
    seconds["clean"] = time.perf_counter() - start
    accuracy = {"clean": float(robust.mean())}

    x_adv = images.copy()
    checks = {"outside_eps": 0, "outside_box": 0, "nonfinite": 0, "flag_mismatch": 0}
    stages = _stages(attacks, c.n_targets(n_target_classes, k))

    def report(name: str, done: int, this_stage_left: int, stages_left: int) -> None:
        """Reports ``done`` chunks of attack ``name`` and an estimate of its total.

        The estimate adds the chunks of the running stage not yet finished and,
        for every later stage (target rank), the chunks that the points robust
        now would fill: it only falls as points are broken, and equals ``done``
        once the attack's last chunk is in.
        """
        if progress is not None:
            later = stages_left * -(-int(robust.sum()) // chunk_size)
            progress(name, done, done + this_stage_left + later, float(robust.mean()))

    for a, name in enumerate(attacks):
        start = time.perf_counter()
        fn = _attack_fn(apply_fn, mesh, name, eps, norm, n_iter, n_queries)
        ranks = [s[2] for s in stages if s[0] == a]
        done = 0
        report(name, done, 0, len(ranks))
        for stage, rank in enumerate(ranks):
            remaining = np.flatnonzero(robust)
            if remaining.size == 0:
                break
            stage_key = jax.random.fold_in(jax.random.fold_in(key, a), rank)
            pending = []
            for j, idx, take in chunks(remaining):
                mask = np.arange(chunk_size) < len(idx)
                out, fooled = fn(
                    variables,
                    put(images[take]),
                    put(labels[take]),
                    put(mask),
                    jax.random.fold_in(stage_key, j),
                    jnp.int32(rank),
                )
                pending.append((idx, out, fooled, predict(variables, out)))
            # Fetched one chunk at a time, in dispatch order: the later chunks
            # keep the devices busy meanwhile, and progress reports finished work.
            for i, chunk_out in enumerate(pending):
                idx, out, fooled, pred = to_host(chunk_out)
                m = len(idx)
                out, fooled, pred = out[:m], fooled[:m], pred[:m]
                broken = pred != labels[idx]
                ok = _check_outputs(out, images[idx], eps, norm, checks)
                checks["flag_mismatch"] += int(np.sum(fooled != broken))
                accept = broken & ok
                robust[idx[accept]] = False
                x_adv[idx[accept]] = out[accept]
                done += 1
                report(name, done, len(pending) - i - 1, len(ranks) - stage - 1)
        seconds[name] = time.perf_counter() - start
        accuracy[name] = float(robust.mean())

    dist = _distances(x_adv, images, norm)
    checks["max_perturbation"] = float(dist.max()) if n else 0.0
    return AutoAttackResult(
        robust=robust,
        x_adv=x_adv,
        clean_accuracy=accuracy["clean"],
        robust_accuracy=float(robust.mean()),
        accuracy=accuracy,
        checks=checks,
        seconds=seconds,
    )


def _distances(x_adv: np.ndarray, x: np.ndarray, norm: str) -> np.ndarray:
    d = (x_adv.astype(np.float64) - x.astype(np.float64)).reshape(x.shape[0], -1)
    return np.abs(d).max(1) if norm == "linf" else np.sqrt(np.sum(d * d, axis=1))


def _check_outputs(
    out: np.ndarray, x: np.ndarray, eps: float, norm: str, counts: dict
) -> np.ndarray:
    """Per row: finite, in ``[0, 1]`` and within ``eps``; counts the failures."""
    flat = out.reshape(out.shape[0], -1)
    finite = np.all(np.isfinite(flat), axis=1)
    in_box = np.all((flat >= 0.0) & (flat <= 1.0), axis=1)
    with np.errstate(invalid="ignore"):
        in_eps = _distances(out, x, norm) <= eps + NORM_TOLERANCE
    counts["nonfinite"] += int(np.sum(~finite))
    counts["outside_box"] += int(np.sum(finite & ~in_box))
    counts["outside_eps"] += int(np.sum(finite & ~in_eps))
    return finite & in_box & in_eps
