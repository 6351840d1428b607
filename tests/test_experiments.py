"""The experiment scripts turn workdirs into the paper's table and figure."""

import csv
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import te_table  # noqa: E402
from jax_memat.training import train_and_evaluate  # noqa: E402
from tests.test_run import tiny_config  # noqa: E402


def test_te_table_collects_runs(tmp_path, capsys):
    workdirs = []
    for te in (False, True):
        workdir = str(tmp_path / ("te" if te else "plain"))
        train_and_evaluate(tiny_config(epochs=3, te=te), workdir)
        workdirs.append(workdir)
    # What `python -m jax_memat.evaluate --attack=autoattack` writes (its robust_accuracy).
    os.makedirs(os.path.join(workdirs[1], "eval"))
    for which, acc in (("best", 0.25), ("final", 0.2)):
        with open(os.path.join(workdirs[1], "eval", f"{which}_autoattack_test.json"), "w") as f:
            json.dump({"robust_accuracy": acc}, f)
    os.makedirs(tmp_path / "unfinished")
    out = str(tmp_path / "table" / "main")
    te_table.main([*workdirs, str(tmp_path / "unfinished"), "--out", out])
    assert "skipping" in capsys.readouterr().err
    for ext in (".md", ".csv", ".png"):
        assert os.path.getsize(out + ext) > 0
    with open(out + ".csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["PGD-AT", "PGD-AT+TE"]
    for row, workdir in zip(rows, workdirs, strict=True):
        with open(os.path.join(workdir, "final_report.json")) as f:
            report = json.load(f)
        for name, key in (("PGD", "test_pgd_accuracy"), ("CW", "test_cw_accuracy")):
            best, final = 100 * report["best"][key], 100 * report["final"][key]
            assert float(row[f"best_{name}"]) == pytest.approx(best)
            assert float(row[f"diff_{name}"]) == pytest.approx(final - best)
    assert "best_AA" not in rows[0] or rows[0]["best_AA"] == ""
    assert float(rows[1]["best_AA"]) == pytest.approx(25.0)
    assert float(rows[1]["diff_AA"]) == pytest.approx(-5.0)
    with open(out + ".md") as f:
        md = f.read()
    assert "Final-Best PGD-3" in md.splitlines()[0]
    assert md.count("\n") == 4  # header, rule, two runs


def test_te_table_rejects_no_finished_runs(tmp_path):
    with pytest.raises(SystemExit, match="No finished runs"):
        te_table.main([str(tmp_path), "--out", str(tmp_path / "x")])
