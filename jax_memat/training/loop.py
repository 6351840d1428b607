"""The training loop: config in, metrics, checkpoints, plots and a report out.

Order of work, chosen so that bad input never costs a compile or a file:

1. validate the config, the batch sizes against the devices, the workdir
   path, and the memory the run needs (estimated from shapes);
2. survey the workdir without writing: a new run, a run to resume, a
   finished run (then nothing is rewritten: the saved report is returned),
   or something to refuse (another config's run, a run's files without its
   config, a missing ``checkpoints/latest`` beside recorded epochs, a corrupt
   file named);
3. load the data (a missing dataset stops here) and check the labels against
   the saved ones; check the disk has room for the checkpoints;
4. take the workdir's lock, then save the resolved config and the labels
   (atomically);
5. build the model, optimizer and step; restore the newest intact checkpoint
   (a damaged one is set aside with a warning);
6. train epoch by epoch: per-epoch evaluation, metrics, the best and latest
   checkpoints (on disk before the next epoch starts); a NaN or Inf loss
   stops the run naming the step, keeping the last good checkpoint;
7. evaluate the final and the best checkpoints with PGD-20 (and CW; once
   when they are the same checkpoint) and write ``final_report.json`` and
   ``learning_curves.png``.

Resume order: the latest checkpoint gives the epoch; the data order depends
only on ``(seed, epoch)`` and every random key on the step, so the resumed run
is the uninterrupted one, bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
import time
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jax_memat.attacks import AttackSpec
from jax_memat.data import dataset_spec, train_batch_indices
from jax_memat.training.checkpoints import RunCheckpoints
from jax_memat.training.config import (
    check_device_batch_sizes,
    config_differences,
    config_to_dict,
    expected_split_sizes,
    validate_config,
)
from jax_memat.training.errors import (
    ConfigError,
    CorruptFileError,
    NonFiniteLossError,
    ResourceError,
    RunInterrupted,
    WorkdirConflictError,
    WorkdirError,
    signal_name,
)
from jax_memat.training.evaluate import evaluate, make_eval_fn
from jax_memat.training.mesh import make_mesh, replicate, shard_batch
from jax_memat.training.metrics import MetricsWriter, plot_learning_curves, read_metrics
from jax_memat.training.resources import check_disk, check_memory, estimate_memory
from jax_memat.training.setup import build_run, load_data, model_from_config
from jax_memat.training.signals import StopSignals
from jax_memat.training.state import TrainState
from jax_memat.training.train_step import make_batch_fn, make_train_step
from jax_memat.training.workdir import (
    CONFIG_FILE,
    LABELS_FILE,
    PER_EXAMPLE_DIR,
    PLOT_FILE,
    REPORT_FILE,
    WorkdirLock,
    WorkdirSurvey,
    describe_run_files,
    save_npz,
    survey_workdir,
    warn,
    write_json,
)

__all__ = ["NonFiniteLossError", "train_and_evaluate", "plan_workdir", "WorkdirPlan"]

# hook(step, state) after every optimizer step (host side, no device sync).
Hook = Callable[[int, TrainState], None]


@dataclasses.dataclass(frozen=True)
class WorkdirPlan:
    """What a workdir holds for a config, decided from everything in it.

    Attributes:
      survey: what was found.
      resuming: the workdir holds this config's run (resume it).
      finished: ...and it has finished every epoch and written its report.
      config_changed: the saved config differs in resumable fields (``epochs``,
        logging) and is to be rewritten.
    """

    survey: WorkdirSurvey
    resuming: bool
    finished: bool
    config_changed: bool


def plan_workdir(config, workdir: str) -> WorkdirPlan:
    """Decides, without writing anything, what running ``config`` in ``workdir`` means.

    Raises:
      WorkdirConflictError: the workdir holds another config's run, a run's
        files without its ``config.json``, or recorded epochs without the
        ``latest`` checkpoint to resume them from.
      CorruptFileError: ``config.json`` or ``final_report.json`` is truncated
        (named), or ``metrics.jsonl`` is damaged before its last line.
      WorkdirError: the path is a file or not writable.
    """
    survey = survey_workdir(workdir)
    if survey.config is None:
        if survey.run_files:
            raise WorkdirConflictError(
                f"The workdir {workdir} holds a run's files ({describe_run_files(survey)}) but "
                f"no {CONFIG_FILE}; refusing to start a new run over them. Use another --workdir, "
                f"or put the run's {CONFIG_FILE} back to resume it. Nothing was written."
            )
        return WorkdirPlan(survey, False, False, False)
    diffs, changed = config_differences(survey.config, config_to_dict(config))
    if diffs:
        raise WorkdirConflictError(
            f"The workdir {workdir} holds a run of a different config; refusing to touch it.\n"
            "  Differences:\n    " + "\n    ".join(diffs) + "\n"
            "  Use a new --workdir, or the saved config to resume."
        )
    steps = survey.checkpoint_steps
    if "latest" not in survey.checkpoint_kinds and (
        survey.last_metrics_epoch > 0 or steps.get("best") or survey.report is not None
    ):
        # The folder is made when a run starts: gone means removed by hand, not a fault
        # (a save cut short leaves it empty, and the run resumes from the newest intact one).
        raise WorkdirConflictError(
            f"The workdir {workdir} has no checkpoints/latest to resume from, but holds "
            f"{describe_run_files(survey)}. Refusing to restart from an earlier checkpoint "
            "over them: put checkpoints/latest back, or use another --workdir. Nothing was "
            "written."
        )
    finished = (
        survey.report is not None
        and survey.report.get("epochs") == config.epochs
        and survey.last_metrics_epoch >= config.epochs
    )
    return WorkdirPlan(survey, True, finished, bool(changed))


def _check_saved_labels(workdir: str, record: dict) -> bool:
    """True when ``labels.npz`` is missing (to be written); raises if it differs or is corrupt."""
    path = os.path.join(workdir, LABELS_FILE)
    if not os.path.exists(path):
        return True
    try:
        with np.load(path) as saved:
            labels = saved["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise CorruptFileError(
            f"{path} is corrupt ({type(err).__name__}: {err}). It holds the run's training labels; "
            "move it away and run again: the labels are recomputed from the config and saved "
            "anew."
        ) from None
    if not np.array_equal(labels, record["labels"]):
        raise WorkdirConflictError(
            f"{path} holds training labels that differ from the ones this config produces "
            "(a different dataset version?); refusing to resume."
        )
    return False


def _eval_attacks(config, steps: int, cw: bool) -> dict[str, AttackSpec]:
    a = config.attack
    specs = {}
    if steps > 0:
        specs["pgd"] = AttackSpec("pgd", a.eps, a.step_size, steps, a.norm, True)
        if cw:
            specs["cw"] = AttackSpec("cw", a.eps, a.step_size, steps, a.norm, True)
    return specs


def _num(n: int, total: int) -> int:
    return total if n < 0 else min(n, total)


def _print(message: str) -> None:
    print(message, flush=True)


def train_and_evaluate(
    config: Any,
    workdir: str,
    *,
    hooks: Sequence[Hook] = (),
    devices: Sequence[jax.Device] | None = None,
    handle_signals: bool = False,
) -> dict:
    """Trains per ``config`` in ``workdir`` (resuming if it holds this run).

    Args:
      config: a config as from ``default_config()`` or ``configs/*.py``.
      workdir: output folder; created if missing.
      hooks: called as ``hook(step, state)`` after every step.
      devices: devices to run on (default: all).
      handle_signals: stop at a safe point on SIGINT/SIGTERM (raising
        ``RunInterrupted`` once the last finished epoch is on disk); the CLI
        sets it, a notebook keeps its own Ctrl-C handling by default.

    Returns:
      The final report: Best and Final natural / PGD-k / CW accuracies on the
      test set and the (noisy-label) training set. A finished run returns its
      saved report and rewrites nothing.

    Raises:
      ConfigError, WorkdirError (and its subclasses), DatasetNotFoundError,
      ResourceError, NonFiniteLossError, RunInterrupted: the expected failures,
      each with a message saying what was kept (see ``jax_memat.training.errors``).

    Example:
      >>> from jax_memat.training import default_config, train_and_evaluate
      >>> config = default_config(); config.dataset.name = "synthetic"
      >>> config.model.name = "small_cnn"; config.epochs = 2
      >>> report = train_and_evaluate(config, "workdirs/run")
    """
    validate_config(config)
    mesh = make_mesh(devices)
    check_device_batch_sizes(config, mesh.devices.size)
    plan = plan_workdir(config, workdir)
    if plan.finished:
        _print(
            f"The run in {workdir} has finished all {config.epochs} epochs; nothing to do (its "
            f"{REPORT_FILE} is unchanged). To train longer, raise --config.epochs."
        )
        return plan.survey.report

    # The memory a run needs, from shapes alone: refused before reading data.
    image_shape, num_classes = dataset_spec(config.dataset.name)
    num_train, num_test = expected_split_sizes(config)
    if config.batch_size > num_train:
        raise ConfigError(
            f"Invalid config:\n  - batch_size={config.batch_size} exceeds the {num_train} "
            "training examples; accepted: at most the number of training examples."
        )
    module = model_from_config(config, num_classes)
    estimate = estimate_memory(
        module,
        image_shape=image_shape,
        num_classes=num_classes,
        num_train=num_train,
        num_test=num_test,
        batch_per_device=config.batch_size // mesh.devices.size,
        te_table=config.te.enabled,
        dtype=config.model.dtype,
    )
    check_memory(estimate, list(mesh.devices.flat))
    check_disk(estimate, workdir)

    train, test, record = load_data(config)
    for dataset in (train, test):
        if dataset.source:
            _print(f"Data: {dataset.source}")
    write_labels = _check_saved_labels(workdir, record) if plan.resuming else True

    guard = StopSignals(handle_signals)
    with WorkdirLock(workdir), guard:
        # Everything is checked: from here on the workdir is written.
        with guard.critical():
            if not plan.resuming or plan.config_changed:
                write_json(os.path.join(workdir, CONFIG_FILE), config_to_dict(config))
            if write_labels:
                save_npz(os.path.join(workdir, LABELS_FILE), **record)
        return _train(config, workdir, train, test, mesh, plan, hooks, guard)


def _train(config, workdir, train, test, mesh, plan, hooks, guard) -> dict:
    setup = build_run(config, train, mesh)
    apply_fn, schedule, spe, state = (
        setup.apply_fn,
        setup.schedule,
        setup.steps_per_epoch,
        setup.state,
    )
    eval_key = setup.keys["eval"]

    ckpts = RunCheckpoints(workdir)
    start_epoch, best = 0, None
    restored = ckpts.restore_newest(state) if plan.resuming else None
    if restored is not None:
        kind, state, meta = restored
        start_epoch = int(meta["epoch"])
        if kind != "latest" and not ckpts.steps("latest"):
            warn(
                f"{ckpts.directory}/latest holds no finished checkpoint (a save was cut short); "
                f"resuming from the {kind} checkpoint of epoch {start_epoch}."
            )
        if start_epoch > config.epochs:
            ckpts.close()
            raise WorkdirConflictError(
                f"epochs={config.epochs}, but the run in {workdir} has already trained "
                f"{start_epoch} epochs; raise --config.epochs (or use another --workdir)."
            )
        best = (meta.get("best") if kind == "best" else None) or _best_record(ckpts)
        _print(f"Resumed {workdir} at epoch {start_epoch} (step {int(state.step)}).")
    if ckpts.latest_step("init") is None:
        with guard.critical():
            _save(ckpts, "init", state, {"epoch": 0})
    writer = MetricsWriter(workdir, resume_epoch=start_epoch, tensorboard=config.tensorboard)

    step_fn = make_train_step(setup.loss_fn, setup.tx, mesh)
    batch_fn = make_batch_fn(
        mesh,
        setup.keys["data"],
        augment=config.dataset.augment,
        crop_padding=config.dataset.crop_padding,
        flip=config.dataset.flip,
    )
    epoch_eval_fn = make_eval_fn(
        apply_fn, _eval_attacks(config, config.eval.pgd_steps, config.eval.cw), mesh
    )
    # The data lives on the devices for the whole run.
    train_images, train_labels = replicate((train.images, train.labels), mesh)
    test_images, test_labels = replicate((test.images, test.labels), mesh)
    splits = {  # what evaluation covers: the first n rows of each set
        "train": (
            train_images,
            train_labels,
            _num(config.eval.num_train_examples, train.num_examples),
        ),
        "test": (test_images, test_labels, _num(config.eval.num_test_examples, test.num_examples)),
    }

    from tqdm.auto import tqdm

    bar = tqdm(
        total=config.epochs * spe,
        initial=start_epoch * spe,
        unit="step",
        desc=f"{config.objective.name} {config.model.name} {config.dataset.name}",
        disable=not config.progress_bar,
        dynamic_ncols=True,
    )
    epoch = saved_epoch = start_epoch
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            t0 = time.perf_counter()
            indices = train_batch_indices(train.num_examples, config.batch_size, config.seed, epoch)
            pending, fetched = [], []
            for s in range(spe):
                batch = batch_fn(
                    train_images, train_labels, shard_batch(indices[s], mesh), state.step
                )
                state, metrics = step_fn(state, batch)
                pending.append(metrics)
                for hook in hooks:
                    hook((epoch - 1) * spe + s + 1, state)
                if len(pending) == config.log_every_steps or s == spe - 1:
                    # Metrics stay on the devices until here: one transfer per interval.
                    chunk = jax.device_get(pending)
                    first_step = (epoch - 1) * spe + s + 2 - len(pending)
                    for j, m in enumerate(chunk):
                        if not m["finite"]:
                            raise NonFiniteLossError(
                                f"Loss or gradient became NaN/Inf at step {first_step + j} "
                                f"(epoch {epoch}); the run stopped. The last good checkpoint "
                                f"(epoch {epoch - 1}) is kept in {ckpts.directory}."
                            )
                    fetched.extend(chunk)
                    pending = []
                    bar.update(len(chunk))
                    elapsed = time.perf_counter() - t0
                    bar.set_postfix(
                        epoch=epoch,
                        loss=f"{chunk[-1]['loss']:.3f}",
                        ex_per_s=f"{len(fetched) * config.batch_size / elapsed:.0f}",
                    )
            train_time = time.perf_counter() - t0
            row = {
                "epoch": epoch,
                "step": epoch * spe,
                "learning_rate": float(schedule(epoch * spe - 1)),
                "train_loss": float(np.mean([m["loss"] for m in fetched])),
                "train_accuracy": float(np.mean([m["accuracy"] for m in fetched])),
                "grad_norm_sq": float(np.mean([m["grad_norm_sq"] for m in fetched])),
                "epoch_time_s": train_time,
                "examples_per_s": spe * config.batch_size / train_time,
            }
            per_split = {}
            if epoch % config.eval.every_epochs == 0 or epoch == config.epochs:
                t1 = time.perf_counter()
                per_split = _evaluate_splits(
                    epoch_eval_fn,
                    state.variables,
                    jax.random.fold_in(eval_key, epoch),
                    splits,
                    batch_size=config.eval.batch_size,
                    mesh=mesh,
                )
                for split, (_, summary) in per_split.items():
                    row.update({f"{split}_{k}": v for k, v in summary.items()})
                row["eval_time_s"] = time.perf_counter() - t1
            # The epoch's files: held from signals so each is written whole.
            with guard.critical():
                if config.eval.save_per_example:
                    for split, (per_example, _) in per_split.items():
                        folder = os.path.join(workdir, PER_EXAMPLE_DIR)
                        os.makedirs(folder, exist_ok=True)
                        save_npz(
                            os.path.join(folder, f"{split}_epoch{epoch:04d}.npz"), **per_example
                        )
                writer.write(row)
                if per_split:
                    score = (row.get("test_pgd_accuracy", 0.0), row["test_natural_accuracy"])
                    if best is None or tuple(score) > tuple(best["score"]):
                        best = {"epoch": epoch, "score": list(score)}
                        _save(ckpts, "best", state, {"epoch": epoch, "metrics": row, "best": best})
                _save(ckpts, "latest", state, {"epoch": epoch, "metrics": row, "best": best})
                saved_epoch = epoch
            bar.write(_summary_line(row))
        bar.close()
        report = _final_report(config, ckpts, state, apply_fn, mesh, eval_key, splits)
        with guard.critical():
            write_json(os.path.join(workdir, REPORT_FILE), report)
            _plot(config, workdir)
    except RunInterrupted as err:
        name = signal_name(err.signum)
        if saved_epoch == config.epochs:
            text = (
                f"Stopped by {name} during the final report; all {saved_epoch} epochs are saved in "
                f"{workdir}. Run the same command to write the report."
            )
        else:
            text = (
                f"Stopped by {name} during epoch {saved_epoch + 1}. The last finished epoch "
                f"({saved_epoch}) is saved in {workdir}; run the same command to resume."
            )
        raise RunInterrupted(err.signum, text) from None
    finally:
        bar.close()
        writer.close()
        ckpts.close()
    return report


def _best_record(ckpts: RunCheckpoints) -> dict | None:
    try:
        return (ckpts.meta("best") or {}).get("best")
    except Exception:  # a damaged best checkpoint: the next evaluated epoch becomes best
        warn(f"The best checkpoint under {ckpts.directory} is unreadable; it will be replaced.")
        return None


def _save(ckpts: RunCheckpoints, kind: str, state, meta: dict) -> None:
    """Saves a checkpoint; a failure names the checkpoint and what is kept."""
    try:
        ckpts.save(kind, state, meta)
    except Exception as err:  # orbax/tensorstore surface I/O errors with many types
        text = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        lowered = text.lower()
        full = any(s in lowered for s in ("no space", "file too large", "quota", "enospc"))
        cls = ResourceError if full else WorkdirError
        epoch = meta["epoch"]
        kept = f"The last finished epoch before it ({epoch - 1}) is kept; " if epoch else ""
        raise cls(
            f"Saving the {kind} checkpoint of epoch {epoch} in {ckpts.directory} failed "
            f"({text[:300]}). {kept}"
            + ("free some disk space and " if full else "")
            + "run the same command to resume."
        ) from None


def _plot(config, workdir: str) -> None:
    plot_learning_curves(
        read_metrics(workdir),
        os.path.join(workdir, PLOT_FILE),
        title=os.path.basename(os.path.abspath(workdir)),
        config=config,
    )


def _summary_line(row: dict) -> str:
    parts = [f"epoch {row['epoch']:4d}", f"loss {row['train_loss']:.4f}"]
    for key, label in (
        ("train_natural_accuracy", "train nat"),
        ("train_pgd_accuracy", "train pgd"),
        ("test_natural_accuracy", "test nat"),
        ("test_pgd_accuracy", "test pgd"),
    ):
        if key in row:
            parts.append(f"{label} {100 * row[key]:.2f}%")
    parts.append(f"{row['examples_per_s']:.0f} ex/s")
    return " | ".join(parts)


def _evaluate_splits(eval_fn, variables, key, splits, *, batch_size, mesh, bar=None) -> dict:
    """``{split: (per_example, summary)}`` for the train and test splits.

    ``bar`` (a tqdm bar), if given, advances by one per evaluated batch.
    """
    out = {}
    for split, (images, labels, n) in splits.items():
        base = bar.n if bar is not None else 0
        out[split] = evaluate(
            eval_fn,
            variables,
            images,
            labels,
            batch_size=batch_size,
            key=jax.random.fold_in(key, split == "test"),
            mesh=mesh,
            num_examples=n,
            progress=None if bar is None else (lambda done, b=base: bar.update(b + done - bar.n)),
        )
    return out


def _final_report(config, ckpts, state, apply_fn, mesh, eval_key, splits) -> dict:
    """Best and Final checkpoints under the final attacks (PGD-20, CW-20).

    When the best checkpoint is the final state (same step) it is evaluated
    once and the report says so (``best_is_final``).
    """
    from tqdm.auto import tqdm

    specs = _eval_attacks(config, config.final_eval.pgd_steps, config.final_eval.cw)
    eval_fn = make_eval_fn(apply_fn, specs, mesh)
    key = jax.random.fold_in(eval_key, 10**6)
    report = {"pgd_steps": config.final_eval.pgd_steps, "epochs": config.epochs}
    checkpoints = [("final", state, config.epochs)]
    best_step = ckpts.latest_step("best")
    same = best_step is None or best_step == int(jax.device_get(state.step))
    if not same:
        best_state, best_meta = ckpts.restore("best", state)
        checkpoints.append(("best", best_state, int(best_meta["epoch"])))
    batches = sum(-(-n // config.eval.batch_size) for _, _, n in splits.values())
    attacks = " and ".join(f"{k.upper()}-{v.steps}" for k, v in specs.items()) or "no attack"
    which = "the final (= best) checkpoint" if same else "the best and final checkpoints"
    bar = tqdm(
        total=batches * len(checkpoints),
        unit="batch",
        desc=f"Final report: {attacks} on {which}",
        disable=not config.progress_bar,
        dynamic_ncols=True,
    )
    try:
        for name, st, epoch in checkpoints:
            entry = {"epoch": epoch}
            per_split = _evaluate_splits(
                eval_fn,
                st.variables,
                key,
                splits,
                batch_size=config.eval.batch_size,
                mesh=mesh,
                bar=bar,
            )
            for split, (_, summary) in per_split.items():
                entry.update({f"{split}_{k}": v for k, v in summary.items()})
            report[name] = entry
    finally:
        bar.close()
    if same:
        report["best"] = dict(report["final"])
    report["best_is_final"] = same
    return report
