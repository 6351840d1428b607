"""Collects training workdirs into the paper's main table (Best / Final) and a figure.

  python experiments/te_table.py workdirs/c10_* --out docs/te_table

writes ``<out>.md`` (Markdown), ``<out>.csv`` and ``<out>.png`` (robust test
accuracy per epoch, with and without TE, one panel per dataset/model/objective).
Each workdir needs ``config.json``, ``metrics.jsonl`` and ``final_report.json``
(written at the end of every run). Columns: natural, PGD-k and CW accuracy on
the test set for the Best checkpoint (highest per-epoch PGD test accuracy) and
the Final one, and Final minus Best. AutoAttack columns appear for runs
evaluated with ``python -m jax_memat.evaluate --attack=autoattack
--checkpoint=best`` (and ``--checkpoint=final``), which write
``<workdir>/eval/{best,final}_autoattack_test.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jax_memat.training.metrics import read_metrics  # noqa: E402

METRICS = (
    ("natural", "test_natural_accuracy"),
    ("PGD", "test_pgd_accuracy"),
    ("CW", "test_cw_accuracy"),
    ("AA", "test_autoattack_accuracy"),
)


def describe(config: dict) -> dict:
    """Dataset, model and method names of a run, as the table prints them."""
    model = config["model"]["name"]
    if model == "wide_resnet":
        model = f"WRN-{config['model']['depth']}-{config['model']['width']}"
    method = {"pgd_at": "PGD-AT", "trades": "TRADES", "standard": "Standard"}.get(
        config["objective"]["name"], config["objective"]["name"]
    )
    if config.get("te", {}).get("enabled"):
        method += "+TE"
    return {"dataset": config["dataset"]["name"], "model": model, "method": method}


def collect(workdirs: list[str]) -> list[dict]:
    """One row per finished workdir (skipping, with a warning, unfinished ones)."""
    rows = []
    for wd in workdirs:
        paths = [os.path.join(wd, f) for f in ("config.json", "final_report.json")]
        if not all(os.path.exists(p) for p in paths):
            print(f"skipping {wd}: no final_report.json (unfinished run?)", file=sys.stderr)
            continue
        with open(paths[0]) as f:
            config = json.load(f)
        with open(paths[1]) as f:
            report = json.load(f)
        row = {"workdir": wd, **describe(config), "pgd_steps": report["pgd_steps"]}
        row["best_epoch"], row["final_epoch"] = report["best"]["epoch"], report["final"]["epoch"]
        for which in ("best", "final"):
            path = os.path.join(wd, "eval", f"{which}_autoattack_test.json")
            if os.path.exists(path):
                with open(path) as f:
                    report[which]["test_autoattack_accuracy"] = json.load(f)["robust_accuracy"]
        for name, key in METRICS:
            if key in report["final"] and key in report["best"]:
                best, final = 100 * report["best"][key], 100 * report["final"][key]
                row[f"best_{name}"], row[f"final_{name}"] = best, final
                row[f"diff_{name}"] = final - best
        row["curve"] = [
            (r["epoch"], 100 * r["test_pgd_accuracy"])
            for r in read_metrics(wd)
            if "test_pgd_accuracy" in r
        ]
        rows.append(row)
    return rows


def to_markdown(rows: list[dict]) -> str:
    names = [n for n, _ in METRICS if any(f"best_{n}" in r for r in rows)]
    k = rows[0]["pgd_steps"] if rows else 20
    label = {"PGD": f"PGD-{k}"}
    head = ["dataset", "model", "method"]
    head += [f"Best {label.get(n, n)}" for n in names] + [f"Final {label.get(n, n)}" for n in names]
    head += [f"Final-Best {label.get(n, n)}" for n in names if n != "natural"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["dataset"], r["model"], r["method"]]
        cells += [f"{r[f'best_{n}']:.2f}" if f"best_{n}" in r else "-" for n in names]
        cells += [f"{r[f'final_{n}']:.2f}" if f"final_{n}" in r else "-" for n in names]
        cells += [
            f"{r[f'diff_{n}']:+.2f}" if f"diff_{n}" in r else "-" for n in names if n != "natural"
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: str) -> None:
    fields = [k for k in rows[0] if k != "curve"] if rows else []
    for r in rows:
        fields += [k for k in r if k not in fields and k != "curve"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: v for k, v in r.items() if k != "curve"})


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["model"], r["method"].removesuffix("+TE"))].append(r)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, ((dataset, model, method), runs) in zip(axes[0], sorted(groups.items()), strict=True):
        for r in sorted(runs, key=lambda r: r["method"]):
            if r["curve"]:
                ax.plot(*zip(*r["curve"], strict=True), label=r["method"], marker=".", ms=3)
                ax.axvline(r["best_epoch"], ls=":", lw=0.8, color=ax.get_lines()[-1].get_color())
        ax.set_title(f"{dataset} {model} {method}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("robust test accuracy (%, per-epoch PGD)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--out", required=True, help="output prefix (.md, .csv, .png added)")
    args = parser.parse_args(argv)
    rows = collect(args.workdirs)
    if not rows:
        sys.exit("No finished runs among the workdirs given.")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    md = to_markdown(rows)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    write_csv(rows, args.out + ".csv")
    plot(rows, args.out + ".png")
    print(md)
    print(f"wrote {args.out}.md, {args.out}.csv, {args.out}.png")


if __name__ == "__main__":
    main()
