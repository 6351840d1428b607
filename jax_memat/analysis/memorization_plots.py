"""Figures of the memorization records: per-example loss distributions over epochs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jax_memat.analysis.memorization import (
    HardExamples,
    MemorizationRecords,
    hard_examples,
)
from jax_memat.fileio import atomic_write

# Quartile bands are drawn this transparent, so overlapping groups stay readable.
_BAND_ALPHA = 0.2


def group_quantiles(
    values: np.ndarray, members: np.ndarray, quantiles: Sequence[float] = (0.25, 0.5, 0.75)
) -> np.ndarray:
    """Per-epoch quantiles of ``values`` over one group of examples, ignoring NaN.

    Args:
      values: [E, N] per-example values (NaN where not recorded).
      members: bool [N], the group.
      quantiles: in [0, 1].

    Returns:
      [len(quantiles), E]; NaN at an epoch where no member has a value.

    Example:
      >>> group_quantiles(np.array([[1.0, 2.0, 9.0]]), np.array([True, True, False]), [0.5])
      array([[1.5]])
    """
    values = np.asarray(values, np.float64)[:, np.asarray(members, bool)]
    out = np.full((len(quantiles), values.shape[0]), np.nan)
    has = np.isfinite(values).any(axis=1)
    if has.any():
        out[:, has] = np.nanquantile(values[has], quantiles, axis=1)
    return out


def plot_loss_distributions(
    records: MemorizationRecords,
    path: str,
    *,
    quantity: str | None = None,
    hard: HardExamples | Sequence[int] | None = None,
    title: str = "",
) -> str:
    """Median and quartiles of a per-example loss over epochs, by group; a PNG, written atomically.

    Left panel: examples with a clean vs a corrupted label. Right panel: the
    hard examples vs the others. Dashed lines mark the learning-rate decays,
    a dotted line the best-robust-accuracy epoch: the paper's robust
    overfitting shows as the corrupted / hard examples' loss falling after
    the decay (Dong et al., ICLR 2022, Sec. 4).

    Args:
      records: from ``load_records`` (training split).
      path: the PNG to write.
      quantity: the per-example value to plot; default ``pgd_loss`` (eval
        records) or ``loss`` (train_steps records).
      hard: the hard examples (a ``HardExamples`` or rows of the split);
        default the 10% with the highest ``quantity`` at the best epoch
        (``hard_examples``); the right panel is left out when there is no
        best epoch among the records.
      title: the figure's title.

    Returns:
      ``path``.

    Example:
      >>> records = load_records("workdirs/run")
      >>> plot_loss_distributions(records, "workdirs/run/loss_distributions.png")
      'workdirs/run/loss_distributions.png'
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if quantity is None:
        quantity = "pgd_loss" if records.source == "eval" else "loss"
    values = np.asarray(records[quantity], np.float64)
    if values.dtype.kind != "f" or quantity.endswith("correct"):
        raise ValueError(f"quantity={quantity!r} is not a continuous value; use a loss or margin.")
    if hard is None and records.best_epoch is not None and records.best_epoch in records.epochs:
        hard = hard_examples(records, quantity=quantity)
    panels = [
        (
            "by label",
            [
                ("clean label", ~records.corrupted, "C0"),
                ("corrupted label", records.corrupted, "C3"),
            ],
        )
    ]
    if hard is not None:
        rows = hard.index if isinstance(hard, HardExamples) else np.asarray(hard, np.int64)
        is_hard = np.isin(records.index, rows)
        name = "hard"
        if isinstance(hard, HardExamples):
            name = f"hard ({len(rows)}, top {hard.quantity} at epoch {hard.epoch})"
        panels.append(("hard vs other", [("other", ~is_hard, "C0"), (name, is_hard, "C1")]))

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.6), squeeze=False)
    epochs = records.epochs
    for ax, (panel_title, groups) in zip(axes[0], panels, strict=True):
        for label, members, color in groups:
            if not members.any():
                continue
            q1, median, q3 = group_quantiles(values, members)
            ax.plot(epochs, median, color=color, label=f"{label}: median ({members.sum()})")
            ax.fill_between(epochs, q1, q3, color=color, alpha=_BAND_ALPHA, linewidth=0)
        for i, e in enumerate(records.lr_decay_epochs):
            # A decay after epoch e sits between the points of e and e + 1.
            ax.axvline(
                e + 0.5, color="0.4", ls="--", lw=1, label="learning-rate decay" if not i else None
            )
        if records.best_epoch is not None:
            ax.axvline(records.best_epoch, color="0.2", ls=":", lw=1, label="best epoch")
        ax.set_title(f"{panel_title} (median, 25-75% band)", fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"per-example {quantity} ({records.source}, {records.split})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_write(path, "wb") as f:  # a reader never sees half a file
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)
    return path
