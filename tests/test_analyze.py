"""The analysis entry point end to end on a tiny run, and its errors before any work."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from jax_memat.analysis import gradient_snapshot, load_records, read_hard_examples
from jax_memat.analysis.gradients import tree_sq_norm
from jax_memat.data import make_batch
from jax_memat.experiment import load_run, train_and_evaluate
from jax_memat.experiment.analyses import analyze
from jax_memat.objectives import StepInfo
from tests.helpers import F32_EPS
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
        (["nope"], 2, "Unknown analysis 'nope'; accepted: complexity, gradients, memorization"),
        ([], 2, "name one analysis"),
        (["memorization", "--fraction=0"], 2, "fraction must be in (0, 1]"),
        (["memorization", "--checkpoint=best"], 2, "--checkpoint do(es) not apply"),
        (["gradients", "--fraction=0.2"], 2, "--fraction do(es) not apply"),
        (["gradients", "--checkpoint=newest"], 2, "checkpoint='newest' is not accepted"),
        (["gradients", "--checkpoint=12345"], 3, "keeps no checkpoint at step 12345"),
        (["gradients", "--num_examples=40"], 2, "multiple of the run's batch_size=32"),
        (["gradients", "--num_examples=128"], 2, "exceeds the 96 training examples"),
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


def test_cli_writes_the_gradients_report(run):
    cmd = [sys.executable, "-m", "jax_memat.analyze", "gradients", f"--workdir={run}"]
    cmd += ["--checkpoint=final", "--num_examples=64"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = os.path.join(run, "analysis")
    with open(os.path.join(out, "gradients.json")) as f:
        summary = json.load(f)
    assert os.path.getsize(os.path.join(out, "gradients.png")) > 10_000
    with np.load(os.path.join(out, "gradients.npz")) as f:
        snap = {k: f[k] for k in f.files}
    np.testing.assert_array_equal(snap["index"], np.arange(64))
    assert summary["num_examples"] == 64 and summary["num_batches"] == 2
    assert summary["epoch"] == 3 and summary["checkpoint"] == "final"
    assert np.all(snap["grad_norm"] > 0) and np.all(np.abs(snap["grad_cosine"]) <= 1 + 1e-5)
    assert summary["grad_norm"]["median"] == pytest.approx(float(np.median(snap["grad_norm"])))
    with np.load(os.path.join(run, "labels.npz")) as labels:
        corrupted = labels["changed"][:64]
    assert summary["num_corrupted"] == int(corrupted.sum()) > 0
    assert summary["clean"]["count"] + summary["corrupted"]["count"] == 64
    assert summary["corrupted"]["grad_norm"]["median"] == pytest.approx(
        float(np.median(snap["grad_norm"][corrupted]))
    )
    assert "noise scale" in proc.stdout


def _snapshot_of(run_state, loaded, key):
    return gradient_snapshot(
        loaded.setup.objective,
        run_state,
        loaded.train.images,
        loaded.train.labels,
        mesh=loaded.mesh,
        batch_size=32,
        key=key,
        num_examples=96,
        epoch=2,
    )


def test_analysis_of_a_restored_checkpoint_equals_the_live_state(tmp_path):
    live = {}

    def hook(step, state, metrics, per_example):
        live["state"] = jax.device_get(state)  # the state after the run's last step

    config = tiny_config(epochs=2)
    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir, hooks=[hook])
    summary = analyze("gradients", workdir, checkpoint="final", num_examples=96, seed=7)
    with np.load(os.path.join(workdir, "analysis", "gradients.npz")) as f:
        restored = {k: f[k] for k in f.files}
    loaded = load_run(workdir, "final")
    ours = _snapshot_of(live["state"], loaded, jax.random.key(7))
    assert summary["step"] == int(live["state"].step) == 6
    for k, v in ours.items():
        # The same compiled function on the same bits; a tolerance only for the
        # host-side float64 -> float32 rounding of the per-batch scalars.
        np.testing.assert_allclose(restored[k], v, rtol=4 * F32_EPS, atol=0, err_msg=k)

    # The mean of each batch's per-example gradients is that batch's training gradient.
    batch = make_batch(loaded.train.images, loaded.train.labels, np.arange(32), None, augment=False)
    info = StepInfo(
        step=loaded.state.step, epoch=np.int32(2), key=jax.random.fold_in(jax.random.key(7), 0)
    )

    def mean_loss(params):
        per_example, _ = loaded.setup.objective.loss(
            params, loaded.state.model_state, loaded.state.objective_state, batch, info
        )
        return per_example.mean()

    grad = jax.grad(mean_loss)(loaded.state.params)
    direct = float(np.sqrt(tree_sq_norm(grad)))
    # Sums of 32 per-example gradients of a few thousand parameters in float32.
    assert restored["batch_mean_grad_norm"][0] == pytest.approx(direct, rel=256 * F32_EPS)


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        ({"checkpoint": "newest"}, ValueError, "checkpoint='newest' is not accepted"),
        ({"checkpoint": 12345}, FileNotFoundError, "keeps no checkpoint at step 12345"),
        ({"num_examples": 40}, ValueError, "multiple of the run's batch_size=32"),
        ({"num_examples": 128}, ValueError, "exceeds the 96 training examples"),
        ({"microbatch": 0}, ValueError, "microbatch must be a positive integer"),
    ],
)
def test_gradients_errors_come_before_anything_is_built(run, monkeypatch, kwargs, error, fragment):
    import jax_memat.experiment.analyses as analyses

    def no_build(*args, **kw):
        raise AssertionError("load_run was called: the error should come before it")

    monkeypatch.setattr(analyses, "load_run", no_build)
    before = snapshot(run)
    with pytest.raises(error, match=re.escape(fragment)):
        analyses.analyze("gradients", run, **kwargs)
    assert snapshot(run) == before
