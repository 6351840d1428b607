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
   ``learning_curves.png`` (and ``gradient_stats.png`` with ``grad_stats`` on).

Resume order: the latest checkpoint gives the epoch; the data order depends
only on ``(seed, epoch)`` and every random key on the step, so the resumed run
is the uninterrupted one, bit for bit.

Several processes (``jax_memat.distributed``): every process runs this same
loop on its own devices and reads the workdir (which all of them must see: a
shared or network file system, as orbax's checkpoints need); process 0 alone
takes the lock and writes files (config, labels, metrics, per-example records,
plots, the report, the progress bars), and every check's verdict is shared
(``together``), so that a failure in one process stops all of them with its
message. Checkpoints are written and restored by all processes (each its own
shards), into the shardings of the current mesh, so a run saved by N
processes resumes in M.
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
from jax.sharding import PartitionSpec

from jax_memat.analysis.grad_stats import summarize_epoch
from jax_memat.analysis.plots_gradients import GRAD_PLOT_FILE, plot_gradient_stats
from jax_memat.attacks import AttackSpec
from jax_memat.data import dataset_spec, make_batch_fn, train_batch_indices
from jax_memat.distributed import is_main_process
from jax_memat.evaluation.core import evaluate, make_eval_fn
from jax_memat.experiment.checkpoints import RunCheckpoints
from jax_memat.experiment.config import (
    check_device_batch_sizes,
    config_differences,
    config_to_dict,
    evaluation_attacks,
    expected_split_sizes,
    shard_min_bytes,
    validate_config,
)
from jax_memat.experiment.errors import (
    ConfigError,
    CorruptFileError,
    NonFiniteLossError,
    ResourceError,
    RunInterrupted,
    WorkdirConflictError,
    WorkdirError,
    signal_name,
)
from jax_memat.experiment.metrics import MetricsWriter, plot_learning_curves, read_metrics
from jax_memat.experiment.processes import together
from jax_memat.experiment.resources import check_disk, check_memory, estimate_memory
from jax_memat.experiment.setup import build_run, load_data, model_from_config
from jax_memat.experiment.signals import StopSignals
from jax_memat.experiment.workdir import (
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
from jax_memat.parallel import make_mesh, replicate, shard_batch, state_shardings, to_host
from jax_memat.training.state import TrainState
from jax_memat.training.train_step import make_train_step

__all__ = ["NonFiniteLossError", "train_and_evaluate", "plan_workdir", "WorkdirPlan"]

# hook(step, state, metrics, per_example) after every optimizer step, host side;
# metrics and the per-example outputs (PER_EXAMPLE_OUTPUTS of the train step) are
# device arrays: a hook that does not fetch them costs no device sync.
Hook = Callable[[int, TrainState, dict, dict], None]


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
        with np.load(path) as f:
            saved = {k: f[k] for k in f.files}
        if "labels" not in saved:
            raise KeyError("labels")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise CorruptFileError(
            f"{path} is corrupt ({type(err).__name__}: {err}). It holds the run's training labels; "
            "move it away and run again: the labels are recomputed from the config and saved "
            "anew."
        ) from None
    if not np.array_equal(saved["labels"], record["labels"]):
        raise WorkdirConflictError(
            f"{path} holds training labels that differ from the ones this config produces "
            "(a different dataset version?); refusing to resume."
        )
    # Which rows were left out or get soft targets: a resumed run must train on
    # the same examples with the same targets. (Files saved before an option
    # existed lack its array, and the option was off.)
    for key in ("original_index", "excluded_index", "soft_index"):
        ours, theirs = record.get(key), saved.get(key)
        if (ours is None) != (theirs is None) or (
            ours is not None and not np.array_equal(ours, theirs)
        ):
            raise WorkdirConflictError(
                f"{path} records other {key} rows than this config gives (the list named by "
                "dataset.exclude_examples or objective.soft_label_examples changed?); refusing "
                "to resume."
            )
    return False


def _eval_attacks(config, steps: int, cw: bool) -> dict[str, AttackSpec]:
    return evaluation_attacks(config, steps, ("pgd", "cw") if cw else ("pgd",))


def _num(n: int, total: int) -> int:
    return total if n < 0 else min(n, total)


def _print(message: str) -> None:
    if is_main_process():  # one copy of each message in a multi-process run
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
      hooks: called as ``hook(step, state, metrics, per_example)`` after every
        step (``per_example``: the train step's per-example outputs, on device).
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
      each with a message saying what was kept (see ``jax_memat.experiment.errors``).

    Example:
      >>> from jax_memat.experiment import default_config, train_and_evaluate
      >>> config = default_config(); config.dataset.name = "synthetic"
      >>> config.model.name = "small_cnn"; config.epochs = 2
      >>> report = train_and_evaluate(config, "workdirs/run")
    """
    validate_config(config)
    mesh = make_mesh(devices)
    check_device_batch_sizes(config, mesh.devices.size)
    # Several processes: every check runs in each (reading the shared workdir), and a
    # failure in any of them stops all (together); only process 0 locks and writes.
    plan = together(lambda: plan_workdir(config, workdir))
    if plan.finished:
        _print(
            f"The run in {workdir} has finished all {config.epochs} epochs; nothing to do (its "
            f"{REPORT_FILE} is unchanged). To train longer, raise --config.epochs."
        )
        return plan.survey.report
    together(lambda: _check_resources(config, workdir, mesh))

    def read_data():
        train, test, record = load_data(config)
        for dataset in (train, test):
            if dataset.source:
                _print(f"Data: {dataset.source}")
        write_labels = _check_saved_labels(workdir, record) if plan.resuming else True
        return train, test, record, write_labels

    train, test, record, write_labels = together(read_data)

    # Several processes stop together, at a step all of them reach (StopSignals.check).
    guard = StopSignals(handle_signals, together=jax.process_count() > 1)
    lock = WorkdirLock(workdir)
    together(lock.acquire, main_only=True)
    try:
        with guard:

            def write_start():
                # Everything is checked: from here on the workdir is written.
                with guard.critical():
                    if not plan.resuming or plan.config_changed:
                        write_json(os.path.join(workdir, CONFIG_FILE), config_to_dict(config))
                    if write_labels:
                        save_npz(os.path.join(workdir, LABELS_FILE), **record)

            together(write_start, main_only=True)
            return _train(
                config, workdir, train, test, mesh, plan, hooks, guard, record.get("soft_index")
            )
    finally:
        lock.release()


def _warn_once(message: str) -> None:
    """A warning from process 0 only (the others would repeat it)."""
    if is_main_process():
        warn(message)


def _check_resources(config, workdir: str, mesh) -> None:
    """The memory a run needs, from shapes alone (refused before reading data), and the disk."""
    image_shape, num_classes = dataset_spec(config.dataset.name)
    num_train, num_test = expected_split_sizes(config)
    if config.batch_size > num_train:
        raise ConfigError(
            f"Invalid config:\n  - batch_size={config.batch_size} exceeds the {num_train} "
            "training examples; accepted: at most the number of training examples."
        )
    module = model_from_config(config, num_classes)
    n = mesh.devices.size
    min_bytes = shard_min_bytes(config)
    table_bytes = 4 * num_train * num_classes
    large = config.te.enabled and min_bytes is not None and table_bytes >= min_bytes
    # Whether the table is split is the layout rule's answer, asked on its shape alone.
    table = jax.ShapeDtypeStruct((num_train, num_classes), np.float32)
    split = large and state_shardings(table, mesh, min_bytes).spec != PartitionSpec()
    if large and not split:
        _warn_once(
            f"The TE table ({num_train} x {num_classes}) reaches parallel.shard_table_mib but "
            f"its {num_train} rows do not split evenly over the {n} devices: every device holds "
            f"all of it. Use a dataset.num_train_examples that is a multiple of {n} to split it."
        )
    estimate = estimate_memory(
        module,
        image_shape=image_shape,
        num_classes=num_classes,
        num_train=num_train,
        num_test=num_test,
        batch_per_device=config.batch_size // n,
        te_table=config.te.enabled,
        dtype=config.model.dtype,
        table_shards=n if split else 1,
    )
    # Each process checks the devices it drives (their memory is its host's, or its own).
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    check_memory(estimate, local)
    check_disk(estimate, workdir)


@dataclasses.dataclass
class BestTracker:
    """The best checkpoint so far: highest PGD test accuracy, ties broken by natural accuracy.

    Attributes:
      record: ``{"epoch": e, "score": [pgd, natural]}`` of the best evaluated
        epoch, or None before the first evaluation.
    """

    record: dict | None = None

    def update(self, epoch: int, row: dict) -> bool:
        """Takes an evaluated epoch's row; True when it is the new best."""
        score = [row.get("test_pgd_accuracy", 0.0), row["test_natural_accuracy"]]
        if self.record is None or tuple(score) > tuple(self.record["score"]):
            self.record = {"epoch": epoch, "score": score}
            return True
        return False


class TrainRecord:
    """Per-example outputs of the train step over one epoch, indexed by example.

    Rows of examples not trained on in the epoch (the dropped remainder) hold
    NaN (``loss``, ``margin``) and -1 (``correct``, ``label``).
    """

    def __init__(self, num_examples: int):
        self.num_examples = num_examples
        self.reset()

    def reset(self) -> None:
        n = self.num_examples
        self.arrays = {
            "loss": np.full(n, np.nan, np.float32),
            "margin": np.full(n, np.nan, np.float32),
            "correct": np.full(n, -1, np.int8),
            "label": np.full(n, -1, np.int32),
        }

    def add(self, outputs: dict) -> None:
        index = np.asarray(outputs["index"])
        for key, array in self.arrays.items():
            array[index] = np.asarray(outputs[key]).astype(array.dtype)


class _NoWriter:
    """The metrics writer of processes other than 0: writes nothing."""

    def write(self, row: dict) -> None:
        del row

    def close(self) -> None:
        pass


@dataclasses.dataclass
class _Context:
    """What every epoch of a run uses."""

    config: Any
    workdir: str
    mesh: Any
    setup: Any
    step_fn: Any
    batch_fn: Any
    eval_fn: Any
    train_data: tuple
    splits: dict
    ckpts: RunCheckpoints
    writer: MetricsWriter
    guard: StopSignals
    hooks: Sequence[Hook]
    record: TrainRecord | None
    bar: Any
    saved_epoch: int = 0  # the last epoch whose checkpoint is on disk


def _train(config, workdir, train, test, mesh, plan, hooks, guard, soft_rows) -> dict:
    setup = build_run(config, train, mesh, soft_rows=soft_rows)
    state, spe = setup.state, setup.steps_per_epoch

    ckpts = RunCheckpoints(workdir)
    start_epoch, best = 0, BestTracker()
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
        best.record = meta.get("best") or _best_record(ckpts)
        step = int(jax.device_get(state.step))
        _print(f"Resumed {workdir} at epoch {start_epoch} (step {step}).")
    if ckpts.latest_step("init") is None:
        with guard.critical():
            _save(ckpts, "init", state, {"epoch": 0})

    record_train = bool(config.get("record", {}).get("train_per_example", False))
    # The data lives on the devices for the whole run.
    train_data = replicate((train.images, train.labels), mesh)
    test_images, test_labels = replicate((test.images, test.labels), mesh)
    splits = {  # what evaluation covers: the first n rows of each set
        "train": (*train_data, _num(config.eval.num_train_examples, train.num_examples)),
        "test": (test_images, test_labels, _num(config.eval.num_test_examples, test.num_examples)),
    }
    from tqdm.auto import tqdm

    main = is_main_process()
    ctx = _Context(
        config=config,
        workdir=workdir,
        mesh=mesh,
        setup=setup,
        step_fn=make_train_step(
            setup.objective,
            setup.tx,
            mesh,
            steps_per_epoch=spe,
            per_example=record_train or bool(hooks),
            probe=setup.grad_stats,
            state_sharding=jax.tree.map(lambda x: x.sharding, state),
        ),
        batch_fn=make_batch_fn(
            mesh,
            setup.keys["data"],
            augment=config.dataset.augment,
            crop_padding=config.dataset.crop_padding,
            flip=config.dataset.flip,
        ),
        eval_fn=make_eval_fn(
            setup.apply_fn, _eval_attacks(config, config.eval.pgd_steps, config.eval.cw), mesh
        ),
        train_data=train_data,
        splits=splits,
        ckpts=ckpts,
        # Process 0 writes the files; the others' writer writes nothing.
        writer=MetricsWriter(workdir, resume_epoch=start_epoch, tensorboard=config.tensorboard)
        if main
        else _NoWriter(),
        guard=guard,
        hooks=hooks,
        record=TrainRecord(train.num_examples) if record_train else None,
        bar=tqdm(
            total=config.epochs * spe,
            initial=start_epoch * spe,
            unit="step",
            desc=f"{config.objective.name} {config.model.name} {config.dataset.name}",
            disable=not config.progress_bar or not main,
            dynamic_ncols=True,
        ),
    )
    ctx.saved_epoch = start_epoch
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            state, row = _train_epoch(ctx, state, epoch)
            per_split = {}
            if epoch % config.eval.every_epochs == 0 or epoch == config.epochs:
                per_split = _evaluate_epoch(ctx, state, epoch, row)
            _write_epoch(ctx, state, epoch, row, per_split, best)
            if main:
                ctx.bar.write(_summary_line(row))
        ctx.bar.close()
        ctx.guard.check()
        report = _final_report(
            config, ckpts, state, setup.apply_fn, mesh, setup.keys["eval"], splits
        )
        if main:
            with guard.critical():
                write_json(os.path.join(workdir, REPORT_FILE), report)
                _plot(config, workdir)
    except RunInterrupted as err:
        raise _interrupted(err, ctx.saved_epoch, config.epochs, workdir) from None
    finally:
        ctx.bar.close()
        ctx.writer.close()
        ckpts.close()
    return report


def _train_epoch(ctx: _Context, state: TrainState, epoch: int) -> tuple[TrainState, dict]:
    """Runs one epoch of steps; returns the new state and the epoch's training row."""
    config, spe = ctx.config, ctx.setup.steps_per_epoch
    t0 = time.perf_counter()
    indices = train_batch_indices(ctx.train_data[0].shape[0], config.batch_size, config.seed, epoch)
    pending, fetched = [], []
    if ctx.record is not None:
        ctx.record.reset()
    for s in range(spe):
        batch = ctx.batch_fn(*ctx.train_data, shard_batch(indices[s], ctx.mesh), state.step)
        grad_stats = ctx.setup.grad_stats
        # The host knows the step number: the sampled and the other steps are two
        # programs, with no device-side branch (docs/gradients.md).
        sample = () if grad_stats is None else (grad_stats.samples((epoch - 1) * spe + s),)
        state, metrics, *outputs = ctx.step_fn(state, batch, *sample)
        per_example = outputs[0] if outputs else None
        pending.append((metrics, per_example if ctx.record is not None else None))
        for hook in ctx.hooks:
            hook((epoch - 1) * spe + s + 1, state, metrics, per_example)
        if len(pending) == config.log_every_steps or s == spe - 1:
            # Outputs stay on the devices until here: one transfer per interval (the
            # per-example outputs, split over the processes' devices, gathered whole).
            chunk = to_host(pending)
            first_step = (epoch - 1) * spe + s + 2 - len(pending)
            for j, (m, _) in enumerate(chunk):
                if not m["finite"]:
                    raise NonFiniteLossError(
                        f"Loss or gradient became NaN/Inf at step {first_step + j} (epoch "
                        f"{epoch}); the run stopped. The last good checkpoint (epoch "
                        f"{epoch - 1}) is kept in {ctx.ckpts.directory}."
                    )
                if ctx.record is not None:
                    ctx.record.add(chunk[j][1])
            fetched.extend(m for m, _ in chunk)
            pending = []
            ctx.guard.check()  # several processes: a signal to any stops all, here
            ctx.bar.update(len(chunk))
            ctx.bar.set_postfix(
                epoch=epoch,
                loss=f"{chunk[-1][0]['loss']:.3f}",
                ex_per_s=f"{len(fetched) * config.batch_size / (time.perf_counter() - t0):.0f}",
            )
    train_time = time.perf_counter() - t0
    row = {
        "epoch": epoch,
        "step": epoch * spe,
        "learning_rate": float(ctx.setup.schedule(epoch * spe - 1)),
        "train_loss": float(np.mean([m["loss"] for m in fetched])),
        "train_accuracy": float(np.mean([m["accuracy"] for m in fetched])),
        "grad_norm_sq": float(np.mean([m["grad_norm_sq"] for m in fetched])),
        "epoch_time_s": train_time,
        "examples_per_s": spe * config.batch_size / train_time,
    }
    # Gradient statistics (grad_stats on): sampled ones averaged over the sampled steps.
    row.update(summarize_epoch(fetched))
    return state, row


def _evaluate_epoch(ctx: _Context, state: TrainState, epoch: int, row: dict) -> dict:
    """Evaluates both splits after an epoch, adding their summaries to ``row``."""
    t1 = time.perf_counter()
    per_split = _evaluate_splits(
        ctx.eval_fn,
        state.variables,
        jax.random.fold_in(ctx.setup.keys["eval"], epoch),
        ctx.splits,
        batch_size=ctx.config.eval.batch_size,
        mesh=ctx.mesh,
    )
    for split, (_, summary) in per_split.items():
        row.update({f"{split}_{k}": v for k, v in summary.items()})
    row["eval_time_s"] = time.perf_counter() - t1
    return per_split


def _write_epoch(ctx, state, epoch, row, per_split, best: BestTracker) -> None:
    """The epoch's files and checkpoints, held from signals so each is written whole."""
    folder = os.path.join(ctx.workdir, PER_EXAMPLE_DIR)
    main = is_main_process()
    with ctx.guard.critical():
        if main and ctx.config.eval.save_per_example and per_split:
            os.makedirs(folder, exist_ok=True)
            for split, (per_example, _) in per_split.items():
                save_npz(os.path.join(folder, f"{split}_epoch{epoch:04d}.npz"), **per_example)
        if main and ctx.record is not None:
            os.makedirs(folder, exist_ok=True)
            save_npz(
                os.path.join(folder, f"train_steps_epoch{epoch:04d}.npz"),
                index=np.arange(ctx.record.num_examples),
                **ctx.record.arrays,
            )
        ctx.writer.write(row)
        if per_split and best.update(epoch, row):
            _save(ctx.ckpts, "best", state, {"epoch": epoch, "metrics": row, "best": best.record})
        _save(ctx.ckpts, "latest", state, {"epoch": epoch, "metrics": row, "best": best.record})
        # Inside the section: a signal held during it is raised at its end, after this.
        ctx.saved_epoch = epoch


def _interrupted(err: RunInterrupted, saved_epoch: int, epochs: int, workdir: str):
    name = signal_name(err.signum)
    if saved_epoch == epochs:
        text = (
            f"Stopped by {name} during the final report; all {saved_epoch} epochs are saved in "
            f"{workdir}. Run the same command to write the report."
        )
    else:
        text = (
            f"Stopped by {name} during epoch {saved_epoch + 1}. The last finished epoch "
            f"({saved_epoch}) is saved in {workdir}; run the same command to resume."
        )
    return RunInterrupted(err.signum, text)


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
    rows = read_metrics(workdir)
    title = os.path.basename(os.path.abspath(workdir))
    plot_learning_curves(rows, os.path.join(workdir, PLOT_FILE), title=title, config=config)
    if config.get("grad_stats", {}).get("every_steps", 0):
        plot_gradient_stats(rows, os.path.join(workdir, GRAD_PLOT_FILE), title=title)


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
        disable=not config.progress_bar or not is_main_process(),
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
