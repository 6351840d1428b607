"""The training loop: config in, metrics, checkpoints, plots and a report out.

Order of work, chosen so that bad input never costs a compile or a file:

1. validate the config and the device count;
2. check the workdir (a different config's run stops here, untouched);
3. load the data (a missing dataset stops here);
4. save the resolved config and the (possibly corrupted) labels;
5. build the model, optimizer and step, restore the latest checkpoint if any;
6. train epoch by epoch: per-epoch evaluation, metrics, the latest and best
   checkpoints; a NaN or Inf loss stops the run naming the step, keeping the
   last good checkpoint;
7. evaluate the final and the best checkpoints with PGD-20 (and CW) and write
   ``final_report.json`` and ``learning_curves.png``.

Resume order: the latest checkpoint gives the epoch; the data order depends
only on ``(seed, epoch)`` and every random key on the step, so the resumed run
is the uninterrupted one, bit for bit.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jax_memat.attacks import AttackSpec
from jax_memat.data import train_batch_indices
from jax_memat.training.checkpoints import RunCheckpoints
from jax_memat.training.config import check_workdir_config, save_config, validate_config
from jax_memat.training.evaluate import evaluate, make_eval_fn
from jax_memat.training.mesh import check_batch_size, make_mesh, replicate, shard_batch
from jax_memat.training.metrics import MetricsWriter, plot_learning_curves, read_metrics
from jax_memat.training.setup import LABELS_FILE, build_run, load_data
from jax_memat.training.state import TrainState
from jax_memat.training.train_step import make_batch_fn, make_train_step

REPORT_FILE = "final_report.json"
PLOT_FILE = "learning_curves.png"

# hook(step, state) after every optimizer step (host side, no device sync).
Hook = Callable[[int, TrainState], None]


class NonFiniteLossError(FloatingPointError):
    """The training loss or gradient became NaN or Inf."""


def _check_saved_labels(workdir: str, record: dict) -> None:
    path = os.path.join(workdir, LABELS_FILE)
    if os.path.exists(path):
        with np.load(path) as saved:
            if not np.array_equal(saved["labels"], record["labels"]):
                raise RuntimeError(
                    f"{path} holds training labels that differ from the ones this config "
                    "produces (a different dataset version?); refusing to resume."
                )
    else:
        np.savez_compressed(path, **record)


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


def train_and_evaluate(
    config: Any,
    workdir: str,
    *,
    hooks: Sequence[Hook] = (),
    devices: Sequence[jax.Device] | None = None,
) -> dict:
    """Trains per ``config`` in ``workdir`` (resuming if it holds this run).

    Args:
      config: a config as from ``default_config()`` or ``configs/*.py``.
      workdir: output folder; created if missing.
      hooks: called as ``hook(step, state)`` after every step.
      devices: devices to run on (default: all).

    Returns:
      The final report: Best and Final natural / PGD-k / CW accuracies on the
      test set and the (noisy-label) training set.

    Example:
      >>> from jax_memat.training import default_config, train_and_evaluate
      >>> config = default_config(); config.dataset.name = "synthetic"
      >>> config.model.name = "small_cnn"; config.epochs = 2
      >>> report = train_and_evaluate(config, "workdirs/run")
    """
    validate_config(config)
    mesh = make_mesh(devices)
    check_batch_size(config.batch_size, mesh)
    check_batch_size(config.eval.batch_size, mesh)
    resuming = check_workdir_config(config, workdir)

    train, test, record = load_data(config)
    if config.batch_size > train.num_examples:
        raise ValueError(
            f"batch_size={config.batch_size} exceeds the {train.num_examples} training examples."
        )
    os.makedirs(workdir, exist_ok=True)
    _check_saved_labels(workdir, record)
    save_config(config, workdir)

    setup = build_run(config, train, mesh)
    apply_fn, schedule, spe, state = (
        setup.apply_fn,
        setup.schedule,
        setup.steps_per_epoch,
        setup.state,
    )
    eval_key = setup.keys["eval"]
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

    # Checkpoints and resume.
    ckpts = RunCheckpoints(workdir)
    start_epoch, best = 0, None
    if resuming and ckpts.latest_step("latest") is not None:
        state, meta = ckpts.restore("latest", state)
        start_epoch = int(meta["epoch"])
        best = (ckpts.meta("best") or {}).get("best")
        print(f"Resumed {workdir} at epoch {start_epoch} (step {int(state.step)}).", flush=True)
    elif ckpts.latest_step("init") is None:
        ckpts.save("init", state, {"epoch": 0})
    writer = MetricsWriter(workdir, resume_epoch=start_epoch, tensorboard=config.tensorboard)

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
                for split, (per_example, summary) in per_split.items():
                    row.update({f"{split}_{k}": v for k, v in summary.items()})
                    if config.eval.save_per_example:
                        os.makedirs(os.path.join(workdir, "per_example"), exist_ok=True)
                        np.savez_compressed(
                            os.path.join(workdir, "per_example", f"{split}_epoch{epoch:04d}.npz"),
                            **per_example,
                        )
                row["eval_time_s"] = time.perf_counter() - t1
                score = (row.get("test_pgd_accuracy", 0.0), row["test_natural_accuracy"])
                if best is None or tuple(score) > tuple(best["score"]):
                    best = {"epoch": epoch, "score": list(score)}
                    ckpts.save("best", state, {"epoch": epoch, "metrics": row, "best": best})
            writer.write(row)
            ckpts.save("latest", state, {"epoch": epoch, "metrics": row})
            bar.write(_summary_line(row))
        bar.close()
        report = _final_report(config, workdir, ckpts, state, apply_fn, mesh, eval_key, splits)
    finally:
        bar.close()
        writer.close()
        ckpts.close()
    plot_learning_curves(
        read_metrics(workdir),
        os.path.join(workdir, PLOT_FILE),
        title=os.path.basename(os.path.abspath(workdir)),
        config=config,
    )
    return report


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


def _evaluate_splits(eval_fn, variables, key, splits, *, batch_size, mesh) -> dict:
    """``{split: (per_example, summary)}`` for the train and test splits."""
    return {
        split: evaluate(
            eval_fn,
            variables,
            images,
            labels,
            batch_size=batch_size,
            key=jax.random.fold_in(key, split == "test"),
            mesh=mesh,
            num_examples=n,
        )
        for split, (images, labels, n) in splits.items()
    }


def _final_report(config, workdir, ckpts, state, apply_fn, mesh, eval_key, splits):
    """Best and Final checkpoints under the final attacks (PGD-20, CW-20)."""
    eval_fn = make_eval_fn(
        apply_fn, _eval_attacks(config, config.final_eval.pgd_steps, config.final_eval.cw), mesh
    )
    key = jax.random.fold_in(eval_key, 10**6)
    report = {"pgd_steps": config.final_eval.pgd_steps, "epochs": config.epochs}
    best_state, best_meta = (
        ckpts.restore("best", state)
        if ckpts.latest_step("best") is not None
        else (state, {"epoch": config.epochs})
    )
    for name, st, epoch in (
        ("final", state, config.epochs),
        ("best", best_state, int(best_meta["epoch"])),
    ):
        entry = {"epoch": epoch}
        per_split = _evaluate_splits(
            eval_fn, st.variables, key, splits, batch_size=config.eval.batch_size, mesh=mesh
        )
        for split, (_, summary) in per_split.items():
            entry.update({f"{split}_{k}": v for k, v in summary.items()})
        report[name] = entry
    with open(os.path.join(workdir, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=2)
    return report
