"""Building a run's pieces from its config, and loading a finished run.

``build_run`` is the one place that turns a config into a model, optimizer,
objective and initial state; the training loop and ``load_run`` (used by the
evaluation and analysis entry points) both call it, so a checkpoint is always
restored into exactly the structure it was saved from.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh

from jax_memat.analysis.grad_stats import GradStats
from jax_memat.attacks import AttackSpec
from jax_memat.data import Dataset, apply_corruptions, load_dataset, steps_per_epoch
from jax_memat.experiment.checkpoints import RunCheckpoints
from jax_memat.experiment.config import (
    excluded_examples,
    shard_min_bytes,
    soft_label_examples,
    training_attack,
    validate_config,
)
from jax_memat.experiment.errors import ConfigError
from jax_memat.experiment.workdir import CONFIG_FILE, LABELS_FILE, read_json
from jax_memat.models import get_model, make_apply_fn
from jax_memat.objectives import (
    Objective,
    make_objective,
    with_soft_targets,
    with_temporal_ensembling,
)
from jax_memat.parallel import make_mesh
from jax_memat.training.optim import make_optimizer, make_schedule
from jax_memat.training.state import TrainState, create_train_state


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """What a config builds (before any step runs).

    Attributes:
      module: the Flax model.
      apply_fn: ``apply(variables, images, train) -> (logits, model_state)``.
      schedule: learning rate per step.
      tx: the optimizer.
      attack: the training attack.
      objective: the per-example objective (with TE when enabled).
      state: the initial (replicated) train state.
      steps_per_epoch: optimizer steps per epoch.
      keys: ``{"data": ..., "eval": ...}`` root keys derived from the seed.
      grad_stats: the train step's gradient-statistics probe, or None when
        ``grad_stats.every_steps`` is 0 (then ``tx`` holds no gradient recorder).
    """

    module: nn.Module
    apply_fn: Any
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    attack: AttackSpec
    objective: Objective
    state: TrainState
    steps_per_epoch: int
    keys: dict
    grad_stats: GradStats | None = None


def grad_stats_from_config(config) -> GradStats | None:
    """The ``GradStats`` probe a validated config asks for (None when off)."""
    g = config.get("grad_stats", {})  # absent from configs saved before the option
    every = g.get("every_steps", 0)
    if not every:
        return None
    return GradStats(
        every_steps=every,
        microbatch=g.get("microbatch", 0) or None,
        examples=g.get("examples", 0) or None,
    )


def load_data(
    config, *, excluded: np.ndarray | None = None, soft: np.ndarray | None = None
) -> tuple[Dataset, Dataset, dict]:
    """The training set (with the config's corruptions), the test set, and the labels record.

    With ``dataset.exclude_examples`` set, the listed rows are left out of the
    training set after the corruptions are applied, so every kept example has
    the label it had in the run the list came from. The kept rows are
    renumbered ``0 .. N - k - 1`` (row ``i`` is index ``i``, as everywhere in a
    run: batches, the TE table, the per-example records), and the record says
    which example each row is.

    Args:
      config: a validated config.
      excluded: the rows to leave out, overriding the config's file (``load_run``
        passes the ones the run saved in ``labels.npz``).
      soft: the loaded rows that get soft targets, overriding the config's
        ``objective.soft_label_examples`` file (``load_run`` passes the saved ones).

    Returns:
      ``(train, test, record)``. ``record`` holds ``labels``, ``clean_labels``
      and ``changed`` per training row and, when rows were left out,
      ``original_index`` (int [N - k], each row's index in the full training
      set) and ``excluded_index`` (int [k], sorted); with
      ``objective.soft_label_examples`` set, ``soft_index`` (int, sorted: the
      rows of this training set that get soft targets).

    Raises:
      ConfigError: the exclusion file is missing or invalid.

    Example:
      >>> train, test, record = load_data(config)
      >>> record["original_index"][:3]  # with rows 1 and 2 left out
      array([0, 3, 4])
    """
    d = config.dataset
    kwargs = {"data_dir": d.data_dir or None, "source": d.source, "seed": config.seed}
    n_train = None if d.num_train_examples < 0 else d.num_train_examples
    n_test = None if d.num_test_examples < 0 else d.num_test_examples
    train = load_dataset(d.name, "train", num_examples=n_train, **kwargs)
    test = load_dataset(d.name, "test", num_examples=n_test, **kwargs)
    train, record = apply_corruptions(
        train,
        label_noise=d.label_noise,
        image_corruption=d.image_corruption,
        seed=d.corruption_seed,
    )
    if excluded is None:
        excluded = excluded_examples(config)
    if excluded is not None:
        train, record = _leave_out(train, record, np.asarray(excluded, np.int64))
    if soft is None:
        soft = _soft_rows(config, record)
    if soft is not None:
        record["soft_index"] = np.asarray(soft, np.int64)
    return train, test, record


def _soft_rows(config, record: dict) -> np.ndarray | None:
    """The loaded rows ``objective.soft_label_examples`` lists, or None when it is ``""``.

    The list names rows of the full training set (as every hard-example list);
    with rows left out they are renumbered through ``record["original_index"]``.
    """
    listed = soft_label_examples(config)
    if listed is None:
        return None
    original = record.get("original_index")
    if original is None:
        return listed
    position = np.searchsorted(original, listed)
    inside = np.minimum(position, original.size - 1)
    found = (position < original.size) & (original[inside] == listed)
    if not found.all():
        both = listed[~found]
        raise ConfigError(
            "Invalid config:\n  - objective.soft_label_examples: "
            f"{both.size} of its rows are also left out by dataset.exclude_examples (e.g. "
            f"{both[:5].tolist()}); accepted: lists that do not overlap."
        )
    return position.astype(np.int64)


def _leave_out(train: Dataset, record: dict, excluded: np.ndarray) -> tuple[Dataset, dict]:
    n = train.num_examples
    if excluded.size and (excluded.min() < 0 or excluded.max() >= n):
        raise ConfigError(
            f"Invalid config:\n  - dataset.exclude_examples: rows must lie in [0, {n}); got "
            f"{int(excluded.min())} .. {int(excluded.max())}."
        )
    keep = np.setdiff1d(np.arange(n), excluded)
    source = f"{train.source}; {n - keep.size} examples left out" if train.source else ""
    train = dataclasses.replace(
        train, images=train.images[keep], labels=train.labels[keep], source=source
    )
    record = {k: v[keep] for k, v in record.items()}
    record["original_index"] = keep
    record["excluded_index"] = np.setdiff1d(np.arange(n), keep)
    return train, record


def model_from_config(config, num_classes: int) -> nn.Module:
    """The Flax model a validated config names (nothing is initialized)."""
    return get_model(
        config.model.name,
        num_classes,
        depth=config.model.depth,
        width=config.model.width,
        dtype=config.model.dtype,
        cnn_width=config.model.cnn_width,
        # Configs saved before these options existed ran with the defaults.
        bn_unbiased_var=config.model.get("bn_unbiased_var", False),
    )


def build_run(
    config, train: Dataset, mesh: Mesh, *, soft_rows: np.ndarray | None = None
) -> RunSetup:
    """Builds model, optimizer, objective and initial state from a validated config.

    Args:
      config: a validated config.
      train: the training set the run uses (``load_data``).
      mesh: the device mesh.
      soft_rows: the training rows that get soft targets (``load_data``'s
        ``record["soft_index"]``); needed when ``objective.soft_label_examples``
        is set.
    """
    module = model_from_config(config, train.num_classes)
    apply_fn = make_apply_fn(module)
    spe = steps_per_epoch(train.num_examples, config.batch_size)
    schedule = make_schedule(
        config.schedule.name,
        config.optimizer.learning_rate,
        steps_per_epoch=spe,
        epochs=config.epochs,
        milestones=tuple(config.schedule.milestones),
        step_every=config.schedule.step_every,
        gamma=config.schedule.gamma,
    )
    tx = make_optimizer(
        config.optimizer.name,
        schedule,
        momentum=config.optimizer.momentum,
        weight_decay=config.optimizer.weight_decay,
        nesterov=config.optimizer.nesterov,
    )
    grad_stats = grad_stats_from_config(config)
    if grad_stats is not None:
        # The recorder keeps the last gradient in the optimizer state (and so in
        # checkpoints); the updates are unchanged.
        tx = grad_stats.optimizer(tx)
    attack = training_attack(config)
    objective = make_objective(config.objective.name, apply_fn, attack, beta=config.objective.beta)
    if config.objective.get("soft_label_examples", ""):
        if soft_rows is None:
            raise ValueError(
                "objective.soft_label_examples is set: pass build_run(..., soft_rows="
                'record["soft_index"]) from load_data.'
            )
        # TRADES' attack is label-free: the soft target changes its cross-entropy only.
        objective = with_soft_targets(
            objective,
            soft_rows,
            smoothing=config.objective.soft_label_smoothing,
            regularize_attack=config.objective.name != "trades",
        )
    if config.te.enabled:
        objective = with_temporal_ensembling(
            objective,
            apply_fn,
            momentum=config.te.momentum,
            weight=config.te.weight,
            ramp_start=config.te.ramp_start,
            ramp_end=config.te.ramp_end,
            regularize_attack=config.te.regularize_attack,
            output=config.te.output,
        )
    # Root keys: one per consumer, derived from the seed (never carried).
    root = jax.random.key(config.seed)
    init_key, data_key, eval_key = (jax.random.fold_in(root, i) for i in range(3))
    state = create_train_state(
        module,
        init_key,
        train.image_shape,
        tx,
        mesh,
        objective_state=objective.init(train.num_examples, train.num_classes),
        shard_min_bytes=shard_min_bytes(config),
    )
    return RunSetup(
        module=module,
        apply_fn=apply_fn,
        schedule=schedule,
        tx=tx,
        attack=attack,
        objective=objective,
        state=state,
        steps_per_epoch=spe,
        keys={"data": data_key, "eval": eval_key},
        grad_stats=grad_stats,
    )


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A finished (or interrupted) run restored from its workdir.

    Attributes:
      config: the run's ``ConfigDict``.
      setup: its ``RunSetup`` (model, apply function, optimizer, ...).
      state: the restored ``TrainState``.
      meta: the checkpoint's JSON metadata (``epoch``, metrics).
      train: the training set with the labels the run trained on.
      test: the test set.
      mesh: the device mesh the state lives on.
    """

    config: Any
    setup: RunSetup
    state: TrainState
    meta: dict
    train: Dataset
    test: Dataset
    mesh: Mesh


def resolve_checkpoint(ckpts: RunCheckpoints, workdir: str, checkpoint: str | int) -> str:
    """The kind (``"init"``, ``"latest"`` or ``"best"``) of a kept checkpoint named by kind or step.

    Raises:
      FileNotFoundError: the workdir keeps no such checkpoint (the message
        lists the kept steps).
    """
    kept = {k: ckpts.latest_step(k) for k in ("init", "latest", "best")}
    if isinstance(checkpoint, int):
        matches = [k for k, step in kept.items() if step == checkpoint]
        if not matches:
            raise FileNotFoundError(
                f"{workdir} keeps no checkpoint at step {checkpoint}; kept steps: {kept}."
            )
        return matches[0]
    if kept[checkpoint] is None:
        raise FileNotFoundError(f"{workdir} has no {checkpoint!r} checkpoint; kept steps: {kept}.")
    return checkpoint


def load_run(
    workdir: str,
    checkpoint: str | int = "best",
    *,
    devices: Sequence[jax.Device] | None = None,
) -> LoadedRun:
    """Restores a run for evaluation or analysis.

    Args:
      workdir: a training workdir.
      checkpoint: ``"best"``, ``"latest"`` (alias ``"final"``), ``"init"``, or
        the step number of one of them.
      devices: devices for the mesh (default: all).

    Returns:
      A ``LoadedRun``.

    Example:
      >>> run = load_run("workdirs/quickstart", "best")
      >>> logits, _ = run.setup.apply_fn(run.state.variables, images, False)
    """
    import ml_collections

    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} holds no run ({CONFIG_FILE} is missing).")
    kind = {"final": "latest"}.get(checkpoint, checkpoint)
    if not isinstance(kind, int) and kind not in ("best", "latest", "init"):
        raise ValueError(
            f"checkpoint={checkpoint!r} is not accepted; use best, final, latest, init or a "
            "step number."
        )
    config = ml_collections.ConfigDict(read_json(path))
    # The rows a run left out are in its labels.npz: its exclusion file is not needed.
    validate_config(config, check_files=False)
    ckpts = RunCheckpoints(workdir)
    try:
        # The checkpoint is found before anything is built or compiled.
        kind = resolve_checkpoint(ckpts, workdir, kind)
        mesh = make_mesh(devices)
        labels_path = os.path.join(workdir, LABELS_FILE)
        saved = {}
        if os.path.exists(labels_path):
            with np.load(labels_path) as f:
                saved = {k: f[k] for k in f.files}
        train, test, record = load_data(
            config, excluded=saved.get("excluded_index"), soft=saved.get("soft_index")
        )
        if "labels" in saved:
            train = dataclasses.replace(train, labels=saved["labels"].astype(np.int32))
        setup = build_run(config, train, mesh, soft_rows=record.get("soft_index"))
        state, meta = ckpts.restore(kind, setup.state)
    finally:
        ckpts.close()
    return LoadedRun(config, setup, state, meta, train, test, mesh)
