"""Small-scale check of "memorization causes robust overfitting", on a 2-core CPU.

Dong et al., *Exploring Memorization in Adversarial Training* (ICLR 2022),
Sec. 4: after the learning-rate decay, PGD-AT fits the hard adversarial
examples of its training set (here, the mislabeled ones) and its robust test
accuracy drops. This script runs the same Fashion-MNIST PGD-AT setting as
experiments/te_demo.py with every per-example record, ranks the training
examples by adversarial loss at the best-robust-accuracy epoch, and retrains
three times: without the hardest ``--fraction`` of them; with them kept but
given the uniform soft target (``objective.soft_label_examples``); and, as a
control, without as many examples drawn at random.

  python experiments/memorization_demo.py --out-dir workdirs/memorization_demo

Writes the four workdirs, the two lists (``hard.json``, ``random.json``),
``summary.json``, ``loss_distributions.png`` and ``robust_test_accuracy.png``
(PGD test accuracy over epochs, one curve per run) in ``--out-dir``, and
prints the tables of docs/memorization.md. Finished runs are not trained again.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.te_demo import demo_config  # noqa: E402
from jax_memat.analysis import (  # noqa: E402
    NEVER_LEARNED,
    forgetting_events,
    hard_examples,
    learning_time,
    load_records,
    lr_decay_epochs,
    plot_loss_distributions,
    write_hard_examples,
)
from jax_memat.experiment import read_metrics, train_and_evaluate  # noqa: E402
from jax_memat.experiment.workdir import write_json  # noqa: E402
from jax_memat.fileio import atomic_write  # noqa: E402


def _accuracies(report: dict) -> dict:
    best, final = report["best"], report["final"]
    return {
        "best_epoch": best["epoch"],
        "best_pgd": 100 * best["test_pgd_accuracy"],
        "final_pgd": 100 * final["test_pgd_accuracy"],
        "best_natural": 100 * best["test_natural_accuracy"],
        "final_natural": 100 * final["test_natural_accuracy"],
        "gap_pgd": 100 * (final["test_pgd_accuracy"] - best["test_pgd_accuracy"]),
    }


def _memorization(records, hard) -> dict:
    """How the run fits its corrupted and clean training examples over time."""
    correct = records["pgd_correct"]
    best = records.epoch_position(records.best_epoch)
    groups = {"corrupted": records.corrupted, "clean": ~records.corrupted}
    learned_at = learning_time(correct, records.epochs)
    forgotten = forgetting_events(correct)
    decay = records.lr_decay_epochs[0] if records.lr_decay_epochs else None
    out = {"hard": hard.summary, "hard_epoch": hard.epoch}
    for name, members in groups.items():
        times = learned_at[members]
        learned = times != NEVER_LEARNED
        out[name] = {
            "count": int(members.sum()),
            "pgd_train_accuracy_at_best": 100 * float(correct[best, members].mean()),
            "pgd_train_accuracy_final": 100 * float(correct[-1, members].mean()),
            "fraction_learned": float(learned.mean()),
            "fraction_learned_after_first_decay": (
                float((times[learned] > decay).mean()) if decay and learned.any() else None
            ),
            "mean_forgetting_events": float(forgotten[members].mean()),
        }
    return out


LABELS = {
    "pgd_at": "PGD-AT, all examples",
    "without_hard": "without the hard examples",
    "soft_hard": "hard examples with uniform soft targets",
    "without_random": "without as many random examples",
}


def plot_robust_test_accuracy(workdirs: dict[str, str], path: str) -> None:
    """PGD test accuracy over epochs, one curve per run, the learning-rate decays marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, workdir) in enumerate(workdirs.items()):
        rows = [r for r in read_metrics(workdir) if "test_pgd_accuracy" in r]
        ax.plot(
            [r["epoch"] for r in rows],
            [100 * r["test_pgd_accuracy"] for r in rows],
            color=f"C{i}",
            label=LABELS.get(name, name),
        )
    for epoch in lr_decay_epochs(read_metrics(workdirs["pgd_at"])):
        ax.axvline(epoch, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("epoch (dotted: learning-rate decay)")
    ax.set_ylabel("robust test accuracy, PGD (%)")
    ax.set_title("Robust overfitting with and without the hard examples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="workdirs/memorization_demo")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--num-train", type=int, default=500)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--label-noise", type=float, default=0.2)
    parser.add_argument("--fraction", type=float, default=0.1, help="share of examples left out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)

    base = demo_config(
        te=False,
        epochs=args.epochs,
        num_train=args.num_train,
        num_test=args.num_test,
        seed=args.seed,
        label_noise=args.label_noise,
        eps=0.05,
        weight_decay=0.0,
    )
    base.record.train_per_example = True
    workdirs = {"pgd_at": os.path.join(args.out_dir, "pgd_at")}
    print(f"== {workdirs['pgd_at']}", flush=True)
    reports = {"pgd_at": train_and_evaluate(base, workdirs["pgd_at"])}

    records = load_records(workdirs["pgd_at"], "eval", "train")
    hard = hard_examples(records, fraction=args.fraction)
    lists = {"without_hard": os.path.join(args.out_dir, "hard.json")}
    write_hard_examples(lists["without_hard"], hard.original_index, hard.meta)
    rng = np.random.default_rng(args.seed)
    drawn = rng.choice(records.num_source_examples, size=hard.index.size, replace=False)
    lists["without_random"] = os.path.join(args.out_dir, "random.json")
    write_hard_examples(
        lists["without_random"],
        drawn,
        {**hard.meta, "quantity": None, "selection": f"random, seed {args.seed}"},
    )
    plot_loss_distributions(
        records,
        os.path.join(args.out_dir, "loss_distributions.png"),
        hard=hard,
        title=f"PGD-AT, Fashion-MNIST {args.num_train}, {args.label_noise:.0%} label noise",
    )

    retrain = {
        "without_hard": ("dataset", "exclude_examples", lists["without_hard"]),
        "soft_hard": ("objective", "soft_label_examples", lists["without_hard"]),
        "without_random": ("dataset", "exclude_examples", lists["without_random"]),
    }
    for name, (section, field, path) in retrain.items():
        config = copy.deepcopy(base)
        config[section][field] = path
        workdirs[name] = os.path.join(args.out_dir, name)
        print(f"== {workdirs[name]}", flush=True)
        reports[name] = train_and_evaluate(config, workdirs[name])

    summary = {
        "runs": {name: _accuracies(report) for name, report in reports.items()},
        "memorization": _memorization(records, hard),
        "random_overlap": int(np.isin(drawn, np.flatnonzero(records.corrupted)).sum()),
    }
    plot_robust_test_accuracy(workdirs, os.path.join(args.out_dir, "robust_test_accuracy.png"))
    write_json(os.path.join(args.out_dir, "summary.json"), summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
