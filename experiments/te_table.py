"""Collects training workdirs into the paper's main table (Best / Final) and a figure.

  python experiments/te_table.py workdirs/c10_* --out docs/te_table

writes ``<out>.md`` (Markdown), ``<out>.csv`` and ``<out>.png`` (robust test
accuracy per epoch, with and without TE, one panel per dataset/model/objective).
Each workdir needs ``config.json``, ``metrics.jsonl`` and ``final_report.json``
(written at the end of every run). Columns: natural, PGD-k and CW-k accuracy
(%) on the test set for the Best checkpoint (highest per-epoch PGD test
accuracy) and the Final one, and Final minus Best; then AutoAttack (AA) from
``<workdir>/eval/{best,final}_autoattack_test.json``, which
``python -m jax_memat.evaluate --attack=autoattack --checkpoint=best`` (or
``final``) writes. What is missing shows as "—" with a footnote saying which
file is missing and the command that makes it. Every number says on how many
test images it was measured (``n``, in the column header when the whole
column shares it, else in the cell): the final report covers the run's
evaluation set, AutoAttack the ``num_examples`` of its JSON.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import sys
import tempfile
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jax_memat.experiment.metrics import describe_run, read_metrics  # noqa: E402

# (column name, key in final_report.json); AA comes from the evaluate JSONs.
REPORT_METRICS = (
    ("natural", "test_natural_accuracy"),
    ("PGD", "test_pgd_accuracy"),
    ("CW", "test_cw_accuracy"),
)
NAMES = (*(n for n, _ in REPORT_METRICS), "AA")
MISSING = "—"
DECIMALS = 2  # accuracies in %; 0.01 points is one image in 10,000


def describe(config: dict) -> dict:
    """Dataset, model and method names of a run, as the table prints them."""
    d = describe_run(config)
    return {"dataset": d["dataset"], "model": d["model"], "method": d["method"]}


def _percent(fraction: float) -> float:
    return round(100 * fraction, DECIMALS)


def _test_points(workdir: str, config: dict) -> int | None:
    """How many test images the final report (and per-epoch evaluation) used.

    The per-example files hold one row per evaluated image; without them the
    config says it unless both limits are -1 (the whole test set, whose size
    only the data knows): then None.
    """
    folder = os.path.join(workdir, "per_example")
    saved = sorted(glob.glob(os.path.join(folder, "test_epoch*.npz")))
    if saved:
        with np.load(saved[-1]) as f:
            return int(f["index"].shape[0])
    limits = [config["eval"]["num_test_examples"], config["dataset"]["num_test_examples"]]
    limits = [n for n in limits if n >= 0]
    return min(limits) if limits else None


def _aa_command(workdir: str, which: str, n: int | None) -> str:
    cmd = (
        f"python -m jax_memat.evaluate --workdir={workdir} --checkpoint={which} --attack=autoattack"
    )
    # The same images as the final report, so the columns compare like with like.
    return cmd + (f" --num_examples={n}" if n is not None else "")


def collect(workdirs: list[str]) -> list[dict]:
    """One row per finished workdir (skipping, with a warning, unfinished ones).

    Args:
      workdirs: training workdirs.

    Returns:
      Rows with the run's names, ``best_<name>``/``final_<name>`` accuracies
      in % (rounded to 2 decimals) for every name in ``NAMES`` that exists,
      ``diff_<name>`` (Final - Best of the rounded values) where both do,
      ``test_points`` (images of the final report, None if unknown),
      ``<which>_AA_points``, ``notes`` (``{column key: [footnote, ...]}``)
      and ``curve`` (per-epoch PGD test accuracy).

    Example:
      >>> rows = collect(["workdirs/c10_pgdat", "workdirs/c10_pgdat_te"])
    """
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
        n = _test_points(wd, config)
        row = {"workdir": wd, **describe(config), "pgd_steps": report["pgd_steps"]}
        row["best_epoch"], row["final_epoch"] = report["best"]["epoch"], report["final"]["epoch"]
        row["test_points"] = n
        notes = defaultdict(list)
        for which in ("best", "final"):
            for name, key in REPORT_METRICS:
                if key in report[which]:
                    row[f"{which}_{name}"] = _percent(report[which][key])
                elif name == "CW":
                    notes[f"{which}_CW"].append(f"no CW in {paths[1]} (final_eval.cw was off)")
            path = os.path.join(wd, "eval", f"{which}_autoattack_test.json")
            if not os.path.exists(path):
                notes[f"{which}_AA"].append(
                    f"{path} is missing; make it with `{_aa_command(wd, which, n)}`"
                )
                continue
            with open(path) as f:
                aa = json.load(f)
            row[f"{which}_AA"] = _percent(aa["robust_accuracy"])
            row[f"{which}_AA_points"] = aa.get("num_examples")
            if aa.get("epoch") is not None and aa["epoch"] != row[f"{which}_epoch"]:
                notes[f"{which}_AA"].append(
                    f"{path} is of epoch {aa['epoch']}, the table's {which.title()} is epoch "
                    f"{row[f'{which}_epoch']} (run the evaluation again)"
                )
            threat = (aa.get("norm"), aa.get("eps"))
            run_threat = (config["attack"]["norm"], config["attack"]["eps"])
            if None not in threat and (
                threat[0] != run_threat[0] or not np.isclose(threat[1], run_threat[1])
            ):
                notes[f"{which}_AA"].append(
                    f"{path} attacks {threat[0]} eps {threat[1]:.4g}, not the run's "
                    f"{run_threat[0]} eps {run_threat[1]:.4g}"
                )
        for name in NAMES:
            if f"best_{name}" in row and f"final_{name}" in row:
                row[f"diff_{name}"] = round(row[f"final_{name}"] - row[f"best_{name}"], DECIMALS)
        row["notes"] = dict(notes)
        row["curve"] = [
            (r["epoch"], 100 * r["test_pgd_accuracy"])
            for r in read_metrics(wd)
            if "test_pgd_accuracy" in r
        ]
        rows.append(row)
    return rows


def points(row: dict, key: str) -> str | None:
    """How many test images the number in column ``key`` was measured on, as text.

    Args:
      row: a row of ``collect``.
      key: ``<which>_<name>`` with ``which`` in best, final, diff.

    Returns:
      e.g. ``"1000"``, ``"all"`` (the whole test set, size unknown here),
      ``"500 vs 1000"`` for a difference of numbers on different sets, or None
      when the cell is empty.

    Example:
      >>> points({"best_PGD": 50.0, "test_points": 1000}, "best_PGD")
      '1000'
    """
    if key not in row:
        return None
    which, name = key.split("_", 1)
    if which == "diff":
        best, final = points(row, f"best_{name}"), points(row, f"final_{name}")
        return best if best == final else f"{best} vs {final}"
    n = row.get(f"{which}_AA_points") if name == "AA" else row.get("test_points")
    return "all" if n is None else str(n)


def to_markdown(rows: list[dict]) -> str:
    """The table, then its footnotes (missing numbers and how to get them).

    Args:
      rows: from ``collect``.

    Returns:
      Markdown text.

    Example:
      >>> print(to_markdown(collect(["workdirs/c10_pgdat"])))
    """
    shown = [n for n in NAMES if n == "AA" or any(f"best_{n}" in r for r in rows)]
    steps = {r["pgd_steps"] for r in rows}
    k = steps.pop() if len(steps) == 1 else "k"
    label = {"PGD": f"PGD-{k}", "CW": f"CW-{k}"}
    keys = [f"best_{n}" for n in shown] + [f"final_{n}" for n in shown]
    keys += [f"diff_{n}" for n in shown if n != "natural"]
    title = {"best": "Best", "final": "Final", "diff": "Final-Best"}
    head, per_cell = ["dataset", "model", "method"], {}
    for key in keys:
        which, name = key.split("_", 1)
        counts = {points(r, key) for r in rows} - {None}
        # The count goes into the header when the whole column shares it.
        per_cell[key] = len(counts) > 1
        n = f" (n={counts.pop()})" if len(counts) == 1 else ""
        head.append(f"{title[which]} {label.get(name, name)}{n}")
    footnotes: list[str] = []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["dataset"], r["model"], r["method"]]
        for key in keys:
            marks = []
            for note in r["notes"].get(key, []):
                if note not in footnotes:
                    footnotes.append(note)
                marks.append(f"[{footnotes.index(note) + 1}]")
            if key in r:
                cell = (
                    f"{r[key]:+.{DECIMALS}f}"
                    if key.startswith("diff")
                    else f"{r[key]:.{DECIMALS}f}"
                )
                if per_cell[key]:
                    cell += f" (n={points(r, key)})"
            else:
                cell = MISSING
            cells.append(" ".join([cell, *marks]))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    whole = any(points(r, key) == "all" for r in rows for key in keys)
    lines.append(
        "Accuracy in % on the first n test images"
        + (" (n=all: the whole test set)" if whole else "")
        + f"; natural, PGD-{k} and CW-{k} from each run's final_report.json, AA (AutoAttack, "
        "standard version) from its eval/*_autoattack_test.json."
    )
    if footnotes:
        lines.append("")
        lines += [f"[{i}] {note}  " for i, note in enumerate(footnotes, 1)]
    return "\n".join(lines) + "\n"


def csv_fields(rows: list[dict]) -> list[str]:
    """CSV columns: the run, then best/final/diff of every name, with AA's counts."""
    fields = ["workdir", "dataset", "model", "method", "pgd_steps", "best_epoch", "final_epoch"]
    fields.append("test_points")
    for name in NAMES:
        if name == "AA" or any(f"best_{name}" in r or f"final_{name}" in r for r in rows):
            fields += [f"best_{name}", f"final_{name}", f"diff_{name}"]
    return fields + ["best_AA_points", "final_AA_points"]


def write_csv(rows: list[dict], path: str) -> None:
    """Writes the rows (accuracies in %, 2 decimals; missing ones empty), atomically."""
    fields = csv_fields(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r[k] for k in fields})
    _write_atomic(path, buffer.getvalue().encode())


def _write_atomic(path: str, data: bytes) -> None:
    """Writes beside ``path`` then renames, so no reader sees half a file."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these are for everyone
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def plot(rows: list[dict], path: str) -> None:
    """Per-epoch PGD test accuracy, one panel per dataset/model/objective, TE or not."""
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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    _write_atomic(path, buffer.getvalue())


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
    _write_atomic(args.out + ".md", md.encode())
    write_csv(rows, args.out + ".csv")
    plot(rows, args.out + ".png")
    print(md)
    print(f"wrote {args.out}.md, {args.out}.csv, {args.out}.png")


if __name__ == "__main__":
    main()
