"""Rank correlation between a complexity measure and the robust generalization gap.

Claim C3 of Dong et al., "Exploring memorization in adversarial training"
(ICLR 2022) is that complexity measures do not explain robust generalization
once runs trained on noisy or random labels are in the family. The protocol
of Jiang et al., "Fantastic generalization measures and where to find them"
(ICLR 2020, Sec. 4):

- ``robust_gap``: robust training accuracy (on the labels the run was trained
  on) minus robust test accuracy, the same attack for both.
- ``kendall_tau_b``: Kendall's rank correlation with ties (Kendall, "The
  treatment of ties in ranking problems", Biometrika 1945):
  ``(n_c - n_d) / sqrt((n_0 - n_x)(n_0 - n_y))`` with ``n_c``/``n_d`` the
  concordant/discordant pairs, ``n_0 = n(n-1)/2`` and ``n_x``/``n_y`` the pairs
  tied in one variable. NaN when one variable is constant (no ranking).
- ``granulated_tau``: for each hyperparameter axis, the mean tau over the
  groups of runs that share every *other* axis' value (groups of one run,
  or with a constant measure or gap, have no tau and are counted apart);
  then the mean over axes. It asks whether the measure follows the gap when
  one thing changes at a time.
- ``correlate``: both, on a family of runs, with the runs flagged as not
  converged (e.g. TRADES at 100% label noise, which does not fit its training
  set) left out of the ranking and listed in the result, never silently
  ranked.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np


def robust_gap(robust_train_accuracy: float, robust_test_accuracy: float) -> float:
    """Robust generalization gap: robust train accuracy minus robust test accuracy.

    Example:
      >>> robust_gap(0.9, 0.45)
      0.45
    """
    return float(robust_train_accuracy) - float(robust_test_accuracy)


def _finite_vector(name: str, values: Sequence[float]) -> np.ndarray:
    try:
        v = np.asarray(values, np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a sequence of numbers; got {values!r}.") from e
    if v.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional; got shape {v.shape}.")
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
        raise ValueError(
            f"{name} has non-finite values at positions {bad.tolist()} ({v[bad].tolist()}); "
            "a measure that failed for a run must be fixed or the run flagged as not converged."
        )
    return v


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b between two equally long sequences (ties counted as Kendall, 1945).

    Args:
      x, y: finite numbers, at least 2 each.

    Returns:
      tau-b in ``[-1, 1]``; NaN when ``x`` or ``y`` is constant.

    Raises:
      ValueError: different lengths, fewer than 2 values or non-finite values.

    Example:
      >>> kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4])
      0.6666666666666666
    """
    x, y = _finite_vector("x", x), _finite_vector("y", y)
    if x.shape != y.shape:
        raise ValueError(f"x and y must be equally long; got {x.size} and {y.size}.")
    if x.size < 2:
        raise ValueError(f"Kendall's tau needs at least 2 values; got {x.size}.")
    upper = np.triu_indices(x.size, k=1)
    dx = np.sign(x[:, None] - x[None, :])[upper]
    dy = np.sign(y[:, None] - y[None, :])[upper]
    untied_x, untied_y = np.count_nonzero(dx), np.count_nonzero(dy)
    if untied_x == 0 or untied_y == 0:
        return math.nan
    return float(np.sum(dx * dy) / math.sqrt(untied_x * untied_y))


def _check_hparams(hparams: Sequence[Mapping[str, Hashable]], n: int) -> list[str]:
    if len(hparams) != n:
        raise ValueError(f"hparams must have one dict per run ({n}); got {len(hparams)}.")
    axes = sorted(hparams[0]) if n else []
    for i, h in enumerate(hparams):
        if not isinstance(h, Mapping) or sorted(h) != axes:
            raise ValueError(
                f"every run's hparams must be a dict with the same axes {axes}; run {i} has {h!r}."
            )
    if not axes:
        raise ValueError("hparams must name at least one axis (e.g. {'noise_rate': 0.2}).")
    return axes


def granulated_tau(
    measure: Sequence[float], gap: Sequence[float], hparams: Sequence[Mapping[str, Hashable]]
) -> dict[str, Any]:
    """Jiang et al.'s granulated Kendall coefficient over the axes of a run family.

    Args:
      measure: the measure per run (finite).
      gap: the robust generalization gap per run (finite).
      hparams: per run, a dict axis -> value (hashable), every run the same axes.

    Returns:
      A dict: ``tau`` (the mean over axes with at least one defined group tau;
      NaN if none), ``axes``: per axis ``{"tau": mean over groups, "groups":
      number of groups with a tau, "undefined_groups": groups of a single run or
      with a constant measure or gap}``.

    Raises:
      ValueError: mismatched lengths, non-finite values, inconsistent axes,
        fewer than 2 runs.

    Example:
      >>> runs = [{"algo": a, "noise": r} for a in ("pgd", "trades") for r in (0.0, 0.5, 1.0)]
      >>> granulated_tau([1, 2, 3, 1, 3, 2], [0.1, 0.2, 0.3, 0.1, 0.2, 0.3], runs)["tau"]
    """
    measure, gap = _finite_vector("measure", measure), _finite_vector("gap", gap)
    if measure.shape != gap.shape:
        raise ValueError(f"measure and gap must be equally long; got {measure.size}, {gap.size}.")
    if measure.size < 2:
        raise ValueError(f"a run family needs at least 2 ranked runs; got {measure.size}.")
    axes = _check_hparams(hparams, measure.size)
    per_axis: dict[str, dict[str, Any]] = {}
    for axis in axes:
        groups: dict[tuple, list[int]] = {}
        for i, h in enumerate(hparams):
            groups.setdefault(tuple((a, h[a]) for a in axes if a != axis), []).append(i)
        taus, undefined = [], 0
        for members in groups.values():
            tau = kendall_tau_b(measure[members], gap[members]) if len(members) >= 2 else math.nan
            if math.isnan(tau):
                undefined += 1
            else:
                taus.append(tau)
        per_axis[axis] = {
            "tau": float(np.mean(taus)) if taus else math.nan,
            "groups": len(taus),
            "undefined_groups": undefined,
        }
    defined = [v["tau"] for v in per_axis.values() if not math.isnan(v["tau"])]
    return {"tau": float(np.mean(defined)) if defined else math.nan, "axes": per_axis}


def correlate(
    measure: Sequence[float],
    gap: Sequence[float],
    *,
    converged: Sequence[bool] | None = None,
    hparams: Sequence[Mapping[str, Hashable]] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Kendall's tau-b (and the granulated tau) of a measure against the gap over a family.

    Args:
      measure: the measure per run. Runs flagged as not converged may hold
        NaN (a measure that could not be computed); ranked runs may not.
      gap: the robust generalization gap per run (``robust_gap``).
      converged: per run, whether it converged (default: all). The others
        are left out of both coefficients and listed in ``excluded``.
      hparams: per run, a dict of hyperparameters; gives the granulated tau.
      names: run names for the report (default ``"run0"``, ``"run1"``, ...).

    Returns:
      A dict: ``tau_b``, ``granulated`` (``granulated_tau``'s dict, or None
      without ``hparams``), ``ranked`` (names of the ranked runs),
      ``excluded`` (names of the runs flagged as not converged), ``num_ranked``.

    Raises:
      ValueError: mismatched lengths, fewer than 2 ranked runs, non-finite
        values among the ranked runs, a non-boolean ``converged`` flag.

    Example:
      >>> correlate([3.0, 1.0, 2.0, float("nan")], [0.3, 0.1, 0.2, 0.0],
      ...           converged=[True, True, True, False], names=["a", "b", "c", "d"])
      {'tau_b': 1.0, 'granulated': None, 'ranked': ['a', 'b', 'c'], 'excluded': ['d'], ...}
    """
    try:
        measure_all = np.asarray(measure, np.float64)
        gap_all = np.asarray(gap, np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError("measure and gap must be sequences of numbers.") from e
    n = measure_all.size
    if measure_all.ndim != 1 or gap_all.shape != measure_all.shape:
        raise ValueError(
            f"measure and gap must be 1-D and equally long; got shapes {measure_all.shape} and "
            f"{gap_all.shape}."
        )
    names = [f"run{i}" for i in range(n)] if names is None else [str(s) for s in names]
    if len(names) != n:
        raise ValueError(f"names must have one entry per run ({n}); got {len(names)}.")
    if converged is None:
        converged = [True] * n
    converged = list(converged)
    if len(converged) != n or not all(isinstance(c, bool | np.bool_) for c in converged):
        raise ValueError(f"converged must be {n} booleans (one per run); got {converged!r}.")
    if hparams is not None:
        _check_hparams(hparams, n)
    keep = [i for i in range(n) if converged[i]]
    excluded = [names[i] for i in range(n) if not converged[i]]
    if len(keep) < 2:
        raise ValueError(
            f"a run family needs at least 2 ranked (converged) runs; got {len(keep)} of {n}"
            + (f" (not converged: {excluded})" if excluded else "")
            + "."
        )
    ranked = [names[i] for i in keep]
    m, g = measure_all[keep], gap_all[keep]
    for label, values in (("measure", m), ("gap", g)):
        bad = [ranked[i] for i in np.flatnonzero(~np.isfinite(values))]
        if bad:
            raise ValueError(
                f"{label} is not finite for the ranked runs {bad}; fix the measure or flag those "
                "runs as not converged."
            )
    granulated = None
    if hparams is not None:
        granulated = granulated_tau(m, g, [hparams[i] for i in keep])
    return {
        "tau_b": kendall_tau_b(m, g),
        "granulated": granulated,
        "ranked": ranked,
        "excluded": excluded,
        "num_ranked": len(keep),
    }
