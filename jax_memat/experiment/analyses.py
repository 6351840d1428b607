"""The analyses of a run's workdir, by name: what ``python -m jax_memat.analyze`` runs.

``analyze(name, workdir, checkpoint=None, **options)`` checks its arguments,
the workdir(s) and the checkpoints before anything is built or compiled, runs
one analysis and writes its JSON and PNG outputs under ``<workdir>/analysis/``
(or ``out_dir``). The analysis functions themselves live in
``jax_memat.analysis`` and work on records or on a live train state; this
module adds what needs a run's workdir (its config, labels, checkpoints).

Analyses:

- ``memorization``: per-example records over epochs -> learning times,
  forgetting events, hard examples and their overlap with corrupted labels
  (``jax_memat.analysis.reports.memorization_report``). It reads records of
  every epoch, so it takes no checkpoint.
- ``gradients``: the per-example gradients of the run's own training
  objective at one checkpoint (default ``best``) over the first
  ``num_examples`` training examples with their trained-on labels:
  ``gradients.json`` (distributions of ``||g_i||``, ``cos(g_i, mean)`` and the
  loss, overall and for clean vs corrupted labels; gradient variance and
  noise scale), ``gradients.npz`` (the per-example arrays) and
  ``gradients.png``; with the per-step statistics a run recorded
  (``grad_stats.every_steps``), also ``gradient_stats.png`` over epochs.
- ``complexity``: one or several runs (a family, e.g. one noise rate per
  run): the complexity measures of each run's ``final`` checkpoint (with its
  ``init`` checkpoint; ``jax_memat.analysis.complexity.complexity_measures``),
  its robust generalization gap (robust training accuracy on the labels it
  was trained on minus robust test accuracy, PGD of the run's threat model,
  the same examples count) and natural training accuracy; runs below
  ``min_train_accuracy`` are flagged as not converged and left out of the
  ranking; Kendall's tau-b and the granulated tau of each measure against
  the gap: ``complexity.json``, ``.csv``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from jax_memat.analysis.complexity.report import (
    check_measures,
    complexity_measures,
    family_report,
    write_family_report,
)
from jax_memat.analysis.gradient_snapshot import (
    gradient_snapshot,
    plot_gradient_snapshot,
    save_snapshot,
    summarize_snapshot,
)
from jax_memat.analysis.reports import memorization_report
from jax_memat.attacks import AttackSpec
from jax_memat.experiment.checkpoints import RunCheckpoints
from jax_memat.experiment.config import evaluation_attacks, expected_split_sizes
from jax_memat.experiment.setup import LoadedRun, load_run, resolve_checkpoint
from jax_memat.experiment.workdir import CONFIG_FILE, LABELS_FILE, read_json
from jax_memat.fileio import atomic_write

OUTPUT_DIR = "analysis"
CHECKPOINT_KINDS = ("best", "final", "latest", "init")


def _write_json(path: str, obj: dict) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def parse_checkpoint(checkpoint: str | int | None) -> str | int | None:
    """``"best"``, ``"final"``, ``"latest"``, ``"init"``, a step number (as int or digits) or None.

    Raises:
      ValueError: anything else (the message lists what is accepted).
    """
    if checkpoint is None or checkpoint in CHECKPOINT_KINDS:
        return checkpoint
    if isinstance(checkpoint, int) and not isinstance(checkpoint, bool) and checkpoint >= 0:
        return checkpoint
    if isinstance(checkpoint, str) and checkpoint.isdigit():
        return int(checkpoint)
    raise ValueError(
        f"checkpoint={checkpoint!r} is not accepted; use {', '.join(CHECKPOINT_KINDS)} or the "
        "step number of a kept checkpoint."
    )


def _check_checkpoint_exists(workdir: str, checkpoint: str | int) -> None:
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"{workdir} has no checkpoints/ folder: no checkpoint to analyse.")
    ckpts = RunCheckpoints(workdir)
    try:
        resolve_checkpoint(ckpts, workdir, {"final": "latest"}.get(checkpoint, checkpoint))
    finally:
        ckpts.close()


def gradients_report(
    workdir: str,
    out_dir: str,
    *,
    checkpoint: str | int | None = None,
    num_examples: int | None = None,
    microbatch: int | None = None,
    seed: int = 0,
) -> dict:
    """The ``gradients`` analysis (see the module docstring); returns its summary.

    Args:
      workdir: a training workdir with checkpoints.
      out_dir: where ``gradients.json``, ``gradients.npz`` and the PNGs go.
      checkpoint: ``best`` (default), ``final``/``latest``, ``init`` or a step.
      num_examples: the first training examples analysed, a multiple of the
        run's batch size (default: 4 batches, at most the training set).
      microbatch: per-example gradients computed at once (memory only).
      seed: the attack's randomness.
    """
    config = read_json(os.path.join(workdir, CONFIG_FILE))
    batch_size = config["batch_size"]
    if num_examples is not None and (
        isinstance(num_examples, bool)
        or not isinstance(num_examples, int)
        or num_examples < batch_size
        or num_examples % batch_size
    ):
        raise ValueError(
            f"num_examples must be a multiple of the run's batch_size={batch_size} (whole "
            f"training batches, so BatchNorm sees batches as in training); got {num_examples!r}."
        )
    if microbatch is not None and (
        isinstance(microbatch, bool) or not isinstance(microbatch, int) or microbatch < 1
    ):
        raise ValueError(f"microbatch must be a positive integer or None; got {microbatch!r}.")
    checkpoint = parse_checkpoint(checkpoint) or "best"
    _check_checkpoint_exists(workdir, checkpoint)
    labels_path = os.path.join(workdir, LABELS_FILE)
    saved_labels = None
    if os.path.exists(labels_path):
        with np.load(labels_path) as f:
            saved_labels = {k: f[k] for k in ("labels", "changed") if k in f.files}

    def whole_batches(rows: int) -> int:
        total = rows - rows % batch_size
        n = num_examples if num_examples is not None else min(4 * batch_size, total)
        if n > total:
            raise ValueError(
                f"num_examples={n} exceeds the {total} training examples in whole batches of "
                f"{batch_size}."
            )
        return n

    if saved_labels and "labels" in saved_labels:
        whole_batches(saved_labels["labels"].size)  # checked before anything is built
    run = load_run(workdir, checkpoint)
    n = whole_batches(run.train.num_examples)
    snapshot = gradient_snapshot(
        run.setup.objective,
        run.state,
        run.train.images,
        run.train.labels,
        mesh=run.mesh,
        batch_size=batch_size,
        key=jax.random.key(seed),
        num_examples=n,
        epoch=run.meta.get("epoch"),
        microbatch=microbatch,
    )
    corrupted = (saved_labels or {}).get("changed")
    summary = {
        "workdir": os.path.abspath(workdir),
        "checkpoint": checkpoint,
        "epoch": run.meta.get("epoch"),
        "step": int(run.state.step),
        "objective": config["objective"]["name"],
        "batch_size": batch_size,
        "seed": seed,
        **summarize_snapshot(snapshot, corrupted),
    }
    os.makedirs(out_dir, exist_ok=True)
    save_snapshot(os.path.join(out_dir, "gradients.npz"), snapshot)
    name = os.path.basename(os.path.abspath(workdir))
    plot_gradient_snapshot(
        snapshot,
        os.path.join(out_dir, "gradients.png"),
        corrupted=corrupted,
        title=f"{name}: per-example gradients at the {checkpoint} checkpoint "
        f"(epoch {run.meta.get('epoch')}, {n} training examples)",
    )
    _draw_recorded_stats(workdir, out_dir, name)
    _write_json(os.path.join(out_dir, "gradients.json"), summary)
    return summary


def _draw_recorded_stats(workdir: str, out_dir: str, name: str) -> None:
    """``gradient_stats.png`` from the run's per-epoch rows, when it recorded any."""
    from jax_memat.analysis import plot_gradient_stats
    from jax_memat.experiment.metrics import read_metrics

    rows = [r for r in read_metrics(workdir) if r.get("grad_norm") is not None]
    if rows:
        plot_gradient_stats(rows, os.path.join(out_dir, "gradient_stats.png"), title=name)


def _memorization(workdir: str, out_dir: str, *, checkpoint=None, **options) -> dict:
    if checkpoint is not None:
        raise ValueError(
            "The memorization analysis reads the per-example records of every epoch and takes "
            f"no checkpoint (got checkpoint={checkpoint!r}); analyses that take one: gradients."
        )
    return memorization_report(workdir, out_dir, **options)


def run_hparams(config: dict) -> dict:
    """The hyperparameters a run family varies, from a run's saved config.

    ``objective`` (TRADES with its beta, ``+te`` with temporal ensembling),
    ``label_noise``, ``seed`` and ``width`` (``model.cnn_width`` of the small
    CNN, ``model.width`` of a WideResNet, None for other models).

    Example:
      >>> run_hparams(read_json("workdirs/trades_r0.4/config.json"))
      {'objective': 'trades(beta=6)', 'label_noise': 0.4, 'seed': 0, 'width': 10}
    """
    objective = config["objective"]["name"]
    if objective == "trades":
        objective += f"(beta={config['objective']['beta']:g})"
    if config.get("te", {}).get("enabled"):
        objective += "+te"
    model = config["model"]
    width = {"small_cnn": model.get("cnn_width"), "wide_resnet": model.get("width")}
    return {
        "objective": objective,
        "label_noise": float(config["dataset"]["label_noise"]),
        "seed": int(config["seed"]),
        "width": width.get(model["name"]),
    }


def gap_attack(config) -> AttackSpec:
    """The PGD attack of a run's robust generalization gap: the run's threat model.

    ``final_eval.pgd_steps`` steps (the run's final report), else
    ``eval.pgd_steps``, else the training attack's steps.
    """
    steps = config.final_eval.pgd_steps or config.eval.pgd_steps or config.attack.steps
    return evaluation_attacks(config, steps)["pgd"]


def run_accuracies(run: LoadedRun, attack: AttackSpec, num_examples: int, key) -> dict:
    """Natural and robust accuracies of a restored run on the first ``num_examples`` rows.

    The training split with the labels the run was trained on, and the test
    split; ``robust_gap`` is their robust difference
    (``jax_memat.analysis.complexity.robust_gap``), the run's own evaluation
    (``jax_memat.evaluation``) with ``attack``.

    Returns:
      ``natural_train_accuracy``, ``robust_train_accuracy``,
      ``natural_test_accuracy``, ``robust_test_accuracy``, ``robust_gap``.

    Example:
      >>> run = load_run("workdirs/pgd_at_r0.4", "final")
      >>> run_accuracies(run, gap_attack(run.config), 1000, jax.random.key(0))["robust_gap"]
    """
    from jax_memat.analysis.complexity import robust_gap
    from jax_memat.evaluation import evaluate, make_eval_fn
    from jax_memat.parallel import replicate

    eval_fn = make_eval_fn(run.setup.apply_fn, {"pgd": attack}, run.mesh)
    devices = run.mesh.devices.size
    batch = min(run.config.eval.batch_size, -(-num_examples // devices) * devices)
    out = {}
    for i, (split, data) in enumerate((("train", run.train), ("test", run.test))):
        images, labels = replicate((data.images, data.labels), run.mesh)
        _, summary = evaluate(
            eval_fn,
            run.state.variables,
            images,
            labels,
            batch_size=batch,
            key=jax.random.fold_in(key, i),
            mesh=run.mesh,
            num_examples=num_examples,
        )
        out[f"natural_{split}_accuracy"] = summary["natural_accuracy"]
        out[f"robust_{split}_accuracy"] = summary["pgd_accuracy"]
    out["robust_gap"] = robust_gap(out["robust_train_accuracy"], out["robust_test_accuracy"])
    return out


def _split_sizes(workdir: str, config: dict) -> tuple[int, int]:
    """(train, test) rows the run restores, read without loading data."""
    import ml_collections

    n_train, n_test = expected_split_sizes(ml_collections.ConfigDict(config))
    labels_path = os.path.join(workdir, LABELS_FILE)
    if os.path.exists(labels_path):
        with np.load(labels_path) as f:
            if "labels" in f.files:
                n_train = int(f["labels"].size)  # rows left out of training are not in it
    return n_train, n_test


def complexity_report(
    workdirs: Sequence[str],
    out_dir: str,
    *,
    measures: Sequence[str] | str | None = None,
    num_examples: int | None = None,
    min_train_accuracy: float = 0.9,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """The ``complexity`` analysis of a run family (see the module docstring); returns its report.

    Every workdir, its ``final`` and ``init`` checkpoints, the measure names
    and the example count are checked before any run is restored.

    Args:
      workdirs: training workdirs (one or several).
      out_dir: where ``complexity.json``, ``.csv``, ``.md`` and ``.png`` go.
      measures: names from ``complexity.MEASURES`` (a list or a comma-separated
        string; default ``complexity.DEFAULT_MEASURES``).
      num_examples: the first rows of each split read by the measures and the
        gap (default: 512, at most the smallest split of any run).
      min_train_accuracy: a run whose natural training accuracy on its
        trained-on labels is below this is flagged as not converged.
      seed: the randomness of the attacks and measures.
      progress: called with a line of text as each run and measure group advances.

    Returns:
      The report of ``complexity.family_report`` with ``settings`` added.
    """
    measures = check_measures(measures)
    if isinstance(min_train_accuracy, bool) or not isinstance(min_train_accuracy, int | float):
        raise ValueError(
            f"min_train_accuracy must be a number in [0, 1]; got {min_train_accuracy!r}."
        )
    if not 0 <= min_train_accuracy <= 1:
        raise ValueError(f"min_train_accuracy must be in [0, 1]; got {min_train_accuracy!r}.")
    if num_examples is not None and (
        isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1
    ):
        raise ValueError(f"num_examples must be a positive integer or None; got {num_examples!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer; got {seed!r}.")
    if len(set(map(os.path.abspath, workdirs))) != len(workdirs):
        raise ValueError(f"a workdir is named twice: {list(workdirs)}.")
    configs, smallest = [], None
    for workdir in workdirs:
        config = read_json(os.path.join(workdir, CONFIG_FILE))
        for checkpoint in ("final", "init"):
            _check_checkpoint_exists(workdir, checkpoint)
        sizes = _split_sizes(workdir, config)
        smallest = min(sizes) if smallest is None else min(smallest, *sizes)
        configs.append(config)
    n = min(512, smallest) if num_examples is None else num_examples
    if n > smallest:
        raise ValueError(
            f"num_examples={n} exceeds the smallest split of these runs ({smallest} examples)."
        )
    names = [os.path.basename(os.path.abspath(w)) for w in workdirs]
    if len(set(names)) != len(names):
        names = [os.path.abspath(w) for w in workdirs]

    def say(text: str) -> None:
        if progress is not None:
            progress(text)

    key = jax.random.key(seed)
    runs = []
    for i, (workdir, name, config) in enumerate(zip(workdirs, names, configs, strict=True)):
        say(f"[{i + 1}/{len(workdirs)}] {name}: restoring the final and init checkpoints")
        run = load_run(workdir, "final")
        ckpts = RunCheckpoints(workdir)
        try:
            init_state, _ = ckpts.restore("init", run.state)
        finally:
            ckpts.close()
        attack = gap_attack(run.config)
        accuracies = run_accuracies(run, attack, n, jax.random.fold_in(key, 1))
        say(
            f"[{i + 1}/{len(workdirs)}] {name}: robust gap {accuracies['robust_gap']:.4f}, "
            f"natural train accuracy {accuracies['natural_train_accuracy']:.4f}"
        )

        # Groups run one after another: each begins when the previous one is done.
        clock = {"start": time.perf_counter(), "said": 0.0}

        def tick(group: str, done: int, total: int, name=name, i=i, clock=clock) -> None:
            # Steps of a search or sweep, with the time since the group began (a worst-case
            # search on a CPU takes minutes per run), at most one line per 5 s, and the end.
            now = time.perf_counter()
            if done == total or now - clock["said"] >= 5.0:
                state = "done" if done == total else f"{done}/{total}"
                elapsed = now - clock["start"]
                say(f"[{i + 1}/{len(workdirs)}] {name}: {group} {state} ({elapsed:.0f} s)")
                clock["said"] = now
            if done == total:
                clock["start"] = now

        values = complexity_measures(
            run.setup.apply_fn,
            run.state.variables,
            init_state.variables,
            run.train.images,
            run.train.labels,
            run.test.images,
            run.test.labels,
            attack=attack,
            measures=measures,
            num_examples=n,
            key=jax.random.fold_in(key, 0),
            mesh=run.mesh,
            batch_size=run.config.eval.batch_size,
            progress=tick,
        )
        runs.append(
            {
                "name": name,
                "workdir": os.path.abspath(workdir),
                "hparams": run_hparams(config),
                "epoch": run.meta.get("epoch"),
                "step": int(run.state.step),
                "attack": {
                    "name": attack.name,
                    "norm": attack.norm,
                    "eps": attack.eps,
                    "step_size": attack.step_size,
                    "steps": attack.steps,
                },
                "gap": accuracies["robust_gap"],
                **{k: v for k, v in accuracies.items() if k != "robust_gap"},
                "converged": bool(accuracies["natural_train_accuracy"] >= min_train_accuracy),
                "measures": values,
            }
        )
    report = family_report(runs, measures)
    report["settings"] = {
        "num_examples": n,
        "min_train_accuracy": float(min_train_accuracy),
        "seed": seed,
        "checkpoints": {"measured": "final", "init": "init"},
    }
    title = f"{len(runs)} runs, {n} examples per split"
    write_family_report(report, out_dir, title)
    return report


def _complexity(workdir, out_dir: str, *, checkpoint=None, **options) -> dict:
    if checkpoint is not None:
        raise ValueError(
            "The complexity analysis measures each run's final checkpoint against its init "
            f"checkpoint and takes no checkpoint (got checkpoint={checkpoint!r}); analyses that "
            "take one: gradients."
        )
    return complexity_report(workdir, out_dir, **options)


ANALYSES: dict[str, Callable[..., dict]] = {
    "complexity": _complexity,
    "gradients": gradients_report,
    "memorization": _memorization,
}


# The options each analysis takes (beside out_dir and checkpoint).
ANALYSIS_OPTIONS: dict[str, tuple[str, ...]] = {
    "complexity": ("measures", "num_examples", "min_train_accuracy", "seed", "progress"),
    "gradients": ("num_examples", "microbatch", "seed"),
    "memorization": ("fraction", "epoch"),
}
# The analyses that read a family of runs; the others read exactly one workdir.
FAMILY_ANALYSES = ("complexity",)


def analyze(
    name: str,
    workdir: str | Sequence[str],
    out_dir: str | None = None,
    *,
    checkpoint: str | int | None = None,
    **options,
) -> dict:
    """Runs the analysis ``name`` on ``workdir`` (or a list of workdirs); outputs go to ``out_dir``.

    Args:
      name: one of ``ANALYSES`` (``complexity``, ``gradients``, ``memorization``).
      workdir: a training workdir; for ``complexity`` also a list of them (a
        run family). The other analyses take exactly one.
      out_dir: default ``<workdir>/analysis``; required for several workdirs.
      checkpoint: for analyses of one state (``gradients``): ``best``
        (default), ``final``/``latest``, ``init`` or a kept step.
      **options: the analysis's own options (``ANALYSIS_OPTIONS``: ``fraction``,
        ``epoch`` for memorization; ``num_examples``, ``microbatch``, ``seed``
        for gradients; ``measures``, ``num_examples``, ``min_train_accuracy``,
        ``seed``, ``progress`` for complexity).

    Raises:
      ValueError: unknown analysis, an option of another analysis, bad option
        or checkpoint name, several workdirs where one is taken or without
        ``out_dir`` (names what is accepted).
      FileNotFoundError: no run in a workdir, no such checkpoint, or nothing
        recorded that the analysis needs (names the config field that records it).

    Example:
      >>> summary = analyze("gradients", "workdirs/quickstart", checkpoint="final")
      >>> summary["clean"]["grad_norm"]["median"], summary["corrupted"]["grad_norm"]["median"]
      >>> report = analyze("complexity", ["workdirs/r0", "workdirs/r1"], "workdirs/family")
      >>> report["correlation"]["dist_fro"]["tau_b"]
    """
    if name not in ANALYSES:
        raise ValueError(f"Unknown analysis {name!r}; accepted: {', '.join(sorted(ANALYSES))}.")
    foreign = sorted(set(options) - set(ANALYSIS_OPTIONS[name]))
    if foreign:
        raise ValueError(
            f"{', '.join(foreign)} do(es) not apply to the {name} analysis; its options: "
            f"{', '.join(ANALYSIS_OPTIONS[name])}."
        )
    checkpoint = parse_checkpoint(checkpoint)
    if "measures" in options:  # a bad argument is reported before a missing workdir
        check_measures(options["measures"])
    workdirs = [workdir] if isinstance(workdir, str | os.PathLike) else list(workdir)
    workdirs = [os.fspath(w) for w in workdirs]
    if not workdirs:
        raise ValueError(f"the {name} analysis needs a workdir; got none.")
    if len(workdirs) > 1 and name not in FAMILY_ANALYSES:
        raise ValueError(
            f"the {name} analysis reads exactly one workdir; got {len(workdirs)}. Analyses of "
            f"several runs: {', '.join(FAMILY_ANALYSES)}."
        )
    if len(workdirs) > 1 and out_dir is None:
        raise ValueError(
            f"{len(workdirs)} workdirs need an explicit out_dir (--out_dir) for the {name} "
            "report: no single run's analysis folder holds it."
        )
    for w in workdirs:
        if not os.path.isfile(os.path.join(w, CONFIG_FILE)):
            raise FileNotFoundError(f"{w} holds no training run (config.json is missing).")
    out_dir = out_dir or os.path.join(workdirs[0], OUTPUT_DIR)
    target = workdirs if name in FAMILY_ANALYSES else workdirs[0]
    return ANALYSES[name](target, out_dir, checkpoint=checkpoint, **options)
