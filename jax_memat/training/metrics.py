"""Per-epoch metrics: a JSON-lines file, TensorBoard, and learning-curve plots."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

from absl import logging

from jax_memat.training.workdir import METRICS_FILE, append_line, atomic_write, read_jsonl, warn

# Wall-clock fields differ between otherwise identical runs; comparisons of
# runs (resume tests, reproducibility checks) leave them out.
TIMING_FIELDS = ("epoch_time_s", "examples_per_s", "eval_time_s")


def read_metrics(workdir: str) -> list[dict]:
    """The rows of ``<workdir>/metrics.jsonl`` (one per epoch), in order.

    A torn last line (a write cut short) is left out; a damaged line before it
    raises ``CorruptFileError`` naming the line.
    """
    return read_jsonl(os.path.join(workdir, METRICS_FILE))[0]


class MetricsWriter:
    """Appends one row per epoch to ``metrics.jsonl`` and to TensorBoard.

    On resume, rows of epochs after the restored checkpoint (written by the
    interrupted run) and a torn last line are dropped first (the file is then
    rewritten atomically), so the file matches an uninterrupted run; when
    nothing is to be dropped the file is not touched. Each row is appended
    with one write (``append_line``).
    """

    def __init__(self, workdir: str, *, resume_epoch: int = 0, tensorboard: bool = True):
        self.path = os.path.join(workdir, METRICS_FILE)
        rows, torn = read_jsonl(self.path)
        keep = [r for r in rows if r.get("epoch", 0) <= resume_epoch]
        if torn:
            warn(f"{self.path}: dropped a torn last line (a write was cut short).")
        if len(keep) < len(rows):
            warn(
                f"{self.path}: dropped the rows of epochs after {resume_epoch} (written after the "
                "checkpoint the run resumes from)."
            )
        if torn or len(keep) < len(rows):
            with atomic_write(self.path) as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
        recorded = {r.get("epoch") for r in keep}
        missing = [e for e in range(1, resume_epoch + 1) if e not in recorded]
        if missing:
            warn(
                f"{self.path} has no rows for {len(missing)} epoch(s) between {missing[0]} and "
                f"{missing[-1]}; the run goes on, those rows are missing from this file."
            )
        self._tensorboard = tensorboard
        self._workdir = workdir
        self._tb = None

    def _open_tensorboard(self) -> None:
        # Opened at the first row, so that a run that writes no row creates no event file.
        self._tensorboard = False
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            logging.warning("tensorboardX is not installed; TensorBoard logging is off.")
        else:
            self._tb = SummaryWriter(os.path.join(self._workdir, "tensorboard"))

    def write(self, row: dict) -> None:
        """Appends ``row`` (must contain ``epoch``); numbers also go to TensorBoard."""
        append_line(self.path, json.dumps(row))
        if self._tensorboard:
            self._open_tensorboard()
        if self._tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, row["epoch"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def plot_learning_curves(rows: Sequence[dict], path: str, title: str = "") -> str:
    """Saves a PNG of accuracies (train on its labels, test) and losses per epoch.

    Args:
      rows: metric rows as from ``read_metrics``.
      path: output PNG path.
      title: figure title (e.g. the experiment name).

    Returns:
      ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    series = [
        ("train_natural_accuracy", "train natural", "C0", "-"),
        ("train_pgd_accuracy", "train robust (PGD)", "C0", "--"),
        ("test_natural_accuracy", "test natural", "C1", "-"),
        ("test_pgd_accuracy", "test robust (PGD)", "C1", "--"),
        ("train_accuracy", "train batches (trained-on inputs)", "C2", ":"),
    ]
    for key, label, color, style in series:
        pts = [(r["epoch"], 100 * r[key]) for r in rows if key in r]
        if pts:
            ax_acc.plot(*zip(*pts, strict=True), style, color=color, label=label, marker=".")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_ylim(0, 100)
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    for key, label in (("train_loss", "train loss"), ("test_pgd_loss", "test robust loss")):
        pts = [(r["epoch"], r[key]) for r in rows if key in r]
        if pts:
            ax_loss.plot(*zip(*pts, strict=True), label=label, marker=".")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
