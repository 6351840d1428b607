"""The complexity analysis of a run family end to end, its report, and its errors first."""

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jax_memat.analysis.complexity import kendall_tau_b
from jax_memat.analysis.complexity.report import (
    DEFAULT_MEASURES,
    MEASURES,
    check_measures,
    complexity_measures,
    family_report,
    plot_family,
    report_markdown,
)
from jax_memat.experiment import load_run, train_and_evaluate
from jax_memat.experiment.analyses import analyze, gap_attack, run_hparams
from jax_memat.experiment.checkpoints import RunCheckpoints
from jax_memat.experiment.workdir import read_json
from tests.helpers import F32_EPS
from tests.test_run import REPO, snapshot, tiny_config

CHEAP = ["dist_fro", "param_norm", "local_lipschitz"]
N = 32  # examples per split: the tiny runs have 40 test examples


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    workdirs = []
    for rate in (0.0, 0.5):
        config = tiny_config(epochs=2)
        config.dataset.label_noise = rate
        workdir = str(root / f"r{rate:g}")
        train_and_evaluate(config, workdir)
        workdirs.append(workdir)
    return workdirs


@pytest.fixture(scope="module")
def report(family, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("report"))
    result = analyze(
        "complexity", family, out, measures=CHEAP, num_examples=N, min_train_accuracy=0.0, seed=3
    )
    return out, result


def _nan_to_none(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def test_report_files_and_table(family, report):
    out, result = report
    for ext in ("json", "csv", "md"):
        assert os.path.getsize(os.path.join(out, f"complexity.{ext}")) > 100
    assert os.path.getsize(os.path.join(out, "complexity.png")) > 10_000
    with open(os.path.join(out, "complexity.json")) as f:
        saved = json.load(f)
    assert [r["name"] for r in saved["runs"]] == ["r0", "r0.5"]
    assert saved["axes"] == ["label_noise"]  # objective, seed and width do not vary
    assert saved["settings"]["num_examples"] == N and saved["excluded"] == []
    for run, ours in zip(saved["runs"], result["runs"], strict=True):
        assert run["hparams"] == run_hparams(
            read_json(os.path.join(ours["workdir"], "config.json"))
        )
        assert (
            run["gap"]
            == ours["gap"]
            == pytest.approx(run["robust_train_accuracy"] - run["robust_test_accuracy"], abs=0)
        )
        for name in CHEAP:
            assert run["measures"][name] == _nan_to_none(ours["measures"][name])
    assert [r["hparams"]["label_noise"] for r in saved["runs"]] == [0.0, 0.5]
    with open(os.path.join(out, "complexity.csv")) as f:
        rows = {row[0]: row[1:] for row in csv.reader(f)}
    for name in CHEAP:
        assert [float(v) for v in rows[name][:2]] == [r["measures"][name] for r in result["runs"]]
    assert [float(v) for v in rows["gap"][:2]] == [r["gap"] for r in result["runs"]]
    with open(os.path.join(out, "complexity.md")) as f:
        md = f.read()
    assert md == report_markdown(result)
    assert "| r0.5 | 0.5 | pgd_at | 0 | 1 |" in md and "| dist_fro |" in md


def test_table_equals_a_direct_call_and_tau_equals_kendall(family, report):
    _, result = report
    key = jax.random.key(3)
    gaps = [r["gap"] for r in result["runs"]]
    for workdir, row in zip(family, result["runs"], strict=True):
        run = load_run(workdir, "final")
        ckpts = RunCheckpoints(workdir)
        try:
            init, _ = ckpts.restore("init", run.state)
        finally:
            ckpts.close()
        direct = complexity_measures(
            run.setup.apply_fn,
            run.state.variables,
            init.variables,
            run.train.images,
            run.train.labels,
            run.test.images,
            run.test.labels,
            attack=gap_attack(run.config),
            measures=CHEAP,
            num_examples=N,
            key=jax.random.fold_in(key, 0),
            mesh=run.mesh,
            batch_size=run.config.eval.batch_size,
        )
        for name in CHEAP:
            # The same programs on the same restored bits; the tolerance covers
            # only float64 host reductions of float32 arrays summed in another order.
            np.testing.assert_allclose(row["measures"][name], direct[name], rtol=64 * F32_EPS)
        assert direct["margin_positive"] in (0.0, 1.0) and direct["num_examples"] == N
        # Accuracies over N examples are multiples of 1/N.
        for k in ("robust_train_accuracy", "robust_test_accuracy", "natural_train_accuracy"):
            assert row[k] * N == pytest.approx(round(row[k] * N), abs=1e-9)
    for name in CHEAP:
        column = [r["measures"][name] for r in result["runs"]]
        c = result["correlation"][name]
        expected = kendall_tau_b(column, gaps)
        assert c["tau_b"] == expected or (math.isnan(c["tau_b"]) and math.isnan(expected))
        assert c["num_ranked"] == 2


def test_one_run_below_min_train_accuracy_is_flagged_not_ranked(family):
    workdir = family[0]
    result = analyze(
        "complexity", workdir, measures=["dist_fro"], num_examples=N, min_train_accuracy=1.0
    )
    (row,) = result["runs"]
    assert row["natural_train_accuracy"] < 1.0 and row["converged"] is False
    assert result["excluded"] == ["r0"] and result["ranked"] == []
    assert result["correlation"] == {} and "needs >= 2 ranked" in result["note"]
    with open(os.path.join(workdir, "analysis", "complexity.md")) as f:  # the default out_dir
        md = f.read()
    assert "needs >= 2 ranked" in md and "| r0 |" in md and "| no |" in md


def test_family_report_leaves_unconverged_runs_out_of_the_ranking():
    rates = [0.0, 0.2, 0.4, 1.0]
    runs = [
        {
            "name": f"r{r}",
            "hparams": {"objective": "pgd_at", "label_noise": r, "seed": 0},
            "gap": g,
            "converged": r < 1.0,
            "robust_train_accuracy": 0.9,
            "robust_test_accuracy": 0.9 - g,
            "natural_train_accuracy": 1.0 if r < 1.0 else 0.1,
            "measures": {
                "dist_fro": d,
                "inverse_margin_sq": m,
                "pac_bayes_bound_init": 1.0,
                "pac_bayes_saturated": float(r == 0.4),
                "pac_bayes_converged": float(r != 0.2),
            },
        }
        for r, g, d, m in zip(
            rates,
            [0.1, 0.3, 0.2, 0.0],
            [1.0, 3.0, 4.0, -50.0],
            [1.0, math.nan, 2.0, 3.0],
            strict=True,
        )
    ]
    rep = family_report(runs, ["dist_fro", "inverse_margin_sq", "pac_bayes_bound_init"])
    assert rep["excluded"] == ["r1.0"] and rep["ranked"] == ["r0.0", "r0.2", "r0.4"]
    assert rep["axes"] == ["label_noise"]
    c = rep["correlation"]
    assert c["dist_fro"]["tau_b"] == kendall_tau_b([1.0, 3.0, 4.0], [0.1, 0.3, 0.2])
    assert c["dist_fro"]["granulated_tau"] == c["dist_fro"]["tau_b"]  # one axis, one group
    assert math.isnan(c["inverse_margin_sq"]["tau_b"])
    assert "not finite for the ranked runs ['r0.2']" in c["inverse_margin_sq"]["problem"]
    assert math.isnan(c["pac_bayes_bound_init"]["tau_b"])
    assert "constant" in c["pac_bayes_bound_init"]["problem"]
    assert c["pac_bayes_bound_init"]["saturated_runs"] == ["r0.4"]
    md = report_markdown(rep)
    assert "left out of the ranking: r1.0" in md
    # The search that ran out of steps is flagged on its run's row, and only there.
    assert [line for line in md.splitlines() if "pac_bayes_converged" in line] == [
        next(line for line in md.splitlines() if line.startswith("| r0.2 |"))
    ]
    # One objective: its tau equals the family's.
    assert c["dist_fro"]["by_objective"] == {"pgd_at": c["dist_fro"]["tau_b"]}


def test_tau_by_objective_and_seed_series_plot(tmp_path):
    # Two objectives, two seeds: dist_fro follows the gap inside PGD-AT and runs against it
    # inside TRADES; over the whole family the two cancel partly.
    runs = []
    for objective, sign in (("pgd_at", 1.0), ("trades", -1.0)):
        for seed in (0, 1):
            for rate in (0.0, 0.5, 1.0):
                gap = 0.2 + 0.5 * rate + 0.01 * seed + (0.1 if objective == "trades" else 0.0)
                runs.append(
                    {
                        "name": f"{objective}_r{rate}_s{seed}",
                        "hparams": {"objective": objective, "label_noise": rate, "seed": seed},
                        "gap": gap,
                        "converged": True,
                        "robust_train_accuracy": 1.0,
                        "robust_test_accuracy": 1.0 - gap,
                        "natural_train_accuracy": 1.0,
                        "measures": {"dist_fro": sign * gap},
                    }
                )
    rep = family_report(runs, ["dist_fro"])
    c = rep["correlation"]["dist_fro"]
    assert c["by_objective"] == {"pgd_at": 1.0, "trades": -1.0}
    gaps = [r["gap"] for r in runs]
    assert c["tau_b"] == kendall_tau_b([r["measures"]["dist_fro"] for r in runs], gaps)
    md = report_markdown(rep)
    assert "| measure | tau-b | granulated tau | tau-b pgd_at | tau-b trades |" in md
    assert "| dist_fro |" in md and "| 1 | -1 |" in md
    path = str(tmp_path / "family.png")
    assert plot_family(rep, path) == path
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_measure_names():
    assert set(DEFAULT_MEASURES) <= set(MEASURES) and len(set(MEASURES)) == len(MEASURES)
    assert check_measures("dist_fro, local_lipschitz") == ("dist_fro", "local_lipschitz")
    with pytest.raises(ValueError, match="Unknown measures \\['nope'\\]; accepted: param_norm"):
        check_measures(["dist_fro", "nope"])
    with pytest.raises(ValueError, match="distinct"):
        check_measures(["dist_fro", "dist_fro"])


@pytest.fixture(scope="module")
def no_init(family, tmp_path_factory):
    copy = str(tmp_path_factory.mktemp("copy") / "no_init")
    shutil.copytree(family[0], copy)
    shutil.rmtree(os.path.join(copy, "checkpoints", "init"))
    return copy


@pytest.mark.parametrize(
    "case, error, fragment",
    [
        ("unknown_measure", ValueError, "Unknown measures ['nope']; accepted: param_norm"),
        ("missing_init", FileNotFoundError, "no_init has no 'init' checkpoint"),
        ("no_run", FileNotFoundError, "holds no training run (config.json is missing)"),
        ("no_out_dir", ValueError, "2 workdirs need an explicit out_dir"),
        ("foreign_option", ValueError, "fraction do(es) not apply to the complexity analysis"),
        ("checkpoint", ValueError, "takes no checkpoint (got checkpoint='best')"),
        ("two_for_gradients", ValueError, "the gradients analysis reads exactly one workdir"),
        ("too_many_examples", ValueError, "num_examples=64 exceeds the smallest split"),
        ("threshold", ValueError, "min_train_accuracy must be in [0, 1]"),
    ],
)
def test_errors_come_before_anything_is_built(
    family, no_init, tmp_path, monkeypatch, case, error, fragment
):
    import jax_memat.experiment.analyses as analyses

    def no_build(*args, **kw):
        raise AssertionError("load_run was called: the error should come before it")

    monkeypatch.setattr(analyses, "load_run", no_build)
    out = str(tmp_path / "out")
    name, workdirs, kwargs = "complexity", [*family], {"measures": ["dist_fro"]}
    if case == "unknown_measure":
        kwargs["measures"] = ["dist_fro", "nope"]
    elif case == "missing_init":
        workdirs = [*family, no_init]  # the bad run is last: nothing is built for the others
    elif case == "no_run":
        workdirs = [*family, str(tmp_path / "none")]
    elif case == "no_out_dir":
        out = None
    elif case == "foreign_option":
        kwargs["fraction"] = 0.1
    elif case == "checkpoint":
        kwargs["checkpoint"] = "best"
    elif case == "two_for_gradients":
        name, kwargs = "gradients", {}
    elif case == "too_many_examples":
        kwargs["num_examples"] = 64
    else:
        kwargs["min_train_accuracy"] = 1.5
    before = [snapshot(w) for w in family]
    with pytest.raises(error, match=re.escape(fragment)):
        analyses.analyze(name, workdirs, out, **kwargs)
    assert [snapshot(w) for w in family] == before
    assert not os.path.exists(tmp_path / "out")


def _cli(*args):
    cmd = [sys.executable, "-m", "jax_memat.analyze", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_cli_end_to_end(family, tmp_path):
    out = str(tmp_path / "cli")
    proc = _cli(
        "complexity",
        *(f"--workdir={w}" for w in family),
        f"--out_dir={out}",
        "--measures=dist_fro,param_norm",
        f"--num_examples={N}",
        "--min_train_accuracy=0",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(out, "complexity.json")) as f:
        saved = json.load(f)
    assert saved["measures"] == ["dist_fro", "param_norm"] and saved["ranked"] == ["r0", "r0.5"]
    tau = kendall_tau_b(
        [r["measures"]["dist_fro"] for r in saved["runs"]], [r["gap"] for r in saved["runs"]]
    )
    assert saved["correlation"]["dist_fro"]["tau_b"] == _nan_to_none(tau)
    assert "dist_fro: tau-b" in proc.stdout and "r0.5: robust gap" in proc.stdout
    # Progress names the run, the measure group and its time.
    assert re.search(r"\[2/2\] r0\.5: norms done \(\d+ s\)", proc.stdout), proc.stdout


@pytest.mark.parametrize(
    "args, code, fragment",
    [
        (["complexity", "--out_dir=OUT", "--measures=nope"], 2, "Unknown measures ['nope']"),
        (
            ["complexity", "--out_dir=OUT", "--fraction=0.2"],
            2,
            "--fraction do(es) not apply to the complexity",
        ),
        (["complexity"], 2, "2 workdirs need an explicit out_dir"),
        (["gradients"], 2, "the gradients analysis reads exactly one --workdir; got 2"),
        (["memorization"], 2, "the memorization analysis reads exactly one --workdir; got 2"),
        (["complexity", "--out_dir=OUT", "--workdir=MISSING"], 3, "holds no training run"),
        (["complexity", "--out_dir=OUT", "--workdir=NO_INIT"], 3, "has no 'init' checkpoint"),
    ],
)
def test_cli_errors(family, no_init, tmp_path, args, code, fragment):
    args = [
        a.replace("OUT", str(tmp_path / "out"))
        .replace("MISSING", str(tmp_path / "none"))
        .replace("NO_INIT", no_init)
        for a in args
    ]
    before = [snapshot(w) for w in family]
    proc = _cli(*args, *(f"--workdir={w}" for w in family))
    assert proc.returncode == code, proc.stderr[-2000:]
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
    assert [snapshot(w) for w in family] == before
    assert not os.path.exists(tmp_path / "out")
