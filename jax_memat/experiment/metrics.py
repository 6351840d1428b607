"""Per-epoch metrics: a JSON-lines file, TensorBoard, and learning-curve plots."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from absl import logging

from jax_memat.experiment.workdir import METRICS_FILE, append_line, atomic_write, read_jsonl, warn

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


_METHODS = {"pgd_at": "PGD-AT", "trades": "TRADES", "standard": "Standard"}
_NORMS = {"linf": "L-inf", "l2": "L2"}
# Accuracy axis: this many points of room around the plotted values.
_ACCURACY_MARGIN = 5.0


def _field(config: Any, dotted: str, default: Any = None) -> Any:
    """``config.a.b`` for a ConfigDict or a dict as saved in ``config.json``."""
    value = config
    for name in dotted.split("."):
        try:
            value = value[name]
        except (KeyError, TypeError, IndexError):
            return default
    return value


def format_eps(eps: float) -> str:
    """A radius as people write it: ``k/255`` when it is one, else a short decimal.

    Args:
      eps: the attack radius.

    Returns:
      e.g. ``"8/255"`` for ``8 / 255``, ``"0.1"`` for ``0.1``.

    Example:
      >>> format_eps(8 / 255), format_eps(0.5)
      ('8/255', '0.5')
    """
    k = round(eps * 255)
    if 1 <= k < 255 and math.isclose(eps * 255, k, rel_tol=1e-6):
        return f"{k}/255"
    return f"{eps:.4g}"


def describe_run(config: Any) -> dict[str, str]:
    """The names a table or a figure shows for a run.

    Args:
      config: a ConfigDict or the dict of ``config.json``.

    Returns:
      ``{"method", "model", "dataset", "threat"}``, e.g. ``"PGD-AT+TE"``,
      ``"preact_resnet18"`` (``"WRN-34-10"`` for a WideResNet), ``"cifar10"``,
      ``"L-inf eps 8/255"``.

    Example:
      >>> from jax_memat.experiment import default_config
      >>> describe_run(default_config())["threat"]
      'L-inf eps 8/255'
    """
    objective = str(_field(config, "objective.name", "?"))
    method = _METHODS.get(objective, objective)
    if _field(config, "te.enabled", False):
        method += "+TE"
    model = str(_field(config, "model.name", "?"))
    if model == "wide_resnet":
        model = f"WRN-{_field(config, 'model.depth')}-{_field(config, 'model.width')}"
    norm, eps = _field(config, "attack.norm"), _field(config, "attack.eps")
    threat = f"{_NORMS.get(norm, norm)} eps {format_eps(eps)}" if eps is not None else ""
    return {
        "method": method,
        "model": model,
        "dataset": str(_field(config, "dataset.name", "?")),
        "threat": threat,
    }


def figure_title(title: str = "", config: Any = None) -> str:
    """``title`` (e.g. the workdir name) followed by the run's description.

    Args:
      title: a free-form prefix; may be empty.
      config: the run's config (ConfigDict or dict) or None.

    Returns:
      e.g. ``"c10_te: PGD-AT+TE · preact_resnet18 · cifar10 · L-inf eps 8/255"``.

    Example:
      >>> from jax_memat.experiment import default_config
      >>> figure_title("run", default_config())
      'run: PGD-AT · preact_resnet18 · cifar10 · L-inf eps 8/255'
    """
    if config is None:
        return title
    d = describe_run(config)
    description = " · ".join(v for v in (d["method"], d["model"], d["dataset"], d["threat"]) if v)
    return f"{title}: {description}" if title else description


def curve_labels(config: Any = None) -> dict[str, str]:
    """Legend labels of the learning curves, keyed by metric name.

    The per-epoch attacks are named with their steps (``PGD-10``) when the
    config gives them (``eval.pgd_steps``); the training loss and accuracy
    say what they are measured on.

    Args:
      config: the run's config (ConfigDict or dict) or None.

    Returns:
      ``{metric key: label}`` for the accuracy and the loss keys of the rows.

    Example:
      >>> curve_labels({"eval": {"pgd_steps": 10}})["test_pgd_accuracy"]
      'test robust (PGD-10)'
    """
    steps = _field(config, "eval.pgd_steps")
    pgd, cw = (f"PGD-{steps}", f"CW-{steps}") if steps else ("PGD", "CW")
    objective = _field(config, "objective.name")
    method = describe_run(config)["method"] + " " if objective else ""
    inputs = "natural" if objective == "standard" else "adversarial"
    noisy = ", noisy labels" if (_field(config, "dataset.label_noise") or 0) > 0 else ""
    return {
        "train_natural_accuracy": "train natural" + (f" ({noisy[2:]})" if noisy else ""),
        "train_pgd_accuracy": f"train robust ({pgd}{noisy})",
        "train_cw_accuracy": f"train robust ({cw}{noisy})",
        "test_natural_accuracy": "test natural",
        "test_pgd_accuracy": f"test robust ({pgd})",
        "test_cw_accuracy": f"test robust ({cw})",
        "train_accuracy": f"trained-on {inputs} batches",
        "train_loss": f"train loss ({method}objective on the trained-on {inputs} batches)",
        "train_natural_loss": "train natural loss (cross-entropy)",
        "train_pgd_loss": f"train robust loss ({pgd} cross-entropy)",
        "test_natural_loss": "test natural loss (cross-entropy)",
        "test_pgd_loss": f"test robust loss ({pgd} cross-entropy)",
    }


def accuracy_limits(
    values: Sequence[float], margin: float = _ACCURACY_MARGIN
) -> tuple[float, float]:
    """Y-axis limits (in %) that fit the plotted accuracies with some room.

    Args:
      values: the plotted accuracies, in percent.
      margin: points of room below the lowest and above the highest value.

    Returns:
      ``(low, high)`` within ``[0, 100]``; ``(0, 100)`` when there is nothing
      to plot.

    Example:
      >>> accuracy_limits([42.0, 61.5])
      (37.0, 66.5)
    """
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 100.0
    return max(0.0, min(finite) - margin), min(100.0, max(finite) + margin)


# (key, color, line style): train in blue, test in orange, the trained-on
# batches in green; natural solid, PGD dashed, CW dash-dotted.
_ACCURACY_CURVES = (
    ("train_natural_accuracy", "C0", "-"),
    ("train_pgd_accuracy", "C0", "--"),
    ("train_cw_accuracy", "C0", "-."),
    ("test_natural_accuracy", "C1", "-"),
    ("test_pgd_accuracy", "C1", "--"),
    ("test_cw_accuracy", "C1", "-."),
    ("train_accuracy", "C2", ":"),
)
_LOSS_CURVES = (
    ("train_loss", "C2", ":"),
    ("train_natural_loss", "C0", "-"),
    ("train_pgd_loss", "C0", "--"),
    ("test_natural_loss", "C1", "-"),
    ("test_pgd_loss", "C1", "--"),
)


def _marks(points: Sequence) -> dict:
    """Dots on each epoch of short curves; long ones read better as plain lines."""
    return {"marker": "."} if len(points) <= 60 else {}


def plot_learning_curves(
    rows: Sequence[dict], path: str, title: str = "", config: Any = None
) -> str:
    """Saves a PNG of accuracies and losses per epoch (train on its labels, test).

    Args:
      rows: metric rows as from ``read_metrics``.
      path: output PNG path (written atomically).
      title: figure title prefix (e.g. the workdir name).
      config: the run's config (a ConfigDict, or the dict of ``config.json``);
        when given, the title names the method, model, dataset and threat
        model, and the legend the number of PGD steps.

    Returns:
      ``path``.

    Example:
      >>> rows = read_metrics("workdirs/quickstart")
      >>> with open("workdirs/quickstart/config.json") as f:
      ...     config = json.load(f)
      >>> plot_learning_curves(rows, "curves.png", "quickstart", config)
      'curves.png'
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels = curve_labels(config)
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 5.6))
    plotted = []
    for key, color, style in _ACCURACY_CURVES:
        pts = [(r["epoch"], 100 * r[key]) for r in rows if key in r]
        if pts:
            plotted += [v for _, v in pts]
            ax_acc.plot(
                *zip(*pts, strict=True), style, color=color, label=labels[key], **_marks(pts)
            )
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_ylim(*accuracy_limits(plotted))
    for key, color, style in _LOSS_CURVES:
        pts = [(r["epoch"], r[key]) for r in rows if key in r]
        if pts:
            ax_loss.plot(
                *zip(*pts, strict=True), style, color=color, label=labels[key], **_marks(pts)
            )
    ax_loss.set_ylabel("loss")
    for ax in (ax_acc, ax_loss):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        # Below the panel, so it never hides a curve.
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    full_title = figure_title(title, config)
    if full_title:
        fig.suptitle(full_title)
    fig.tight_layout()
    try:
        with atomic_write(path, "wb") as f:  # a reader never sees half a file
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)
    return path
