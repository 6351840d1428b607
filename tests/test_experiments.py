"""The experiment scripts turn workdirs into the paper's table and figure."""

import csv
import json
import os
import re
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import te_table  # noqa: E402
from jax_memat.experiment import train_and_evaluate  # noqa: E402
from tests.test_run import tiny_config  # noqa: E402

# tiny_config evaluates the first 40 test images; its attack is L-inf eps 0.1.
TEST_POINTS = 40


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """Two finished tiny runs (PGD-AT, PGD-AT+TE), to be copied by each test."""
    root = tmp_path_factory.mktemp("runs")
    workdirs = []
    for te in (False, True):
        workdir = str(root / ("te" if te else "plain"))
        train_and_evaluate(tiny_config(epochs=3, te=te), workdir)
        workdirs.append(workdir)
    return workdirs


def _copy(workdirs, tmp_path):
    copies = []
    for wd in workdirs:
        copies.append(str(tmp_path / os.path.basename(wd)))
        shutil.copytree(wd, copies[-1])
    return copies


def _report(workdir):
    with open(os.path.join(workdir, "final_report.json")) as f:
        return json.load(f)


def _write_aa(workdir, which, robust_accuracy, num_examples, epoch=None, eps=0.1):
    """What `python -m jax_memat.evaluate --attack=autoattack` writes (the fields used)."""
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    result = {
        "checkpoint": which,
        "epoch": _report(workdir)[which]["epoch"] if epoch is None else epoch,
        "num_examples": num_examples,
        "attack": "autoattack",
        "norm": "linf",
        "eps": eps,
        "robust_accuracy": robust_accuracy,
    }
    with open(os.path.join(workdir, "eval", f"{which}_autoattack_test.json"), "w") as f:
        json.dump(result, f)


def _table(md):
    """Header cells and body rows of the Markdown table, and the footnotes by number."""
    lines = md.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    body = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        body.append(dict(zip(head, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    notes = dict(re.findall(r"^\[(\d+)\] (.*?)\s*$", md, flags=re.M))
    return head, body, notes


def test_te_table_shows_what_exists_and_says_what_is_missing(finished_runs, tmp_path, capsys):
    plain, te = _copy(finished_runs, tmp_path)
    # AutoAttack only for the TE run's Best checkpoint, on half of the test points.
    _write_aa(te, "best", 0.25, num_examples=20)
    os.makedirs(tmp_path / "unfinished")
    out = str(tmp_path / "table" / "main")
    te_table.main([plain, te, str(tmp_path / "unfinished"), "--out", out])
    assert "skipping" in capsys.readouterr().err
    for ext in (".md", ".csv", ".png"):
        assert os.path.getsize(out + ext) > 0
    assert sorted(os.listdir(tmp_path / "table")) == ["main.csv", "main.md", "main.png"]

    with open(out + ".csv") as f:
        text = f.read()
    rows = list(csv.DictReader(text.splitlines()))
    assert [r["method"] for r in rows] == ["PGD-AT", "PGD-AT+TE"]
    # No float noise: every number has at most 2 decimals.
    assert not re.search(r"\d\.\d{3,}", text)
    for row, workdir in zip(rows, (plain, te), strict=True):
        report = _report(workdir)
        assert row["test_points"] == str(TEST_POINTS)
        for name, key in (("PGD", "test_pgd_accuracy"), ("CW", "test_cw_accuracy")):
            best = round(100 * report["best"][key], 2)
            final = round(100 * report["final"][key], 2)
            assert float(row[f"best_{name}"]) == best
            assert float(row[f"diff_{name}"]) == pytest.approx(final - best, abs=1e-9)
    assert rows[0]["best_AA"] == rows[0]["final_AA"] == rows[0]["diff_AA"] == ""
    assert float(rows[1]["best_AA"]) == 25.0 and rows[1]["best_AA_points"] == "20"
    assert rows[1]["final_AA"] == rows[1]["diff_AA"] == rows[1]["final_AA_points"] == ""

    with open(out + ".md") as f:
        md = f.read()
    head, body, notes = _table(md)
    # Counts shared by a whole column go into its header.
    assert "Best PGD-3 (n=40)" in head and "Final-Best CW-3 (n=40)" in head
    assert "Best AA (n=20)" in head
    assert "Final AA" in head and "Final-Best AA" in head  # no number: no count
    assert len(body) == 2
    assert body[1]["Best AA (n=20)"] == "25.00"
    assert body[1]["Final-Best AA"] == "—"
    for row, workdir, missing in ((body[0], plain, ("best", "final")), (body[1], te, ("final",))):
        for which in missing:
            column = next(h for h in head if h.startswith(f"{which.title()} AA"))
            cell = re.fullmatch(r"— \[(\d+)\]", row[column])
            assert cell, row[column]
            note = notes[cell.group(1)]
            assert os.path.join(workdir, "eval", f"{which}_autoattack_test.json") in note
            assert (
                f"`python -m jax_memat.evaluate --workdir={workdir} --checkpoint={which} "
                f"--attack=autoattack --num_examples={TEST_POINTS}`"
            ) in note
    assert len(notes) == 3


def test_te_table_counts_per_cell_and_flags_stale_evaluations(finished_runs, tmp_path):
    plain, te = _copy(finished_runs, tmp_path)
    for workdir, n in ((plain, 40), (te, 20)):
        _write_aa(workdir, "best", 0.3, num_examples=n)
    _write_aa(plain, "final", 0.25, num_examples=40)
    _write_aa(te, "final", 0.2, num_examples=40, epoch=1, eps=0.05)
    rows = te_table.collect([plain, te])
    head, body, notes = _table(te_table.to_markdown(rows))
    # The column mixes 40 and 20 points: each cell says its own.
    assert "Best AA" in head
    assert [r["Best AA"] for r in body] == ["30.00 (n=40)", "30.00 (n=20)"]
    # Final - Best on different point sets says so.
    assert [r["Final-Best AA"] for r in body] == ["-5.00 (n=40)", "-10.00 (n=20 vs 40)"]
    assert "Final AA (n=40)" in head
    cell = re.fullmatch(r"20\.00 \[(\d+)\] \[(\d+)\]", body[1]["Final AA (n=40)"])
    assert cell, body[1]["Final AA"]
    stale, threat = (notes[i] for i in cell.groups())
    assert "epoch 1" in stale and "epoch 3" in stale
    assert "eps 0.05" in threat and "eps 0.1" in threat


def test_te_table_rejects_no_finished_runs(tmp_path):
    with pytest.raises(SystemExit, match="No finished runs"):
        te_table.main([str(tmp_path), "--out", str(tmp_path / "x")])


def test_random_labels_figure(tmp_path):
    import experiments.random_labels_figure as figure
    from jax_memat.experiment import read_metrics

    config = tiny_config(epochs=2)
    config.dataset.label_noise = 1.0
    config.grad_stats.every_steps = 2  # the gradient panels
    workdir = str(tmp_path / "rl")
    train_and_evaluate(config, workdir)
    out = str(tmp_path / "figure.png")
    assert figure.main([workdir, "--out", out]) == 0
    assert os.path.getsize(out) > 10_000
    with open(str(tmp_path / "figure.json")) as f:
        (summary,) = json.load(f)
    last = read_metrics(workdir)[-1]
    assert summary["label"] == "PGD-AT, r=1, small_cnn"
    assert summary["epoch"] == 2
    assert summary["train_pgd_accuracy"] == last["train_pgd_accuracy"]
    assert summary["test_natural_accuracy"] == last["test_natural_accuracy"]
    # A folder that holds no run is refused with exit code 2.
    assert figure.main([str(tmp_path), "--out", out]) == 2


def test_random_labels_sweep_plans_valid_runs(capsys):
    import experiments.random_labels_sweep as sweep
    from jax_memat.experiment import validate_config

    demo = sweep.plan("demo", "cpu", [], [], [])
    assert [name for name, _ in demo] == [
        "pgd_at_r1_w2",
        "trades_r1_w2_beta6",
        "trades_r1_w2_beta1",
    ]
    betas = sweep.plan("beta", "cpu", [0.5, 6.0], [], [])
    assert [c.objective.beta for _, c in betas] == [0.5, 6.0]
    widths = sweep.plan("width", "paper", [], [1, 4], [])
    assert [(c.model.name, c.model.width) for _, c in widths] == [
        ("wide_resnet", 1),
        ("wide_resnet", 4),
    ]
    rates = sweep.plan("rate", "cpu", [], [], [0.0, 1.0])
    assert [c.optimizer.weight_decay for _, c in rates] == [2e-4, 0.0]
    for _, config in demo + betas + widths + rates:
        validate_config(config)
        assert config.dataset.label_noise in (0.0, 1.0)
        # The TRADES attack starts unclipped, as the authors' (configs/random_labels.py).
        assert config.attack.clip_start == (config.objective.name != "trades")
    assert sweep.main(["--sweep", "beta", "--betas", "1,6", "--out-dir", "x", "--dry-run"]) == 0
    assert "trades_r1_w2_beta6: x/trades_r1_w2_beta6" in capsys.readouterr().out
    assert sweep.main(["--betas", "one", "--out-dir", "x"]) == 2
    # The noise-rate family of claim C3: both objectives, several seeds; seed 0
    # runs keep the names and configs above.
    family = sweep.plan(
        "rate", "cpu", [], [], [0.0, 1.0], seeds=[0, 2], objectives=["pgd_at", "trades"]
    )
    assert [name for name, _ in family] == [
        "pgd_at_r0_w2",
        "pgd_at_r1_w2",
        "trades_r0_w2_beta6",
        "trades_r1_w2_beta6",
        "pgd_at_r0_w2_s2",
        "pgd_at_r1_w2_s2",
        "trades_r0_w2_beta6_s2",
        "trades_r1_w2_beta6_s2",
    ]
    assert [c.seed for _, c in family] == [0] * 4 + [2] * 4
    assert family[0][1].to_dict() == rates[0][1].to_dict()
    for _, config in family:
        validate_config(config)
    cmd = ["--sweep", "rate", "--rates", "0.5", "--objectives", "pgd_at,trades", "--seeds", "0,1"]
    assert sweep.main([*cmd, "--out-dir", "x", "--dry-run"]) == 0
    assert "trades_r0.5_w2_beta6_s1: x/trades_r0.5_w2_beta6_s1" in capsys.readouterr().out
    assert sweep.main(["--objectives", "sgd", "--out-dir", "x", "--dry-run"]) == 2
    assert sweep.main(["--seeds", "0,0", "--out-dir", "x", "--dry-run"]) == 2


def test_complexity_report_script_errors(tmp_path, capsys):
    import experiments.complexity_report as report

    assert report.main([str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 3
    assert "holds no training run" in capsys.readouterr().out
    assert report.main([str(tmp_path), "--out", "x", "--measures", "nope"]) == 2
    assert "Unknown measures ['nope']" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "out")


def test_memorization_demo_accuracy_figure(tmp_path):
    import experiments.memorization_demo as demo

    workdir = str(tmp_path / "run")
    train_and_evaluate(tiny_config(epochs=3), workdir)  # lr decays after epoch 2
    out = str(tmp_path / "acc.png")
    demo.plot_robust_test_accuracy({"pgd_at": workdir, "soft_hard": workdir}, out)
    assert os.path.getsize(out) > 10_000
    assert set(demo.LABELS) == {"pgd_at", "without_hard", "soft_hard", "without_random"}
