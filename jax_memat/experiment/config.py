"""The run configuration: defaults, validation, and workdir compatibility.

A config is an ``ml_collections.ConfigDict`` of primitives and strings;
models, objectives, attacks and schedules are chosen by registry name. It is
validated as a whole before any data is read or anything compiles, and every
problem is reported at once.
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from jax_memat.analysis.memorization import read_hard_examples
from jax_memat.attacks import AttackSpec, threat_model_problems
from jax_memat.data import (
    DATASET_NAMES,
    SOURCES,
    SPLIT_SIZES,
    dataset_spec,
    label_noise_problem,
)
from jax_memat.data.corruptions import IMAGE_CORRUPTIONS
from jax_memat.experiment.errors import ConfigError, WorkdirConflictError
from jax_memat.experiment.workdir import CONFIG_FILE, read_json, write_json
from jax_memat.models import MODEL_NAMES
from jax_memat.objectives import (
    OBJECTIVE_NAMES,
    REGULARIZER_OUTPUTS,
    beta_problem,
    smoothing_problem,
    te_problems,
)
from jax_memat.training.optim import OPTIMIZER_NAMES, SCHEDULE_NAMES

if TYPE_CHECKING:
    import ml_collections

# Attacks a training objective can craft its examples with (evaluation has more).
TRAINING_ATTACKS = ("pgd", "fgsm")
# Fields that may change between a run and its resumption (they do not affect
# the numbers): logging cadence and display, and where large tables live.
RESUMABLE_FIELDS = (
    "epochs",
    "log_every_steps",
    "progress_bar",
    "tensorboard",
    "parallel.shard_table_mib",
)
# Tables from this size (MiB) are split over the devices by default (docs/scaling.md).
DEFAULT_SHARD_TABLE_MIB = 64.0


# Seeds feed numpy's and JAX's generators; both take unsigned 32-bit values.
MAX_SEED = 2**32 - 1


def default_config() -> ml_collections.ConfigDict:
    """The base config: PGD-AT on CIFAR-10 with a PreActResNet-18, the TE study's settings.

    Every experiment family in ``configs/`` overrides this.

    Example:
      >>> config = default_config()
      >>> config.dataset.name = "fashion_mnist"
    """
    import ml_collections  # imported here so the library runs without it

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.epochs = 200
    c.batch_size = 128  # global, over all devices

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "cifar10"
    c.dataset.source = "auto"  # auto (files, then tfds) | files | tfds | idx (= files)
    c.dataset.data_dir = ""  # "" = default locations
    c.dataset.num_train_examples = -1  # -1 = all
    c.dataset.num_test_examples = -1
    c.dataset.label_noise = 0.0  # symmetric noise rate r in [0, 1]
    c.dataset.image_corruption = "none"
    c.dataset.corruption_seed = 0
    c.dataset.augment = True  # random crop + horizontal flip
    c.dataset.crop_padding = 4
    c.dataset.flip = True
    # A hard-example list file (jax_memat.analysis.write_hard_examples): its rows of
    # the training set are left out of the run (the retraining experiment of the
    # memorization study); "" = none. See docs/memorization.md.
    c.dataset.exclude_examples = ""

    c.model = ml_collections.ConfigDict()
    c.model.name = "preact_resnet18"
    c.model.depth = 28  # wide_resnet only
    c.model.width = 10  # wide_resnet only
    c.model.cnn_width = 1  # small_cnn only: channel multiplier
    c.model.dtype = "float32"  # compute dtype; bfloat16 = mixed precision
    # BatchNorm running variance: False = Flax's update (biased batch variance),
    # True = PyTorch's (unbiased, times n / (n - 1)), as the authors' code.
    c.model.bn_unbiased_var = False

    c.objective = ml_collections.ConfigDict()
    c.objective.name = "pgd_at"
    c.objective.beta = 6.0  # TRADES
    # A hard-example list file: its training rows get the soft target
    # (1 - s) * onehot(y) + s / K instead of their label (the hard-example
    # experiment's other arm; docs/memorization.md); "" = none.
    c.objective.soft_label_examples = ""
    c.objective.soft_label_smoothing = 1.0  # s in (0, 1]; 1 = uniform targets

    c.te = ml_collections.ConfigDict()  # temporal ensembling (the authors' settings)
    c.te.enabled = False
    c.te.momentum = 0.9
    c.te.weight = 300.0
    c.te.ramp_start = 90  # 1-based epoch: table updates and the ramp start here
    c.te.ramp_end = 150  # the weight reaches its full value here
    c.te.output = "natural"  # TRADES: R on the natural (authors) or adversarial output
    c.te.regularize_attack = True  # R also in the attack objective

    c.attack = ml_collections.ConfigDict()  # the training attack
    c.attack.name = "pgd"  # pgd | fgsm (one step; steps must be 1); TRADES uses its KL attack
    c.attack.norm = "linf"
    c.attack.eps = 8 / 255
    c.attack.step_size = 2 / 255
    c.attack.steps = 10
    c.attack.random_start = True
    # False: leave the random start unclipped to [0, 1], as the authors' TRADES,
    # TRADES+TE and PGD-AT+TE attacks (their plain PGD-AT attack clips it).
    c.attack.clip_start = True

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.optimizer.weight_decay = 5e-4

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "multistep"
    c.schedule.milestones = (100, 150)  # epochs, for multistep
    c.schedule.step_every = 100  # epochs, for step
    c.schedule.gamma = 0.1

    c.eval = ml_collections.ConfigDict()  # per-epoch evaluation
    c.eval.every_epochs = 1
    c.eval.batch_size = 256
    c.eval.pgd_steps = 10  # PGD-k in the per-epoch logs (step size = attack.step_size)
    c.eval.cw = False  # also PGD-k on the CW margin loss every epoch
    c.eval.num_train_examples = -1  # training examples evaluated (-1 = all)
    c.eval.num_test_examples = -1
    c.eval.save_per_example = True

    c.record = ml_collections.ConfigDict()  # per-example records
    # The train step's per-example loss, margin and correctness on every training
    # example, one file per epoch (per_example/train_steps_epochNNNN.npz).
    c.record.train_per_example = False

    c.grad_stats = ml_collections.ConfigDict()  # gradient statistics (jax_memat.analysis)
    # Every step: the gradient norm and the cosine of consecutive gradients; every n
    # steps: per-example gradient norms, noise scale and smoothness (docs/gradients.md).
    # 0 = off (the optimizer state then holds no copy of the last gradient).
    c.grad_stats.every_steps = 0
    # Examples whose gradients are computed at once on a sampled step (0 = the whole
    # batch): bounds the memory of the per-example pass, not its result.
    c.grad_stats.microbatch = 0
    # Per-example statistics from the batch's first n examples only (0 = all): n / batch
    # of the cost of the per-example pass (a sampled step costs about n backward passes).
    c.grad_stats.examples = 0

    c.final_eval = ml_collections.ConfigDict()  # the final report, best and final checkpoints
    c.final_eval.pgd_steps = 20
    c.final_eval.cw = True  # PGD on the CW margin loss, same steps

    c.parallel = ml_collections.ConfigDict()  # how arrays are laid out on the devices
    # Per-example tables (the TE soft labels, N x K float32) of at least this many MiB
    # are split over all devices along the examples instead of held whole by every
    # device; -1 = never. Layout only: the numbers are the same (docs/scaling.md).
    c.parallel.shard_table_mib = DEFAULT_SHARD_TABLE_MIB

    c.log_every_steps = 50
    c.progress_bar = True
    c.tensorboard = True
    return c


MODEL_ALIASES = {"preact18": "preact_resnet18"}


def set_model(config: ml_collections.ConfigDict, model: str) -> None:
    """Sets ``config.model`` from a registry name, an alias or ``wrnD_W``.

    ``wrn34_10`` is a WideResNet of depth 34 and width 10; ``preact18`` is
    ``preact_resnet18``. Used by the experiment configs' string arguments.
    """
    if model.startswith("wrn"):
        try:
            depth, width = (int(v) for v in model[3:].split("_"))
        except ValueError:
            raise ConfigError(
                f"WideResNet model {model!r}: write it as wrnDEPTH_WIDTH, e.g. wrn34_10."
            ) from None
        config.model.name, config.model.depth, config.model.width = "wide_resnet", depth, width
    else:
        config.model.name = MODEL_ALIASES.get(model, model)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_config(config: ml_collections.ConfigDict, *, check_files: bool = True) -> None:
    """Checks every field; raises ``ConfigError`` listing all problems found.

    Runs before any data is loaded or anything compiles.

    Args:
      config: the config.
      check_files: also read and check the files the config names (the
        ``dataset.exclude_examples`` list). ``load_run`` turns it off: a
        finished run keeps the rows it left out in its ``labels.npz``.
    """
    c = config
    errors: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    def one_of(value: Any, accepted: tuple, field: str) -> None:
        check(value in accepted, f"{field}={value!r} is not accepted; use one of {accepted}.")

    def number(value: Any, field: str, lo: float, hi: float, lo_open=False, hi_open=False):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        ok = (
            ok
            and (value > lo if lo_open else value >= lo)
            and (value < hi if hi_open else value <= hi)
        )
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        check(ok, f"{field}={value!r} is out of range; accepted: a number in {lb}{lo}, {hi}{rb}.")

    def positive_int(value: Any, field: str, allow_minus_one=False, allow_zero=False):
        ok = _is_int(value) and (value > 0 or (allow_zero and value == 0))
        ok = ok or (allow_minus_one and value == -1)
        extra = " (or -1 for all)" if allow_minus_one else ""
        kind = "a non-negative integer" if allow_zero else "a positive integer"
        check(ok, f"{field}={value!r} is invalid; accepted: {kind}{extra}.")

    try:
        positive_int(c.epochs, "epochs")
        positive_int(c.batch_size, "batch_size")
        for field, value in (
            ("seed", c.seed),
            ("dataset.corruption_seed", c.dataset.corruption_seed),
        ):
            check(
                _is_int(value) and 0 <= value <= MAX_SEED,
                f"{field}={value!r} is out of range; accepted: an integer in [0, {MAX_SEED}].",
            )

        d = c.dataset
        one_of(d.name, DATASET_NAMES, "dataset.name")
        one_of(d.source, SOURCES, "dataset.source")
        positive_int(d.num_train_examples, "dataset.num_train_examples", allow_minus_one=True)
        positive_int(d.num_test_examples, "dataset.num_test_examples", allow_minus_one=True)
        problem = label_noise_problem(d.label_noise)
        check(not problem, f"dataset.label_noise: {problem}.")
        one_of(d.image_corruption, IMAGE_CORRUPTIONS, "dataset.image_corruption")
        # Absent from configs saved before the option existed: nothing was left out.
        exclude = d.get("exclude_examples", "")
        check(
            isinstance(exclude, str),
            f"dataset.exclude_examples={exclude!r}: use the path of a hard-example list file "
            '(jax_memat.analysis.write_hard_examples), or "" for none.',
        )
        if check_files and isinstance(exclude, str) and exclude:
            errors.extend(_list_problems(c, exclude, "dataset.exclude_examples"))
        positive_int(d.crop_padding, "dataset.crop_padding", allow_zero=True)
        if d.name in DATASET_NAMES:
            (height, width, _), _ = dataset_spec(d.name)
            side = min(height, width)
            check(
                not _is_int(d.crop_padding) or d.crop_padding <= side,
                f"dataset.crop_padding={d.crop_padding!r} is larger than the images ({height}x"
                f"{width}); accepted: an integer in [0, {side}] (the paper uses 4 on 32x32).",
            )
        for split, field in (("train", "num_train_examples"), ("test", "num_test_examples")):
            size = SPLIT_SIZES.get(d.name, {}).get(split)
            value = d[field]
            if d.name != "synthetic" and size is not None and _is_int(value) and value > size:
                errors.append(
                    f"dataset.{field}={value!r} exceeds the {size} examples of {d.name}'s {split} "
                    f"split; accepted: -1 (all) or an integer in [1, {size}]."
                )

        m = c.model
        one_of(m.name, MODEL_NAMES, "model.name")
        one_of(m.dtype, ("float32", "bfloat16"), "model.dtype")
        if m.name == "wide_resnet":
            check(
                _is_int(m.depth) and m.depth >= 10 and (m.depth - 4) % 6 == 0,
                f"model.depth={m.depth!r}: a WideResNet depth must be 6n+4 (e.g. 16, 28, 34).",
            )
            positive_int(m.width, "model.width")
        positive_int(m.cnn_width, "model.cnn_width")
        # Absent from configs saved before the option existed: Flax's update, as they ran.
        bn_unbiased_var = m.get("bn_unbiased_var", False)
        check(
            isinstance(bn_unbiased_var, bool),
            f"model.bn_unbiased_var={bn_unbiased_var!r}: use True or False.",
        )

        one_of(c.objective.name, OBJECTIVE_NAMES, "objective.name")
        problem = beta_problem(c.objective.beta)
        check(not problem, f"objective.{problem}.")
        # Absent from configs saved before the option existed: no soft targets.
        soft = c.objective.get("soft_label_examples", "")
        check(
            isinstance(soft, str),
            f"objective.soft_label_examples={soft!r}: use the path of a hard-example list file "
            '(jax_memat.analysis.write_hard_examples), or "" for none.',
        )
        if isinstance(soft, str) and soft:
            smoothing = smoothing_problem(c.objective.get("soft_label_smoothing", 1.0))
            check(not smoothing, f"objective.soft_label_{smoothing}.")
            if check_files:
                errors.extend(_list_problems(c, soft, "objective.soft_label_examples"))

        t = c.te
        check(isinstance(t.enabled, bool), f"te.enabled={t.enabled!r}: use True or False.")
        errors.extend(
            f"te.{p}." for p in te_problems(t.momentum, t.weight, t.ramp_start, t.ramp_end)
        )
        one_of(t.output, REGULARIZER_OUTPUTS, "te.output")
        if t.enabled and t.regularize_attack and c.objective.name == "trades":
            # The TE term in the TRADES attack is scaled by 1/beta (objectives.make_objective).
            check(
                not problem and c.objective.beta > 0,
                "TRADES+TE with te.regularize_attack needs objective.beta > 0.",
            )

        a = c.attack
        one_of(a.name, TRAINING_ATTACKS, "attack.name")
        if a.name == "fgsm":
            check(
                a.steps == 1, f"attack.steps={a.steps!r}: attack.name='fgsm' takes exactly 1 step."
            )
        errors.extend(threat_model_problems(a.norm, a.eps, a.step_size, prefix="attack."))
        positive_int(a.steps, "attack.steps", allow_zero=True)
        # Absent from configs saved before the option existed: clipped, as they ran.
        clip_start = a.get("clip_start", True)
        check(isinstance(clip_start, bool), f"attack.clip_start={clip_start!r}: use True or False.")

        o = c.optimizer
        one_of(o.name, OPTIMIZER_NAMES, "optimizer.name")
        number(
            o.learning_rate, "optimizer.learning_rate", 0.0, math.inf, lo_open=True, hi_open=True
        )
        number(o.momentum, "optimizer.momentum", 0.0, 1.0, hi_open=True)
        number(o.weight_decay, "optimizer.weight_decay", 0.0, math.inf, hi_open=True)

        s = c.schedule
        one_of(s.name, SCHEDULE_NAMES, "schedule.name")
        number(s.gamma, "schedule.gamma", 0.0, 1.0, lo_open=True)
        if s.name == "multistep":
            check(
                all(_is_int(x) and x > 0 for x in s.milestones),
                f"schedule.milestones={tuple(s.milestones)!r}: use positive epoch numbers.",
            )
        if s.name == "step":
            positive_int(s.step_every, "schedule.step_every")

        e = c.eval
        positive_int(e.every_epochs, "eval.every_epochs")
        positive_int(e.batch_size, "eval.batch_size")
        positive_int(e.pgd_steps, "eval.pgd_steps", allow_zero=True)
        positive_int(e.num_train_examples, "eval.num_train_examples", allow_minus_one=True)
        positive_int(e.num_test_examples, "eval.num_test_examples", allow_minus_one=True)
        positive_int(c.final_eval.pgd_steps, "final_eval.pgd_steps", allow_zero=True)
        positive_int(c.log_every_steps, "log_every_steps")
        # Absent from configs saved before the option existed: the default.
        shard_mib = c.get("parallel", {}).get("shard_table_mib", DEFAULT_SHARD_TABLE_MIB)
        check(
            isinstance(shard_mib, int | float)
            and not isinstance(shard_mib, bool)
            and (shard_mib == -1 or 0 <= shard_mib < math.inf),
            f"parallel.shard_table_mib={shard_mib!r} is invalid; accepted: a number >= 0 (MiB) "
            "or -1 (never split).",
        )
        record = c.get("record", {}).get("train_per_example", False)
        check(
            isinstance(record, bool),
            f"record.train_per_example={record!r}: use True or False.",
        )
        # Absent from configs saved before the option existed: off, as they ran.
        g = c.get("grad_stats", {})
        positive_int(g.get("every_steps", 0), "grad_stats.every_steps", allow_zero=True)
        microbatch = g.get("microbatch", 0)
        positive_int(microbatch, "grad_stats.microbatch", allow_zero=True)
        check(
            not _is_int(microbatch) or not _is_int(c.batch_size) or microbatch <= c.batch_size,
            f"grad_stats.microbatch={microbatch!r} exceeds batch_size={c.batch_size!r}; "
            "accepted: 0 (the whole batch) or an integer in [1, batch_size].",
        )
        examples = g.get("examples", 0)
        check(
            _is_int(examples)
            and (examples == 0 or 2 <= examples)
            and (not _is_int(c.batch_size) or examples <= c.batch_size),
            f"grad_stats.examples={examples!r} is invalid; accepted: 0 (the whole batch) or an "
            f"integer in [2, batch_size={c.batch_size!r}].",
        )
    except AttributeError as err:
        errors.append(f"missing field: {err}. Start from jax_memat.experiment.default_config().")

    if errors:
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(errors))


def _list_problems(config: ml_collections.ConfigDict, path: str, field: str) -> list[str]:
    """What is wrong with the hard-example list ``path`` that ``field`` names, for this config."""
    d = config.dataset
    try:
        listed = read_hard_examples(path)
    except (OSError, ValueError) as err:
        return [f"{field}: {err}"]
    if d.name not in DATASET_NAMES or not (
        _is_int(d.num_train_examples) and (d.num_train_examples > 0 or d.num_train_examples == -1)
    ):
        return []  # reported above; the list cannot be checked against the dataset
    num_train = expected_split_sizes(config)[0]
    try:
        listed.check_for(d.name, num_train)
    except ValueError as err:
        return [f"{field}: {err}"]
    if field != "dataset.exclude_examples":
        return []
    left = num_train - listed.indices.size
    if _is_int(config.batch_size) and left < config.batch_size:
        return [
            f"{field}: leaving out {listed.indices.size} of the {num_train} training examples "
            f"leaves {left}, fewer than batch_size={config.batch_size}; accepted: a list that "
            "leaves at least one batch."
        ]
    return []


def excluded_examples(config: ml_collections.ConfigDict) -> np.ndarray | None:
    """The training rows ``dataset.exclude_examples`` lists (sorted), or None when it is ``""``.

    Raises:
      ConfigError: the file is missing or not a hard-example list.

    Example:
      >>> config.dataset.exclude_examples = "workdirs/run/hard.json"
      >>> excluded_examples(config)[:3]
      array([4, 17, 388])
    """
    path = config.dataset.get("exclude_examples", "")
    if not path:
        return None
    try:
        return np.sort(read_hard_examples(path).indices)
    except (OSError, ValueError) as err:
        raise ConfigError(f"Invalid config:\n  - dataset.exclude_examples: {err}") from None


def soft_label_examples(config: ml_collections.ConfigDict) -> np.ndarray | None:
    """The training rows ``objective.soft_label_examples`` lists (sorted), or None when ``""``.

    Rows of the full training set, as every hard-example list.

    Raises:
      ConfigError: the file is missing or not a hard-example list.

    Example:
      >>> config.objective.soft_label_examples = "workdirs/run/analysis/hard_examples.json"
      >>> soft_label_examples(config)[:3]
      array([4, 17, 388])
    """
    path = config.objective.get("soft_label_examples", "")
    if not path:
        return None
    try:
        return np.sort(read_hard_examples(path).indices)
    except (OSError, ValueError) as err:
        raise ConfigError(f"Invalid config:\n  - objective.soft_label_examples: {err}") from None


def training_attack(config: ml_collections.ConfigDict) -> AttackSpec:
    """The training attack a config names (the one place config fields become an AttackSpec)."""
    a = config.attack
    return AttackSpec(
        a.name,
        a.eps,
        a.step_size,
        a.steps,
        a.norm,
        a.random_start,
        clip_start=a.get("clip_start", True),  # configs saved before the field existed
    )


def evaluation_attacks(
    config: ml_collections.ConfigDict,
    steps: int,
    names: tuple[str, ...] = ("pgd",),
    *,
    norm: str | None = None,
    eps: float | None = None,
    step_size: float | None = None,
) -> dict[str, AttackSpec]:
    """``{name: AttackSpec}`` of the evaluation attacks (PGD-k, CW-k) for a run.

    The threat model is the training attack's unless overridden; evaluation
    attacks always start at a random point of the ball, clipped to the box.
    No attack when ``steps`` is 0.
    """
    a = config.attack
    norm = a.norm if norm is None else norm
    eps = a.eps if eps is None else eps
    step_size = a.step_size if step_size is None else step_size
    if steps <= 0:
        return {}
    return {name: AttackSpec(name, eps, step_size, steps, norm, True) for name in names}


def shard_min_bytes(config: ml_collections.ConfigDict) -> int | None:
    """The size from which a validated config splits per-example tables (None: never)."""
    mib = config.get("parallel", {}).get("shard_table_mib", DEFAULT_SHARD_TABLE_MIB)
    return None if mib < 0 else int(mib * 2**20)


def expected_split_sizes(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(train, test) example counts a validated config loads, known before reading data."""
    d, sizes = config.dataset, SPLIT_SIZES[config.dataset.name]
    n_train = sizes["train"] if d.num_train_examples < 0 else d.num_train_examples
    n_test = sizes["test"] if d.num_test_examples < 0 else d.num_test_examples
    return n_train, n_test


def check_device_batch_sizes(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ``ConfigError`` unless each global batch splits evenly over ``num_devices``.

    The message names the field and the accepted sizes nearest to the value.
    """
    errors = []
    for field, value in (
        ("batch_size", config.batch_size),
        ("eval.batch_size", config.eval.batch_size),
    ):
        message = batch_size_problem(value, num_devices, field)
        if message:
            errors.append(message)
    if errors:
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(errors))


def batch_size_problem(value: int, num_devices: int, field: str) -> str:
    """Why ``value`` cannot be a global batch over ``num_devices`` (``""`` if it can)."""
    if _is_int(value) and value > 0 and value % num_devices == 0:
        return ""
    if not _is_int(value) or value <= 0:
        return (
            f"{field}={value!r} is invalid; accepted: a positive multiple of {num_devices} "
            "(the device count)."
        )
    lower = value - value % num_devices
    near = [n for n in (lower, lower + num_devices) if n > 0]
    return (
        f"{field}={value} does not split over the {num_devices} devices; accepted: a multiple of "
        f"{num_devices}, e.g. {' or '.join(str(n) for n in near)}."
    )


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    """A JSON-compatible dict (tuples become lists)."""
    return json.loads(config.to_json())


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """Differences between two config dicts.

    Returns:
      ``(conflicts, resumable)``: lines naming fields that differ and forbid a
      resume, and the names of differing fields that may change between a run
      and its resumption (``RESUMABLE_FIELDS``).
    """
    # A field added to the library after the run was saved takes its default, which
    # keeps the behaviour the run was trained with.
    saved = {**_flatten(config_to_dict(default_config())), **_flatten(saved)}
    current = _flatten(current)
    keys = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    conflicts = [
        f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}"
        for k in keys
        if k not in RESUMABLE_FIELDS
    ]
    return conflicts, [k for k in keys if k in RESUMABLE_FIELDS]


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> bool:
    """Compares ``config`` with the one saved in ``workdir``.

    Returns:
      True if the workdir already holds this config's run (resume), False if it
      holds none.

    Raises:
      WorkdirConflictError: the workdir holds a run of a different config; the
        message lists the differing fields. Nothing is written.
      CorruptFileError: the saved ``config.json`` is truncated or invalid.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return False
    diffs, _ = config_differences(read_json(path), config_to_dict(config))
    if diffs:
        raise WorkdirConflictError(
            f"The workdir {workdir} holds a run of a different config; refusing to touch it.\n"
            "  Differences:\n    " + "\n    ".join(diffs) + "\n"
            "  Use a new --workdir, or the saved config to resume."
        )
    return True


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the resolved config as ``<workdir>/config.json`` (atomically)."""
    write_json(os.path.join(workdir, CONFIG_FILE), config_to_dict(config))
