"""A per-epoch figure of the gradient statistics a run recorded (``GradStats``)."""

from __future__ import annotations

from collections.abc import Sequence

from jax_memat.analysis.grad_stats import NORM_QUANTILES
from jax_memat.fileio import atomic_write

GRAD_PLOT_FILE = "gradient_stats.png"


def _series(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of the rows holding a number for ``key`` (null and missing skipped)."""
    points = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
    return [e for e, _ in points], [float(v) for _, v in points]


def _save_png(fig, path: str) -> None:
    """Writes ``fig`` to ``path`` atomically (no reader sees half a file)."""
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)


def plot_gradient_stats(rows: Sequence[dict], path: str, title: str = "") -> str:
    """Saves a PNG of the gradient statistics per epoch, from metric rows.

    Five panels: the global gradient norm (mean of ``||g_t||`` and
    ``sqrt`` of the mean ``||g_t||^2``), the cosines (consecutive gradients,
    and examples with the batch mean), the noise scale ``B_simple``, the
    per-example gradient norms (median, interquartile band, min and max) and
    the smoothness ratio. A panel whose values the rows do not hold says so.

    Args:
      rows: metric rows as from ``jax_memat.experiment.read_metrics`` (one per
        epoch; the ``grad_*`` keys come from a run with ``grad_stats`` on).
      path: the PNG to write (atomically: a temporary file, then a rename).
      title: a title for the figure (e.g. the run's name).

    Returns:
      ``path``.

    Raises:
      ValueError: no row holds any gradient statistic.

    Example:
      >>> plot_gradient_stats(read_metrics("workdirs/trades_random"), "grads.png", "TRADES")
      'grads.png'
    """
    rows = [r for r in rows if "epoch" in r]
    if not any(_series(rows, k)[0] for k in ("grad_norm", "grad_norm_sq")):
        raise ValueError(
            "The rows hold no gradient statistics (grad_norm or grad_norm_sq); train with "
            "grad_stats.every_steps > 0 to record them."
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(24, 4.6))
    ax_norm, ax_cos, ax_noise, ax_examples, ax_smooth = axes

    def empty(ax, what: str) -> None:
        ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes)

    epochs, norm = _series(rows, "grad_norm")
    if epochs:
        ax_norm.plot(epochs, norm, label="mean ||g||")
    epochs, norm_sq = _series(rows, "grad_norm_sq")
    if epochs:
        ax_norm.plot(epochs, [v**0.5 for v in norm_sq], "--", label="sqrt(mean ||g||^2)")
    ax_norm.set_yscale("log")
    ax_norm.set_title("global gradient norm")
    ax_norm.legend()

    drawn = False
    for key, label in (
        ("grad_cosine_prev", "cos(g_t, g_t-1)"),
        ("grad_example_cosine_mean", "mean_i cos(g_i, g)"),
    ):
        epochs, values = _series(rows, key)
        if epochs:
            ax_cos.plot(epochs, values, label=label)
            drawn = True
    ax_cos.axhline(0.0, color="gray", lw=0.5)
    ax_cos.set_title("gradient cosines")
    if drawn:
        ax_cos.legend()
    else:
        empty(ax_cos, "cosine")

    epochs, values = _series(rows, "grad_noise_scale")
    if epochs:
        ax_noise.plot(epochs, values)
        if all(v > 0 for v in values):
            ax_noise.set_yscale("log")
    else:
        empty(ax_noise, "noise scale")
    ax_noise.set_title("noise scale B_simple = tr(Sigma) / |G|^2")

    quantiles = {name: _series(rows, name) for name, _ in NORM_QUANTILES}
    e_med, median = quantiles["grad_example_norm_median"]
    if e_med:
        e_lo, q25 = quantiles["grad_example_norm_q25"]
        e_hi, q75 = quantiles["grad_example_norm_q75"]
        if e_lo == e_hi == e_med:
            ax_examples.fill_between(e_med, q25, q75, alpha=0.3, label="q25-q75")
        ax_examples.plot(e_med, median, label="median")
        for name, style in (("grad_example_norm_min", ":"), ("grad_example_norm_max", ":")):
            e, v = quantiles[name]
            ax_examples.plot(e, v, style, color="gray", label=name.rsplit("_", 1)[1])
        ax_examples.set_yscale("log")
        ax_examples.legend()
    else:
        empty(ax_examples, "per-example norm")
    ax_examples.set_title("per-example gradient norms")

    epochs, values = _series(rows, "grad_smoothness")
    if epochs:
        ax_smooth.plot(epochs, values)
        if all(v > 0 for v in values):
            ax_smooth.set_yscale("log")
    else:
        empty(ax_smooth, "smoothness")
    ax_smooth.set_title("||g(t+1) - g(t)|| / ||theta(t+1) - theta(t)||")

    for ax in axes:
        ax.set_xlabel("epoch")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        _save_png(fig, path)
    finally:
        plt.close(fig)
    return path
