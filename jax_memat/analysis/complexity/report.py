"""Every complexity measure of one run, and the report over a family of runs (claim C3).

Dong et al., "Exploring Memorization in Adversarial Training" (ICLR 2022,
Sec. 4) rank complexity measures against the robust generalization gap over
a family of runs trained with label noise, and find that they do not track
it. This module holds the two halves of that report that need no workdir:

- ``complexity_measures``: the measures of one model by name (``MEASURES``;
  ``DEFAULT_MEASURES`` is the subset a CPU affords), as a flat dict of
  floats with the flags a reader needs (a saturated search, a non-positive
  margin). Data measures read the first ``num_examples`` training examples
  with the labels the run was trained on; the adversarial inputs are
  ``attack`` against the measured model.
- ``family_report``: per measure, Kendall's tau-b and Jiang et al.'s
  granulated tau against the gap over the runs that converged (the others
  are listed, never ranked); ``write_family_report`` writes it as JSON, CSV,
  a markdown table and a figure against the noise rate.

``jax_memat.experiment.analyses`` (``analyze("complexity", ...)``) restores
the runs, measures the gap with the run's own evaluation and calls both.
See docs/complexity.md.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jax_memat.analysis.complexity import correlation, flatness, input_space, perturb, sharpness
from jax_memat.analysis.complexity.norms import norm_measures
from jax_memat.attacks import AttackSpec
from jax_memat.fileio import atomic_write

# Measures by the call that computes them: asking for any name of a group runs
# the group's call once. The norm group's margins are taken at ``attack``'s points.
NORM_MEASURES: tuple[str, ...] = (
    "param_norm",
    "log_prod_fro",
    "log_prod_fro_over_margin",
    "sum_of_fro",
    "sum_of_fro_over_margin",
    "log_prod_spec",
    "log_prod_spec_over_margin",
    "fro_over_spec",
    "log_spec_bound",
    "log_spec_bound_init",
    "dist_fro",
    "dist_spec",
    "path_norm",
    "path_norm_over_margin",
    "log_bartlett",
    "log_bartlett_over_margin",
    "log_bartlett_init",
    "log_bartlett_init_over_margin",
    "inverse_margin_sq",
)
MEASURE_GROUPS: dict[str, tuple[str, ...]] = {
    "norms": NORM_MEASURES,
    "pac_bayes": ("pac_bayes_inverse_sigma_sq", "pac_bayes_bound_init", "pac_bayes_bound_origin"),
    "pac_bayes_mag": (
        "pac_bayes_mag_inverse_sigma_sq",
        "pac_bayes_mag_bound_init",
        "pac_bayes_mag_bound_origin",
    ),
    "sharpness": ("worst_case_sharpness",),
    "sharpness_mag": ("worst_case_sharpness_mag",),
    "average_flatness": ("average_robust_flatness",),
    "worst_flatness": ("worst_case_robust_flatness",),
    "landscape": ("landscape_random", "landscape_adversarial"),
    "lipschitz": ("local_lipschitz",),
    "lipschitz_test": ("local_lipschitz_test",),
    "input_gradient": ("input_gradient_norm",),
}
MEASURES: tuple[str, ...] = tuple(name for names in MEASURE_GROUPS.values() for name in names)
# What a 2-core CPU affords for a family of small-CNN runs in minutes: one norm
# pass (power iterations and one attack for the margins) and two input-space
# measures (one attack-sized pass each). The searches (PAC-Bayes, sharpness)
# and the flatness measures cost tens of attacks per run: ask for them by name.
DEFAULT_MEASURES: tuple[str, ...] = (
    *NORM_MEASURES,
    "local_lipschitz",
    "input_gradient_norm",
)
_SEARCH_GROUPS = ("pac_bayes", "pac_bayes_mag", "sharpness", "sharpness_mag")

Progress = Callable[[str, int, int], None]


def check_measures(measures: Sequence[str] | str | None) -> tuple[str, ...]:
    """The measure names, checked against ``MEASURES`` (None: ``DEFAULT_MEASURES``).

    Raises:
      ValueError: an unknown or repeated name, or an empty list (the message
        lists the accepted names).

    Example:
      >>> check_measures(["dist_fro", "local_lipschitz"])
      ('dist_fro', 'local_lipschitz')
    """
    if measures is None:
        return DEFAULT_MEASURES
    if isinstance(measures, str):
        measures = [m.strip() for m in measures.split(",") if m.strip()]
    measures = tuple(measures)
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise ValueError(f"Unknown measures {unknown}; accepted: {', '.join(MEASURES)}.")
    if not measures or len(set(measures)) != len(measures):
        raise ValueError(f"measures must be distinct names, at least one; got {list(measures)}.")
    return measures


def _groups(measures: Sequence[str]) -> list[str]:
    return [g for g, names in MEASURE_GROUPS.items() if any(m in names for m in measures)]


def _as_float_images(images: Any, n: int) -> np.ndarray:
    x = np.asarray(images[:n])
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.float32) / 255.0
    return x.astype(np.float32)


def _seed(key: jax.Array) -> int:
    return int(jax.random.randint(key, (), 0, 2**31 - 1))


def complexity_measures(
    apply_fn: perturb.ApplyFn,
    variables: Mapping[str, Any],
    init_variables: Mapping[str, Any],
    train_images: Any,
    train_labels: Any,
    test_images: Any,
    test_labels: Any,
    *,
    attack: AttackSpec,
    measures: Sequence[str] | None = None,
    num_examples: int = 256,
    key: jax.Array,
    mesh: Mesh | None = None,
    batch_size: int = 256,
    progress: Progress | None = None,
) -> dict[str, float]:
    """The complexity measures ``measures`` of one model, by name.

    Every measure runs with BatchNorm in inference mode, on the first
    ``num_examples`` rows of the training split with the labels the model
    was trained on (noisy labels for a noisy run), except
    ``local_lipschitz_test`` (test split). Adversarial inputs are ``attack``
    against the measured (or perturbed) model:

    * norm and margin measures (``NORM_MEASURES``, ``norm_measures``, BatchNorm
      folded, conv operator norms): gamma is the 10th percentile of the
      margins at ``attack``'s points; ``inverse_margin_sq = 1 / gamma^2``;
    * ``pac_bayes_*``, ``worst_case_sharpness*``: the searches of
      ``sharpness`` on robust accuracy (``inputs="adversarial"``); the bounds'
      ``m`` is the size of the training split passed (``len(train_images)``);
    * ``average_robust_flatness``, ``worst_case_robust_flatness``,
      ``landscape_random``/``landscape_adversarial`` (``g(0.5) - g(0)``):
      ``flatness``'s measures of the robust cross-entropy under ``attack``;
    * ``local_lipschitz`` (training split), ``local_lipschitz_test``: the
      L-inf ball of radius ``attack.eps``; ``input_gradient_norm`` at
      ``attack``'s points.

    Args:
      apply_fn: ``apply(variables, images, train) -> (logits, state)``, unjitted.
      variables: the measured variables (``state.variables``).
      init_variables: the same model's variables at initialization.
      train_images, train_labels: the training split (uint8 or floats in
        [0, 1]) and the labels the model was trained on.
      test_images, test_labels: the test split.
      attack: the attack of the run's threat model, e.g.
        ``AttackSpec("pgd", eps=8 / 255, step_size=2 / 255, steps=10)``.
      measures: names from ``MEASURES`` (default ``DEFAULT_MEASURES``).
      num_examples: the first rows of each split read by the data measures.
      key: everything random derives from it (one ``fold_in`` per measure group).
      mesh: the device mesh of the search and data measures (default: all devices).
      batch_size: examples per step (rounded down to what ``num_examples`` needs).
      progress: ``progress(group, done, total)`` as each measure group advances.

    Returns:
      ``{name: float}``: the requested measures, ``num_examples``, and the
      flags of the groups run: ``margin_gamma``, ``margin_positive`` (1/0;
      the over-margin measures are NaN when 0), ``power_converged`` (1/0:
      whether every conv operator norm met its power-iteration stopping
      rule); ``<group>_saturated`` and
      ``<group>_converged`` (1/0) for the searches ``pac_bayes``,
      ``pac_bayes_mag``, ``sharpness``, ``sharpness_mag`` (a saturated value is
      a floor, not a value); ``<group>_accuracy``, the unperturbed robust
      accuracy the search started from.

    Raises:
      ValueError: an unknown measure (lists ``MEASURES``), a bad attack,
        ``num_examples`` outside a split, or a measure that needs an L-inf
        attack; before anything compiles.

    Example:
      >>> pgd = AttackSpec("pgd", eps=0.1, step_size=0.025, steps=10)
      >>> m = complexity_measures(apply_fn, state.variables, init.variables, x_train,
      ...                         y_trained_on, x_test, y_test, attack=pgd,
      ...                         measures=["dist_fro", "local_lipschitz"],
      ...                         num_examples=512, key=jax.random.key(0))
      >>> m["dist_fro"], m["local_lipschitz"]
    """
    measures = check_measures(measures)
    if not isinstance(attack, AttackSpec):
        raise ValueError(f"attack must be an AttackSpec; got {attack!r}.")
    attack.validate()
    groups = _groups(measures)
    if {"lipschitz", "lipschitz_test"} & set(groups) and attack.norm != "linf":
        raise ValueError(
            f"local_lipschitz measures the L-inf ball; the attack's norm is {attack.norm!r}. "
            "Leave local_lipschitz out or pass an L-inf attack."
        )
    splits = {"training": (train_images, train_labels)}
    if "lipschitz_test" in groups:
        splits["test"] = (test_images, test_labels)
    for split, (images, labels) in splits.items():
        rows = np.shape(images)[0] if np.ndim(images) == 4 else 0
        if np.ndim(images) != 4 or np.shape(labels) != (rows,):
            raise ValueError(
                f"{split} images must be [N, H, W, C] with labels [N]; got shapes "
                f"{np.shape(images)} and {np.shape(labels)}."
            )
        if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer):
            raise ValueError(f"num_examples must be an int; got {num_examples!r}.")
        if not 0 < num_examples <= rows:
            raise ValueError(
                f"num_examples={num_examples} must be in [1, {rows}] (the {split} split's size)."
            )
    mesh = perturb.resolve_mesh(mesh)
    devices = mesh.devices.size
    n = int(num_examples)
    batch = perturb.check_batch(batch_size, mesh)
    batch = min(batch, -(-n // devices) * devices)  # no batch larger than the data needs

    x = _as_float_images(train_images, n)
    y = np.asarray(train_labels[:n]).astype(np.int32)
    m_train = int(np.shape(train_images)[0])
    key = perturb.as_key(key)
    out: dict[str, float] = {"num_examples": float(n)}
    common = {"num_examples": n, "batch_size": batch, "mesh": mesh}

    for index, group in enumerate(groups):
        k = jax.random.fold_in(key, index)

        def tick(done: int, total: int, group: str = group) -> None:
            if progress is not None:
                progress(group, done, total)

        search = {"key": k, "inputs": "adversarial", "attack": attack, "progress": tick, **common}
        if group == "norms":
            r = norm_measures(
                apply_fn,
                variables,
                init_variables,
                x,
                y,
                attack=attack,
                seed=_seed(k),
                batch_size=batch,
            )
            out.update({name: float(r[name]) for name in NORM_MEASURES if name in r})
            positive = bool(r["margin_positive"])
            out["inverse_margin_sq"] = 1.0 / r["margin_gamma"] ** 2 if positive else math.nan
            out["margin_gamma"] = float(r["margin_gamma"])
            out["margin_positive"] = float(positive)
            out["power_converged"] = float(r["power_converged"])
            tick(1, 1)
        elif group in ("pac_bayes", "pac_bayes_mag"):
            r = sharpness.pac_bayes_sigma(
                apply_fn,
                variables,
                x,
                y,
                init_variables=init_variables,
                magnitude_aware=group == "pac_bayes_mag",
                **search,
            )
            out[f"{group}_inverse_sigma_sq"] = float(r["inverse_sigma_sq"])
            # The bounds' log(m / sigma) term counts the whole training split,
            # not the subset the search read (m = n here).
            for ref in ("init", "origin"):
                out[f"{group}_bound_{ref}"] = float(r[f"bound_{ref}"]) + math.log(m_train / n)
        elif group in ("sharpness", "sharpness_mag"):
            r = sharpness.worst_case_sharpness(
                apply_fn, variables, x, y, magnitude_aware=group == "sharpness_mag", **search
            )
            name = "worst_case_sharpness" + ("_mag" if group == "sharpness_mag" else "")
            out[name] = float(r["inverse_alpha_sq"])
        elif group == "average_flatness":
            r = flatness.average_robust_flatness(
                apply_fn, variables, x, y, attack=attack, key=k, progress=tick, **common
            )
            out["average_robust_flatness"] = float(r["flatness"])
        elif group == "worst_flatness":
            r = flatness.worst_case_robust_flatness(
                apply_fn, variables, x, y, attack=attack, key=k, progress=tick, **common
            )
            out["worst_case_robust_flatness"] = float(r["flatness"])
        elif group == "landscape":
            r = flatness.weight_loss_landscape(
                apply_fn, variables, x, y, attack=attack, key=k, progress=tick, **common
            )
            out["landscape_random"] = float(r["random_summary"])
            out["landscape_adversarial"] = float(r["adversarial_summary"])
        elif group in ("lipschitz", "lipschitz_test"):
            images = x if group == "lipschitz" else _as_float_images(test_images, n)
            r = input_space.local_lipschitz(
                apply_fn, variables, images, eps=attack.eps, key=k, progress=tick, **common
            )
            out["local_lipschitz" + ("_test" if group == "lipschitz_test" else "")] = float(
                r["local_lipschitz"]
            )
        else:  # input_gradient
            r = input_space.input_gradient_norm(
                apply_fn,
                variables,
                x,
                y,
                key=k,
                inputs="adversarial",
                attack=attack,
                progress=tick,
                **common,
            )
            out["input_gradient_norm"] = float(r["input_gradient_norm"])
        if group in _SEARCH_GROUPS:
            out[f"{group}_saturated"] = float(r["saturated"])
            out[f"{group}_converged"] = float(r["converged"])
            out[f"{group}_accuracy"] = float(r["accuracy"])
    # Only what was asked for among the measures (a group computes all of its own).
    flags = {k: v for k, v in out.items() if k not in MEASURES}
    return {**{m: out[m] for m in measures}, **flags}


def saturated_flag(measure: str) -> str | None:
    """The flag saying that ``measure``'s search saturated, or None for measures that do not search.

    Example:
      >>> saturated_flag("pac_bayes_bound_init")
      'pac_bayes_saturated'
    """
    for group in _SEARCH_GROUPS:
        if measure in MEASURE_GROUPS[group]:
            return f"{group}_saturated"
    return None


def varying_axes(hparams: Sequence[Mapping[str, Hashable]]) -> list[str]:
    """The hyperparameter axes whose value is not the same for every run."""
    axes = sorted({a for h in hparams for a in h})
    return [a for a in axes if len({repr(h.get(a)) for h in hparams}) > 1]


def family_report(runs: Sequence[Mapping[str, Any]], measures: Sequence[str]) -> dict[str, Any]:
    """Ranks each measure against the robust generalization gap over a family of runs.

    Args:
      runs: one dict per run with ``name``, ``hparams`` (axis -> value, e.g.
        ``{"objective": "pgd_at", "label_noise": 0.4, "seed": 0}``), ``gap``,
        ``converged`` (bool) and ``measures`` (``complexity_measures``' dict).
      measures: the measure names to rank.

    Returns:
      A dict: ``runs`` (as given), ``measures``, ``axes`` (the axes that vary
      over the ranked runs: those the granulated tau uses), ``ranked`` and
      ``excluded`` (run names; excluded = not converged), ``note`` (why no
      tau, when fewer than 2 runs are ranked) and ``correlation``: per
      measure ``{"tau_b", "granulated_tau", "granulated_axes", "num_ranked",
      "saturated_runs", "problem", "by_objective"}`` (``problem`` says why a
      tau is NaN: a non-finite value for a ranked run, or a constant
      measure; ``by_objective`` maps each ``objective`` hyperparameter value
      with at least 2 ranked runs to the tau-b over those runs alone, NaN
      where the measure or the gap is constant there).

    Example:
      >>> rows = [{"name": f"r{r}", "hparams": {"label_noise": r}, "gap": r, "converged": True,
      ...          "measures": {"dist_fro": 10 * r}} for r in (0.0, 0.5, 1.0)]
      >>> family_report(rows, ["dist_fro"])["correlation"]["dist_fro"]["tau_b"]
      1.0
    """
    ranked = [r for r in runs if r["converged"]]
    names = [r["name"] for r in ranked]
    axes = varying_axes([r["hparams"] for r in ranked]) if len(ranked) >= 2 else []
    report: dict[str, Any] = {
        "runs": list(runs),
        "measures": list(measures),
        "axes": axes,
        "ranked": names,
        "excluded": [r["name"] for r in runs if not r["converged"]],
        "note": None,
        "correlation": {},
    }
    if len(ranked) < 2:
        report["note"] = (
            f"Kendall's tau needs >= 2 ranked (converged) runs; this family has {len(ranked)} of "
            f"{len(runs)}."
        )
        return report
    gap = [float(r["gap"]) for r in ranked]
    hparams = [{a: r["hparams"][a] for a in axes} for r in ranked] if axes else None
    for measure in measures:
        values = [float(r["measures"].get(measure, math.nan)) for r in ranked]
        flag = saturated_flag(measure)
        row: dict[str, Any] = {
            "tau_b": math.nan,
            "granulated_tau": math.nan,
            "granulated_axes": {},
            "num_ranked": len(ranked),
            "saturated_runs": [r["name"] for r in ranked if flag and r["measures"].get(flag)],
            "problem": None,
            "by_objective": {},
        }
        bad = [n for n, v in zip(names, values, strict=True) if not math.isfinite(v)]
        if bad:
            row["problem"] = f"not finite for the ranked runs {bad}"
        else:
            result = correlation.correlate(values, gap, hparams=hparams, names=names)
            row["tau_b"] = result["tau_b"]
            if result["granulated"] is not None:
                row["granulated_tau"] = result["granulated"]["tau"]
                row["granulated_axes"] = result["granulated"]["axes"]
            if math.isnan(row["tau_b"]):
                row["problem"] = "constant over the ranked runs (or a constant gap)"
            row["by_objective"] = _tau_by_objective(ranked, values, gap)
        report["correlation"][measure] = row
    return report


def _tau_by_objective(
    ranked: Sequence[Mapping[str, Any]], values: Sequence[float], gap: Sequence[float]
) -> dict[str, float]:
    """Tau-b within each objective (the paper ranks PGD-AT and TRADES runs separately too)."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(ranked):
        if "objective" in r["hparams"]:
            groups.setdefault(str(r["hparams"]["objective"]), []).append(i)
    return {
        objective: correlation.kendall_tau_b([values[i] for i in rows], [gap[i] for i in rows])
        for objective, rows in sorted(groups.items())
        if len(rows) >= 2
    }


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _json_safe(obj: Any) -> Any:
    """NaN and infinities as null, so the file is standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def report_markdown(report: Mapping[str, Any]) -> str:
    """The report as markdown: a table of runs, then a table of measures and their taus.

    Example:
      >>> print(report_markdown(family_report(rows, ["dist_fro"])))
    """
    runs, measures = report["runs"], report["measures"]
    axes = sorted({a for r in runs for a in r["hparams"]})
    lines = [
        "| run | " + " | ".join(axes) + " | gap | robust train | robust test "
        "| natural train | converged | flags |"
    ]
    lines.append("|" + " --- |" * (len(axes) + 7))
    for r in runs:
        m = r["measures"]
        flags = [k for k in sorted(m) if k.endswith("_saturated") and m[k]]
        # A search that used up its steps without hitting the target within tolerance.
        flags += [k for k in sorted(m) if k.endswith("_converged") and m[k] == 0.0]
        if "margin_positive" in m and not m["margin_positive"]:
            flags.append("margin<=0")
        cells = [r["name"], *(_fmt(r["hparams"].get(a)) for a in axes)]
        cells += [
            _fmt(r["gap"]),
            _fmt(r["robust_train_accuracy"]),
            _fmt(r["robust_test_accuracy"]),
            _fmt(r["natural_train_accuracy"]),
            _fmt(bool(r["converged"])),
            ", ".join(flags) or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if report["note"]:
        lines.append(report["note"])
    else:
        if report["excluded"]:
            lines.append(
                f"Not converged, left out of the ranking: {', '.join(report['excluded'])}."
            )
            lines.append("")
        axes_text = ", ".join(report["axes"]) or "none (no axis varies)"
        lines.append(f"Ranked runs: {len(report['ranked'])}; granulated over: {axes_text}.")
        lines.append("")
        objectives = sorted(
            {o for c in report["correlation"].values() for o in c.get("by_objective", {})}
        )
        lines.append(
            "| measure | tau-b | granulated tau | "
            + "".join(f"tau-b {o} | " for o in objectives)
            + "saturated runs | note |"
        )
        lines.append("|" + " --- |" * (5 + len(objectives)))
        for name in measures:
            c = report["correlation"][name]
            per = c.get("by_objective", {})
            lines.append(
                f"| {name} | {_fmt(c['tau_b'])} | {_fmt(c['granulated_tau'])} | "
                + "".join(f"{_fmt(per.get(o, math.nan))} | " for o in objectives)
                + f"{len(c['saturated_runs'])} | {c['problem'] or ''} |"
            )
    return "\n".join(lines) + "\n"


def report_csv(report: Mapping[str, Any]) -> str:
    """The table measure x run as CSV: one row per measure (then the gap and the flags)."""
    runs = report["runs"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["measure", *(r["name"] for r in runs), "tau_b", "granulated_tau"])
    for name in report["measures"]:
        c = report["correlation"].get(name, {})
        writer.writerow(
            [
                name,
                *(repr(float(r["measures"].get(name, math.nan))) for r in runs),
                repr(float(c.get("tau_b", math.nan))),
                repr(float(c.get("granulated_tau", math.nan))),
            ]
        )
    extra = ["gap", "robust_train_accuracy", "robust_test_accuracy", "natural_train_accuracy"]
    for key in extra:
        writer.writerow([key, *(repr(float(r[key])) for r in runs), "", ""])
    writer.writerow(["converged", *(int(bool(r["converged"])) for r in runs), "", ""])
    flags = sorted({k for r in runs for k in r["measures"] if k not in MEASURES})
    for key in flags:
        writer.writerow(
            [key, *(repr(float(r["measures"].get(key, math.nan))) for r in runs), "", ""]
        )
    return buffer.getvalue()


def _series(runs: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[Mapping[str, Any]]]]:
    """Runs grouped by every varying hyperparameter but the noise rate and the seed."""
    varying = varying_axes([r["hparams"] for r in runs])
    axes = [a for a in varying if a not in ("label_noise", "seed")]
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        parts = [
            str(r["hparams"].get(a)) if a == "objective" else f"{a}={r['hparams'].get(a)}"
            for a in axes
        ]
        groups.setdefault(", ".join(parts) or "runs", []).append(r)
    return sorted(groups.items())


def plot_family(report: Mapping[str, Any], path: str, title: str = "") -> str:
    """One panel per measure against the label-noise rate, and a panel of the gap.

    One series per setting of the varying hyperparameters other than the
    noise rate and the seed (e.g. objective, width), each with its own
    marker: every run is a point, and the line joins the mean over seeds at
    each noise rate. Runs that did not converge are drawn hollow and left out
    of the line. Runs without a ``label_noise`` hyperparameter are placed at 0.
    The panel titles give the tau-b over the ranked runs.

    Returns:
      ``path`` (written atomically).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    panels = ["gap", *report["measures"]]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    series = _series(runs)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def value(r: Mapping[str, Any], panel: str) -> float:
        v = r["gap"] if panel == "gap" else r["measures"].get(panel, math.nan)
        return float(math.nan if v is None else v)

    try:
        for ax, panel in zip(axes.flat, panels, strict=False):
            drawn = False
            for index, (label, members) in enumerate(series):
                style = {"color": colors[index % len(colors)], "marker": "osD^v<>pX*"[index % 10]}
                by_rate: dict[float, list[float]] = {}
                for converged in (True, False):
                    pts = [
                        (float(r["hparams"].get("label_noise", 0.0)), value(r, panel))
                        for r in members
                        if bool(r["converged"]) == converged and math.isfinite(value(r, panel))
                    ]
                    if not pts:
                        continue
                    drawn = True
                    ax.plot(
                        *zip(*pts, strict=True),
                        linestyle="none",
                        fillstyle="full" if converged else "none",
                        alpha=0.6 if converged else 1.0,
                        label=None if converged else f"{label} (not converged)",
                        **style,
                    )
                    if converged:
                        for rate, v in pts:
                            by_rate.setdefault(rate, []).append(v)
                if by_rate:
                    rates = sorted(by_rate)
                    means = [float(np.mean(by_rate[rate])) for rate in rates]
                    ax.plot(rates, means, linestyle="-", label=label, **style)
            c = report["correlation"].get(panel)
            tau = f"  (tau-b {_fmt(c['tau_b'])})" if c else ""
            if not drawn:
                ax.text(
                    0.5,
                    0.5,
                    "not finite for any run\n(e.g. margin <= 0)",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                )
            ax.set_title(
                ("robust generalization gap" if panel == "gap" else panel) + tau, fontsize=9
            )
            ax.set_xlabel("label-noise rate")
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        if title:
            fig.suptitle(title)
        fig.tight_layout(rect=(0, 0, 1, 0.97) if title else None)
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def write_family_report(report: Mapping[str, Any], out_dir: str, title: str = "") -> dict:
    """Writes ``complexity.json``, ``.csv``, ``.md`` and ``.png`` in ``out_dir`` (atomically).

    In the JSON, NaN (a measure undefined for a run, a tau without a
    ranking) is written as null.

    Returns:
      ``{"json": path, "csv": path, "md": path, "png": path}``.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        ext: os.path.join(out_dir, f"complexity.{ext}") for ext in ("json", "csv", "md", "png")
    }
    with atomic_write(paths["json"]) as f:
        json.dump(_json_safe(report), f, indent=2, sort_keys=True)
        f.write("\n")
    with atomic_write(paths["csv"]) as f:
        f.write(report_csv(report))
    with atomic_write(paths["md"]) as f:
        f.write(report_markdown(report))
    plot_family(report, paths["png"], title)
    return paths
