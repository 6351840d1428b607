"""The analysis entry point end to end on a tiny run, and its errors before any work."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jax_memat.analysis import load_records, read_hard_examples
from jax_memat.analysis.reports import analyze
from jax_memat.experiment import train_and_evaluate
from tests.test_run import REPO, snapshot, tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("analyze") / "run")
    config = tiny_config(epochs=3)
    config.eval.num_train_examples = -1  # every training example is recorded
    train_and_evaluate(config, workdir)
    return workdir


def test_cli_writes_the_memorization_report(run):
    cmd = [sys.executable, "-m", "jax_memat.analyze", "memorization", f"--workdir={run}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = os.path.join(run, "analysis")
    with open(os.path.join(out, "memorization.json")) as f:
        summary = json.load(f)
    assert os.path.getsize(os.path.join(out, "memorization.png")) > 10_000
    records = load_records(run, "eval", "train")
    with np.load(os.path.join(run, "labels.npz")) as labels:
        assert summary["num_corrupted"] == int(labels["changed"].sum())
    assert summary["num_examples"] == 96 and summary["epochs"] == [1, 2, 3]
    assert summary["robustly_fit_at_end"] == pytest.approx(records["pgd_correct"][-1].mean())
    hard = read_hard_examples(os.path.join(out, "hard_examples.json"))
    assert len(hard.indices) == summary["hard_examples"]["count"] == 10  # 10% of 96, rounded
    # The same function from a notebook gives the same summary.
    assert analyze("memorization", run, str(os.path.join(run, "again"))) == summary


@pytest.mark.parametrize(
    "args,code,fragment",
    [
        (["nope"], 2, "Unknown analysis 'nope'; accepted: memorization"),
        ([], 2, "name one analysis"),
        (["memorization", "--fraction=0"], 2, "fraction must be in (0, 1]"),
    ],
)
def test_cli_errors(run, args, code, fragment):
    before = snapshot(run)
    cmd = [sys.executable, "-m", "jax_memat.analyze", *args, f"--workdir={run}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(run) == before


def test_missing_workdir_and_missing_records(tmp_path):
    cmd = [sys.executable, "-m", "jax_memat.analyze", "memorization"]
    proc = subprocess.run(
        [*cmd, f"--workdir={tmp_path / 'none'}"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 3 and "holds no training run" in proc.stderr
    config = tiny_config(epochs=1)
    config.eval.save_per_example = False
    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir)
    with pytest.raises(FileNotFoundError, match="save_per_example"):
        analyze("memorization", workdir)
