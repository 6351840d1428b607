"""The random-label study's figure (claims C1 and C2 of Dong et al., ICLR 2022).

One row of panels per run: natural and robust (PGD) accuracy on the training
set *with the labels it was trained on* (noisy or random) and on the test
set; the squared global gradient norm (the quantity the authors' code logs,
averaged over each epoch) and the per-example gradient variance on a log
scale; and the alignment of the gradients (cosine of consecutive update
gradients, mean cosine of per-example gradients with their batch's). The
gradient panels need ``grad_stats.every_steps`` > 0 in the run. Runs are
labelled by method, noise rate and model, read from each workdir's config.

    python experiments/random_labels_figure.py workdirs/rl_pgdat_r1 workdirs/rl_trades_r1 \\
        --out docs/random_labels.png

Writes the PNG and a JSON summary (last-epoch accuracies per run) beside it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from jax_memat.experiment import read_metrics
from jax_memat.experiment.workdir import atomic_write, read_json, write_json


def describe(config: dict) -> str:
    """``"PGD-AT, r=1.0, small_cnn x4"`` from a saved config."""
    method = {"pgd_at": "PGD-AT", "trades": "TRADES", "standard": "standard"}.get(
        config["objective"]["name"], config["objective"]["name"]
    )
    if config["objective"]["name"] == "trades":
        method += f" (beta={config['objective']['beta']:g})"
    if config.get("te", {}).get("enabled"):
        method += "+TE"
    model = config["model"]["name"]
    if model == "wide_resnet":
        model = f"WRN-{config['model']['depth']}-{config['model']['width']}"
    elif model == "small_cnn" and config["model"].get("cnn_width", 1) != 1:
        model += f" x{config['model']['cnn_width']}"
    return f"{method}, r={config['dataset']['label_noise']:g}, {model}"


def summarize(workdir: str) -> dict:
    """Last evaluated epoch's accuracies of one run, and its label."""
    config = read_json(os.path.join(workdir, "config.json"))
    rows = [r for r in read_metrics(workdir) if "train_pgd_accuracy" in r]
    if not rows:
        raise SystemExit(f"error: {workdir} has no evaluated epoch in metrics.jsonl yet.")
    last = rows[-1]
    keys = ("train_natural_accuracy", "train_pgd_accuracy")
    keys += ("test_natural_accuracy", "test_pgd_accuracy")
    return {"workdir": workdir, "label": describe(config), "epoch": last["epoch"]} | {
        k: last[k] for k in keys
    }


def plot(workdirs: list[str], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(workdirs), 3, figsize=(17, 3.6 * len(workdirs)), squeeze=False)
    curves = (
        ("train_natural_accuracy", "train natural (trained-on labels)", "C0", "-"),
        ("train_pgd_accuracy", "train robust (trained-on labels)", "C0", "--"),
        ("test_natural_accuracy", "test natural", "C1", "-"),
        ("test_pgd_accuracy", "test robust", "C1", "--"),
    )

    def series(rows, key, positive=False):
        pts = [
            (r["epoch"], r[key])
            for r in rows
            if isinstance(r.get(key), (int, float))
            and math.isfinite(r[key])
            and (r[key] > 0 or not positive)
        ]
        return list(zip(*pts, strict=True)) if pts else None

    for (ax_acc, ax_norm, ax_cos), workdir in zip(axes, workdirs, strict=True):
        config = read_json(os.path.join(workdir, "config.json"))
        rows = read_metrics(workdir)
        for key, label, color, style in curves:
            pts = [(r["epoch"], 100 * r[key]) for r in rows if key in r]
            if pts:
                ax_acc.plot(*zip(*pts, strict=True), style, color=color, label=label)
        chance = 100 / (100 if config["dataset"]["name"] == "cifar100" else 10)
        ax_acc.axhline(chance, color="grey", lw=0.8, ls=":", label="chance")
        ax_acc.set_ylim(0, 100)
        ax_acc.set_ylabel("accuracy (%)")
        ax_acc.set_title(describe(config), fontsize=10)
        ax_acc.legend(fontsize=7, loc="best")
        # The authors' logged quantity, and the per-example spread where sampled.
        for key, label, color in (
            ("grad_norm_sq", "squared gradient norm (epoch mean)", "C2"),
            ("grad_variance", "per-example gradient variance (sampled)", "C4"),
        ):
            pts = series(rows, key, positive=True)
            if pts:
                ax_norm.plot(*pts, color=color, label=label)
        ax_norm.set_yscale("log")
        ax_norm.set_title("gradient size", fontsize=10)
        ax_norm.legend(fontsize=7, loc="best")
        for key, label, color in (
            ("grad_cosine_prev", "cos(g_t, g_t-1), consecutive steps", "C3"),
            ("grad_example_cosine_mean", "mean cos(g_i, batch gradient), sampled", "C5"),
        ):
            pts = series(rows, key)
            if pts:
                ax_cos.plot(*pts, color=color, label=label)
        ax_cos.axhline(0, color="grey", lw=0.8, ls=":")
        ax_cos.set_ylim(-1, 1)
        ax_cos.set_title("gradient alignment", fontsize=10)
        ax_cos.legend(fontsize=7, loc="best")
        for ax in (ax_acc, ax_norm, ax_cos):
            ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    with atomic_write(out, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="training workdirs (one row each)")
    parser.add_argument("--out", required=True, help="PNG path; the JSON summary goes beside it")
    args = parser.parse_args(argv)
    missing = [w for w in args.workdirs if not os.path.exists(os.path.join(w, "config.json"))]
    if missing:
        print(f"error: not training workdirs (no config.json): {missing}", file=sys.stderr)
        return 2
    summary = [summarize(w) for w in args.workdirs]
    plot(args.workdirs, args.out)
    write_json(os.path.splitext(args.out)[0] + ".json", summary)
    for s in summary:
        print(
            f"{s['label']} (epoch {s['epoch']}): train nat {100 * s['train_natural_accuracy']:.1f}%"
            f" | train robust {100 * s['train_pgd_accuracy']:.1f}% | test nat "
            f"{100 * s['test_natural_accuracy']:.1f}% | test robust "
            f"{100 * s['test_pgd_accuracy']:.1f}%"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
