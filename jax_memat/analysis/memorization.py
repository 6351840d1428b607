"""Per-example memorization records of a run, and what is derived from them.

Dong et al., *Exploring Memorization in Adversarial Training* (ICLR 2022),
Sec. 4, trace robust overfitting to memorization: after the learning-rate
decay the model starts to fit the "hard" adversarial examples of the
training set (atypical ones, or ones whose label looks wrong), and the robust
test accuracy drops. This module turns the per-example files a run writes
into arrays indexed by ``[epoch, example]`` and derives from them:

- ``learning_time``: the epoch from which an example stays classified
  correctly until the end of the records;
- ``forgetting_events``: how often an example goes from correct to incorrect
  (Toneva et al., *An Empirical Study of Example Forgetting during Deep
  Neural Network Learning*, ICLR 2019);
- ``hard_examples``: the examples with the highest adversarial loss at the
  best-robust-accuracy epoch, and their overlap with the corrupted labels;
- ``write_hard_examples`` / ``read_hard_examples``: a list of examples to
  leave out of a new run (``--config.dataset.exclude_examples``).

The workdir layout read here (written by ``jax_memat.experiment``; this
package sits below it, so the names are repeated as constants):

- ``config.json``: the run's config (``dataset.name``, ...);
- ``metrics.jsonl``: one row per epoch (``learning_rate``,
  ``test_pgd_accuracy``, ...);
- ``labels.npz``: ``labels`` (trained on), ``clean_labels``, ``changed``
  [N]; in a run that left examples out, also ``original_index`` [N] and
  ``excluded_index`` [k];
- ``per_example/{train,test}_epochNNNN.npz``: the per-epoch evaluation of
  the first ``eval.num_{train,test}_examples`` rows: ``index`` and
  ``natural_*`` / ``pgd_*`` (and ``cw_*``) ``loss``, ``correct``, ``margin``;
- ``per_example/train_steps_epochNNNN.npz``: the train step's ``index``,
  ``loss``, ``margin``, ``correct``, ``label`` on all N rows (NaN / -1 where
  the epoch did not train on the row).

Example:
  >>> records = load_records("workdirs/run", "eval", "train")
  >>> hard = hard_examples(records, fraction=0.1)
  >>> hard.summary["precision"], hard.summary["fraction_corrupted_overall"]
  >>> write_hard_examples("workdirs/run/hard.json", hard.original_index, hard.meta)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from jax_memat.fileio import atomic_write

# The run's workdir layout (see the module docstring).
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
LABELS_FILE = "labels.npz"
PER_EXAMPLE_DIR = "per_example"

SOURCES = ("eval", "train_steps")
SPLITS = ("train", "test")
# learning_time's value for an example that is not correct at the last record.
NEVER_LEARNED = -1
# The tag of a hard-example list file, and its version.
HARD_EXAMPLES_FORMAT = "jax_memat.hard_examples"
HARD_EXAMPLES_VERSION = 1
# The process's umask, for the mode of written files (setting it is the only way to read it).

_EPOCH_FILE = {
    "eval": r"^{split}_epoch(\d+)\.npz$",
    "train_steps": r"^train_steps_epoch(\d+)\.npz$",
}
# Arrays of the per-example files that are not per-epoch quantities.
_NOT_QUANTITIES = {"eval": ("index",), "train_steps": ("index", "label")}
# How each kind of file is turned on, for the error when none is found.
_HOW_TO_RECORD = {
    "eval": (
        "they are written at every evaluated epoch (eval.every_epochs) when "
        "eval.save_per_example=True, for the first eval.num_train_examples training rows and "
        "eval.num_test_examples test rows"
    ),
    "train_steps": "run with --config.record.train_per_example=True to write them",
}


@dataclasses.dataclass(frozen=True, eq=False)
class MemorizationRecords:
    """Per-example quantities of a run over its recorded epochs.

    Attributes:
      source: ``"eval"`` (the per-epoch evaluation: clean and PGD loss,
        correctness and margin on the end-of-epoch model) or ``"train_steps"``
        (the train step's own loss, margin and correctness, during the epoch).
      split: ``"train"`` or ``"test"``.
      epochs: int [E], the recorded epochs (1-based), increasing. Epochs the
        run did not record (``eval.every_epochs > 1``) are absent.
      index: int [N], the row of each example in the run's split: column
        ``j`` of every quantity is example ``index[j]``.
      values: ``{name: array [E, N]}``; e.g. ``natural_loss``, ``pgd_correct``
        (eval), ``loss``, ``margin``, ``correct`` (train_steps). In
        train_steps records a row the epoch did not train on holds NaN (float)
        or -1 (``correct``). Also reachable as ``records[name]``.
      label: int [N], the label the run trained on (noisy under label noise);
        -1 for the test split, whose labels are not saved in the workdir.
      clean_label: int [N], the dataset's label (-1 for the test split).
      corrupted: bool [N], whether the trained-on label differs from the
        dataset's (all False for the test split).
      original_index: int [N], the example's row in the full training set
        before any examples were left out (``dataset.exclude_examples``);
        equal to ``index`` when none were (and for the test split).
      num_source_examples: the number of rows of that full training set (of
        the test set for the test split).
      dataset: the dataset's name, from ``config.json``.
      best_epoch: the best-robust-accuracy epoch (highest
        ``test_pgd_accuracy``, ties broken by ``test_natural_accuracy``, the
        earliest of equals), as the run picks its best checkpoint; None when
        no epoch was evaluated.
      lr_decay_epochs: the epochs after which the learning rate dropped.
    """

    source: str
    split: str
    epochs: np.ndarray
    index: np.ndarray
    values: dict[str, np.ndarray]
    label: np.ndarray
    clean_label: np.ndarray
    corrupted: np.ndarray
    original_index: np.ndarray
    num_source_examples: int
    dataset: str
    best_epoch: int | None
    lr_decay_epochs: tuple[int, ...]

    @property
    def quantities(self) -> tuple[str, ...]:
        """The names of the recorded quantities, sorted."""
        return tuple(sorted(self.values))

    @property
    def num_examples(self) -> int:
        """N, the number of recorded examples."""
        return int(self.index.shape[0])

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.values:
            raise KeyError(
                f"{name!r} is not recorded in these {self.source} records; recorded: "
                f"{', '.join(self.quantities)}."
            )
        return self.values[name]

    def epoch_position(self, epoch: int) -> int:
        """The row of ``epoch`` in the ``[E, N]`` arrays; a clear error if it was not recorded."""
        hits = np.flatnonzero(self.epochs == epoch)
        if not hits.size:
            raise ValueError(
                f"epoch {epoch} is not recorded in these {self.source} records; recorded: "
                f"{_describe_epochs(self.epochs)}."
            )
        return int(hits[0])


def load_records(
    workdir: str,
    source: str = "eval",
    split: str = "train",
    *,
    epochs: Iterable[int] | None = None,
    quantities: Sequence[str] | None = None,
) -> MemorizationRecords:
    """Reads a run's per-example files into ``[epoch, example]`` arrays.

    Args:
      workdir: a training workdir.
      source: ``"eval"``, the per-epoch evaluation files
        (``per_example/{split}_epochNNNN.npz``), or ``"train_steps"``, the
        train step's records (``per_example/train_steps_epochNNNN.npz``;
        training split only).
      split: ``"train"`` or ``"test"``.
      epochs: read only these epochs (all recorded ones by default); each must
        be recorded.
      quantities: read only these quantities (all by default), e.g.
        ``["pgd_loss", "pgd_correct"]`` to save memory on a long run.

    Returns:
      A ``MemorizationRecords``.

    Raises:
      ValueError: a bad argument, a damaged file (named), or files that do
        not agree with each other (different example rows, missing arrays).
      FileNotFoundError: the workdir holds no such records (the message says
        which config field writes them) or no ``labels.npz``.

    Example:
      >>> records = load_records("workdirs/run", "eval", "train")
      >>> records["pgd_loss"].shape  # [epochs, examples]
      (200, 50000)
    """
    if source not in SOURCES:
        raise ValueError(f"source={source!r} is not accepted; use one of {SOURCES}.")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not accepted; use one of {SPLITS}.")
    if source == "train_steps" and split != "train":
        raise ValueError("source='train_steps' records the training split only; use split='train'.")
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"{workdir} is not a folder (expected a training workdir).")

    files = _epoch_files(workdir, source, split)
    if epochs is not None:
        wanted = sorted({_as_int(e, "epochs") for e in epochs})
        missing = [e for e in wanted if e not in files]
        if missing:
            raise ValueError(
                f"epochs {missing} are not recorded in {workdir}/{PER_EXAMPLE_DIR} ({source}, "
                f"{split}); recorded: {_describe_epochs(np.array(sorted(files)))}."
            )
        files = {e: files[e] for e in wanted}

    index, stacks = None, {}
    for _, path in sorted(files.items()):
        arrays = _read_npz(path)
        if "index" not in arrays:
            raise ValueError(f"{path} holds no 'index' array; it is not a per-example record.")
        names = sorted(set(arrays) - set(_NOT_QUANTITIES[source]))
        if index is None:
            index = arrays["index"].astype(np.int64)
            wanted_q = names if quantities is None else list(quantities)
            unknown = [q for q in wanted_q if q not in names]
            if unknown:
                raise ValueError(
                    f"quantities {unknown} are not recorded in {path}; recorded: {names}."
                )
            stacks = {q: [] for q in wanted_q}
        elif not np.array_equal(arrays["index"], index):
            raise ValueError(
                f"{path} records other example rows than the earlier epochs "
                f"({arrays['index'].shape[0]} rows vs {index.shape[0]}); the per-example files "
                "of one workdir must cover the same rows. Was eval.num_*_examples changed?"
            )
        for q in stacks:
            if q not in arrays:
                raise ValueError(f"{path} lacks {q!r}, which the earlier epochs record.")
            stacks[q].append(arrays[q])
    values = {q: np.stack(v) for q, v in stacks.items()}

    config = _read_config(workdir)
    rows = _read_metrics(os.path.join(workdir, METRICS_FILE))
    if split == "train":
        labels = _read_labels(workdir)
        n = labels["labels"].shape[0]
        if index.size and (index.min() < 0 or index.max() >= n):
            raise ValueError(
                f"The per-example files of {workdir} name rows up to {index.max()}, but "
                f"{LABELS_FILE} holds {n} training labels; the files are from different runs."
            )
        label = labels["labels"][index].astype(np.int64)
        clean = labels["clean_labels"][index].astype(np.int64)
        corrupted = labels["changed"][index].astype(bool)
        original = labels.get("original_index", np.arange(n))[index].astype(np.int64)
        num_source = n + labels.get("excluded_index", np.zeros(0)).shape[0]
    else:
        label = np.full(index.shape, -1, np.int64)
        clean = label.copy()
        corrupted = np.zeros(index.shape, bool)
        original = index.copy()
        num_source = int(index.max()) + 1 if index.size else 0
        num_test = config.get("dataset", {}).get("num_test_examples", -1)
        if isinstance(num_test, int) and num_test > 0:
            num_source = num_test
    return MemorizationRecords(
        source=source,
        split=split,
        epochs=np.array(sorted(files), np.int64),
        index=index,
        values=values,
        label=label,
        clean_label=clean,
        corrupted=corrupted,
        original_index=original,
        num_source_examples=int(num_source),
        dataset=str(config.get("dataset", {}).get("name", "")),
        best_epoch=best_epoch(rows),
        lr_decay_epochs=lr_decay_epochs(rows),
    )


def best_epoch(rows: Sequence[Mapping[str, Any]]) -> int | None:
    """The best-robust-accuracy epoch of metrics rows, as the run picks its best checkpoint.

    Highest ``test_pgd_accuracy`` (0 when absent), ties broken by
    ``test_natural_accuracy``, the earliest of equals; rows without an
    evaluation (no ``test_natural_accuracy``) are skipped.

    Args:
      rows: the rows of ``metrics.jsonl``.

    Returns:
      The epoch, or None when no row was evaluated.

    Example:
      >>> best_epoch([{"epoch": 1, "test_pgd_accuracy": 0.4, "test_natural_accuracy": 0.7},
      ...             {"epoch": 2, "test_pgd_accuracy": 0.4, "test_natural_accuracy": 0.8}])
      2
    """
    best, score = None, None
    for row in rows:
        if "test_natural_accuracy" not in row:
            continue
        s = (row.get("test_pgd_accuracy", 0.0), row["test_natural_accuracy"])
        if score is None or s > score:
            best, score = int(row["epoch"]), s
    return best


def lr_decay_epochs(rows: Sequence[Mapping[str, Any]]) -> tuple[int, ...]:
    """The epochs after which the learning rate dropped (e.g. ``(100, 150)`` for the paper's).

    A row's ``learning_rate`` is the rate of the epoch's last step, so a drop
    between the rows of epochs ``e`` and ``e + 1`` is a decay after epoch ``e``.

    Example:
      >>> lr_decay_epochs([{"epoch": 1, "learning_rate": 0.1}, {"epoch": 2, "learning_rate": 0.01}])
      (1,)
    """
    out, previous = [], None
    for row in sorted(rows, key=lambda r: r.get("epoch", 0)):
        lr = row.get("learning_rate")
        if lr is None:
            continue
        if previous is not None and lr < previous[1]:
            out.append(previous[0])
        previous = (int(row["epoch"]), lr)
    return tuple(out)


# --------------------------------------------------------------------------- derived


def learning_time(correct: np.ndarray, epochs: Sequence[int]) -> np.ndarray:
    """Per example, the first recorded epoch from which it stays correct to the last record.

    Args:
      correct: [E, N] correctness per recorded epoch: bool, or integers in
        {1, 0, -1} where -1 means "not recorded at this epoch" (train_steps
        records of rows an epoch did not train on); missing entries neither
        break nor start a correct streak.
      epochs: the E recorded epochs, increasing.

    Returns:
      int [N]: the epoch of the first record of the final all-correct
      streak; ``NEVER_LEARNED`` (-1) when the last record is incorrect or the
      example has no record.

    Example:
      >>> correct = np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]], bool)  # 3 epochs x 3 examples
      >>> learning_time(correct, [1, 2, 3])
      array([ 2,  3, -1])
    """
    recorded, right = _correctness(correct)
    epochs = np.asarray(epochs, np.int64)
    if epochs.shape != (recorded.shape[0],):
        raise ValueError(
            f"epochs has shape {epochs.shape}; expected ({recorded.shape[0]},), one per row of "
            "correct."
        )
    num_epochs = recorded.shape[0]
    wrong = recorded & ~right
    any_wrong = wrong.any(axis=0)
    last_wrong = np.where(any_wrong, num_epochs - 1 - np.argmax(wrong[::-1], axis=0), -1)
    after = recorded & (np.arange(num_epochs)[:, None] > last_wrong[None, :])
    learned = after.any(axis=0)
    return np.where(learned, epochs[np.argmax(after, axis=0)], NEVER_LEARNED)


def forgetting_events(correct: np.ndarray) -> np.ndarray:
    """Per example, the number of correct -> incorrect transitions between consecutive records.

    Toneva et al. (ICLR 2019) count these "forgetting events" between
    consecutive presentations of an example; here, between consecutive
    recorded epochs (the evaluation's or the train step's). An example that
    is never correct has 0 events: tell it apart with ``learning_time``
    (Toneva et al. count it as forgotten infinitely often).

    Args:
      correct: [E, N], bool or integers in {1, 0, -1} (-1: not recorded at
        this epoch; skipped, so the transition is taken between the records
        around it).

    Returns:
      int [N].

    Example:
      >>> correct = np.array([[1, 0], [0, 1], [1, 1], [0, 1]], bool)
      >>> forgetting_events(correct)
      array([2, 0])
    """
    recorded, right = _correctness(correct)
    events = np.zeros(recorded.shape[1], np.int64)
    previous = np.zeros(recorded.shape[1], bool)  # the last record was correct
    for rec, r in zip(recorded, right, strict=True):
        events += rec & previous & ~r
        previous = np.where(rec, r, previous)
    return events


@dataclasses.dataclass(frozen=True, eq=False)
class HardExamples:
    """The hardest examples of a run at one epoch.

    Attributes:
      index: int [k], their rows in the run's split, hardest first.
      original_index: int [k], the same examples' rows in the full training
        set (what ``write_hard_examples`` and ``dataset.exclude_examples``
        take).
      values: float [k], their value of ``quantity`` at ``epoch``.
      epoch: the epoch they were ranked at.
      quantity: the quantity ranked.
      summary: their overlap with the corrupted labels (``corruption_overlap``).
      meta: what a hard-example file records about them: the dataset, the
        size of its training set, the epoch, the quantity and the selection.
    """

    index: np.ndarray
    original_index: np.ndarray
    values: np.ndarray
    epoch: int
    quantity: str
    summary: dict
    meta: dict


def hard_examples(
    records: MemorizationRecords,
    *,
    epoch: int | None = None,
    quantity: str | None = None,
    fraction: float | None = None,
    count: int | None = None,
) -> HardExamples:
    """The examples hardest at ``epoch``: highest loss, or lowest margin / correctness.

    Args:
      records: from ``load_records`` (training split).
      epoch: the epoch to rank at; default the best-robust-accuracy epoch
        (``records.best_epoch``), where the paper's robust overfitting starts.
      quantity: what to rank by; default ``"pgd_loss"`` (eval records) or
        ``"loss"`` (train_steps records). Higher is harder, except for
        margins and correctness, where lower is harder.
      fraction: take ``round(fraction * n)`` examples (at least one) of the
        ``n`` with a value at ``epoch``; default 0.1 when ``count`` is unset.
      count: take this many examples instead.

    Returns:
      A ``HardExamples``; ties are broken by the lower row index.

    Example:
      >>> hard = hard_examples(load_records("workdirs/run"), fraction=0.05)
      >>> hard.summary["precision"]  # the fraction of them with a corrupted label
      0.61
    """
    if fraction is not None and count is not None:
        raise ValueError("Give fraction or count, not both.")
    if count is not None:
        if not _is_int(count) or count < 1:
            raise ValueError(f"count={count!r}; accepted: a positive integer.")
    else:
        fraction = 0.1 if fraction is None else fraction
        if (
            not isinstance(fraction, int | float)
            or isinstance(fraction, bool)
            or not 0 < fraction <= 1
        ):
            raise ValueError(f"fraction={fraction!r}; accepted: a number in (0, 1].")
    if quantity is None:
        quantity = "pgd_loss" if records.source == "eval" else "loss"
    if epoch is None:
        if records.best_epoch is None:
            raise ValueError(
                f"The run has no evaluated epoch in its {METRICS_FILE}, so no best epoch; pass "
                "epoch=."
            )
        epoch = records.best_epoch
    values = np.asarray(records[quantity][records.epoch_position(epoch)], np.float64)
    valid = np.isfinite(values)
    if records[quantity].dtype.kind in "iu":
        valid &= values >= 0  # -1: not recorded this epoch
    n = int(valid.sum())
    if count is None:
        count = max(1, round(fraction * n))
    if count > n:
        raise ValueError(
            f"count={count} exceeds the {n} examples with a {quantity} value at epoch {epoch}."
        )
    harder = -values if not _lower_is_harder(quantity) else values
    candidates = np.flatnonzero(valid)
    order = candidates[np.lexsort((records.index[candidates], harder[candidates]))][:count]
    hard = np.zeros(records.num_examples, bool)
    hard[order] = True
    selection = {"count": count} if fraction is None else {"fraction": fraction}
    meta = {
        "dataset": records.dataset,
        "num_examples": records.num_source_examples,
        "source": records.source,
        "split": records.split,
        "epoch": int(epoch),
        "quantity": quantity,
        **selection,
    }
    return HardExamples(
        index=records.index[order],
        original_index=records.original_index[order],
        values=values[order],
        epoch=int(epoch),
        quantity=quantity,
        summary=corruption_overlap(hard[valid], records.corrupted[valid]),
        meta=meta,
    )


def corruption_overlap(hard: np.ndarray, corrupted: np.ndarray) -> dict:
    """How well "hard" finds the corrupted labels.

    Args:
      hard: bool [N], the hard examples.
      corrupted: bool [N], the examples whose label was corrupted.

    Returns:
      ``{"count": hard examples, "num_examples": N, "num_corrupted",
      "num_hard_corrupted", "fraction_corrupted_hard": the fraction of the hard
      examples with a corrupted label (= "precision" of hard as a detector of
      corrupted labels), "fraction_corrupted_overall": the same over all N
      (the precision of a random pick), "precision", "recall": the fraction of
      the corrupted labels among the hard examples}``. A ratio with a zero
      denominator is None.

    Example:
      >>> corruption_overlap(np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool))["recall"]
      0.5
    """
    hard, corrupted = np.asarray(hard, bool), np.asarray(corrupted, bool)
    if hard.shape != corrupted.shape or hard.ndim != 1:
        raise ValueError(
            f"hard and corrupted must be 1-D of one length; got {hard.shape} and {corrupted.shape}."
        )
    k, n = int(hard.sum()), int(hard.size)
    num_corrupted, both = int(corrupted.sum()), int((hard & corrupted).sum())

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {
        "count": k,
        "num_examples": n,
        "num_corrupted": num_corrupted,
        "num_hard_corrupted": both,
        "fraction_corrupted_hard": ratio(both, k),
        "fraction_corrupted_overall": ratio(num_corrupted, n),
        "precision": ratio(both, k),
        "recall": ratio(both, num_corrupted),
    }


# --------------------------------------------------------------------------- the list file


@dataclasses.dataclass(frozen=True)
class HardExampleList:
    """A hard-example list as read from its file.

    Attributes:
      indices: int [k], rows of the full training set (before any were left
        out), in the file's order (hardest first when written from
        ``hard_examples``).
      meta: what the file says about them; ``dataset`` (str) and
        ``num_examples`` (the training set's size), when present, are checked
        against the run that uses the list.
      path: the file it was read from.
    """

    indices: np.ndarray
    meta: dict
    path: str = ""

    def check_for(self, dataset: str, num_examples: int) -> None:
        """Raises ``ValueError`` unless the list fits a training set of ``dataset``'s first rows.

        Args:
          dataset: the name of the run's dataset.
          num_examples: the number of training rows the run loads.

        Example:
          >>> read_hard_examples("hard.json").check_for("cifar10", 50_000)
        """
        where = f"{self.path}: " if self.path else ""
        listed = self.meta.get("dataset")
        if listed not in (None, "") and listed != dataset:
            raise ValueError(
                f"{where}the list was made on dataset {listed!r}, but the run uses {dataset!r}."
            )
        size = self.meta.get("num_examples")
        if size is not None and size != num_examples:
            raise ValueError(
                f"{where}the list was made on a training set of {size} examples, but the run "
                f"loads {num_examples} (dataset.num_train_examples); its rows would name other "
                "examples."
            )
        if self.indices.size and self.indices.max() >= num_examples:
            raise ValueError(
                f"{where}index {int(self.indices.max())} is out of range for the "
                f"{num_examples} training examples."
            )
        if self.indices.size >= num_examples:
            raise ValueError(
                f"{where}the list names {self.indices.size} examples: no training example would "
                f"be left of the {num_examples}."
            )


def write_hard_examples(path: str, indices: Sequence[int], meta: Mapping | None = None) -> str:
    """Writes a hard-example list as JSON, atomically.

    Args:
      path: the file to write (``.json``).
      indices: distinct rows of the full training set (``HardExamples.original_index``).
      meta: JSON-compatible facts about the list (``HardExamples.meta``);
        ``dataset`` and ``num_examples`` are checked when a run uses it.

    Returns:
      ``path``.

    Example:
      >>> hard = hard_examples(load_records("workdirs/run"), fraction=0.1)
      >>> write_hard_examples("hard.json", hard.original_index, hard.meta)
      'hard.json'
    """
    array = np.asarray(indices)
    problem = _indices_problem(array)
    if problem:
        raise ValueError(f"indices: {problem}")
    meta = dict(meta or {})
    problem = _meta_problem(meta)
    if problem:
        raise ValueError(f"meta: {problem}")
    text = json.dumps(
        {
            "format": HARD_EXAMPLES_FORMAT,
            "version": HARD_EXAMPLES_VERSION,
            "indices": [int(i) for i in array],
            "meta": meta,
        },
        indent=1,
        sort_keys=True,
        allow_nan=False,
    )
    with atomic_write(path, "w") as f:
        f.write(text + "\n")
    return path


def read_hard_examples(path: str) -> HardExampleList:
    """Reads and checks a hard-example list written by ``write_hard_examples``.

    Args:
      path: the file.

    Returns:
      A ``HardExampleList``.

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file is not such a list; the message says what is wrong
        and what is accepted.

    Example:
      >>> read_hard_examples("hard.json").indices[:3]
      array([17, 4021, 388])
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist (expected a hard-example list file).")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} is not a readable JSON file ({type(err).__name__}: {err}); expected a "
            "hard-example list written by jax_memat.analysis.write_hard_examples."
        ) from None
    if not isinstance(data, dict) or data.get("format") != HARD_EXAMPLES_FORMAT:
        raise ValueError(
            f'{path} is not a hard-example list (no "format": "{HARD_EXAMPLES_FORMAT}"); '
            "write one with jax_memat.analysis.write_hard_examples."
        )
    if data.get("version") != HARD_EXAMPLES_VERSION:
        raise ValueError(
            f"{path} has version {data.get('version')!r}; accepted: {HARD_EXAMPLES_VERSION}."
        )
    raw = data.get("indices")
    if not isinstance(raw, list) or not all(_is_int(i) for i in raw):
        raise ValueError(f'{path}: "indices" must be a list of integers.')
    indices = np.array(raw, np.int64)
    problem = _indices_problem(indices)
    if problem:
        raise ValueError(f"{path}: {problem}")
    meta = data.get("meta", {})
    problem = _meta_problem(meta) if isinstance(meta, dict) else '"meta" must be an object.'
    if problem:
        raise ValueError(f"{path}: {problem}")
    return HardExampleList(indices, meta, path)


# --------------------------------------------------------------------------- helpers


def _is_int(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _as_int(x: Any, what: str) -> int:
    if not _is_int(x):
        raise ValueError(f"{what}: {x!r} is not an integer epoch.")
    return int(x)


def _lower_is_harder(quantity: str) -> bool:
    return quantity.split("_")[-1] in ("margin", "correct")


def _correctness(correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(recorded, correct)`` bool [E, N] masks from bool or {1, 0, -1} correctness."""
    c = np.asarray(correct)
    if c.ndim != 2:
        raise ValueError(f"correct must be [epochs, examples]; got shape {c.shape}.")
    if c.dtype == bool:
        return np.ones(c.shape, bool), c
    if c.dtype.kind not in "iu" or not np.isin(c, (-1, 0, 1)).all():
        raise ValueError(
            "correct must be bool, or integers in {1, 0, -1} (-1: not recorded at this epoch); "
            f"got dtype {c.dtype}."
        )
    return c >= 0, c == 1


def _indices_problem(indices: np.ndarray) -> str:
    if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
        return f"expected a 1-D list of integers; got {indices.dtype} of shape {indices.shape}."
    if indices.size and indices.min() < 0:
        return f"index {int(indices.min())} is negative; accepted: rows 0, 1, ..."
    unique, counts = np.unique(indices, return_counts=True)
    if (counts > 1).any():
        return f"index {int(unique[counts > 1][0])} is listed more than once."
    return ""


def _meta_problem(meta: dict) -> str:
    dataset, size = meta.get("dataset"), meta.get("num_examples")
    if dataset is not None and not isinstance(dataset, str):
        return f"meta.dataset={dataset!r}; accepted: a dataset name."
    if size is not None and (not _is_int(size) or size < 1):
        return f"meta.num_examples={size!r}; accepted: a positive integer."
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as err:
        return f"meta is not JSON-compatible ({err})."
    return ""


def _epoch_files(workdir: str, source: str, split: str) -> dict[int, str]:
    folder = os.path.join(workdir, PER_EXAMPLE_DIR)
    pattern = re.compile(_EPOCH_FILE[source].format(split=split))
    found = {}
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            m = pattern.match(name)
            if m:
                found[int(m.group(1))] = os.path.join(folder, name)
    if not found:
        example = f"{split}_epochNNNN.npz" if source == "eval" else "train_steps_epochNNNN.npz"
        raise FileNotFoundError(
            f"{workdir} holds no {source} per-example records ({PER_EXAMPLE_DIR}/{example}); "
            f"{_HOW_TO_RECORD[source]}."
        )
    return found


def _read_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(
            f"{path} is damaged ({type(err).__name__}: {err}); move it away to read the other "
            "epochs."
        ) from None


def _read_labels(workdir: str) -> dict[str, np.ndarray]:
    path = os.path.join(workdir, LABELS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{workdir} holds no {LABELS_FILE} (the labels the run trained on); it is written "
            "when a run starts."
        )
    labels = _read_npz(path)
    missing = [k for k in ("labels", "clean_labels", "changed") if k not in labels]
    if missing:
        raise ValueError(f"{path} lacks {missing}.")
    return labels


def _read_config(workdir: str) -> dict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is damaged ({type(err).__name__}: {err}).") from None
    return config if isinstance(config, dict) else {}


def _read_metrics(path: str) -> list[dict]:
    """The rows of ``metrics.jsonl``; a torn last line (a write cut short) is left out.

    The run appends whole lines; only the last can be cut short by a kill, so a
    damaged line before it is an error. A later row of an epoch replaces an
    earlier one.
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = [line for line in f.read().split(b"\n") if line.strip()]
    rows: dict[int, dict] = {}
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not _is_int(row.get("epoch")):
                raise ValueError("not a JSON object with an integer epoch")
        except ValueError as err:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}, row {i + 1}, is damaged ({err}).") from None
        rows[row["epoch"]] = row
    return [rows[e] for e in sorted(rows)]


def _describe_epochs(epochs: np.ndarray) -> str:
    if epochs.size <= 8:
        return ", ".join(str(int(e)) for e in epochs) or "none"
    return (
        f"{epochs.size} epochs, {', '.join(str(int(e)) for e in epochs[:3])}, ..., "
        f"{', '.join(str(int(e)) for e in epochs[-3:])}"
    )
