"""The training loop end to end: resume, compile-once, the CLI and bad input."""

import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jax_memat.experiment import (
    ConfigError,
    NonFiniteLossError,
    RunCheckpoints,
    WorkdirConflictError,
    WorkdirError,
    default_config,
    load_run,
    read_metrics,
    train_and_evaluate,
)
from jax_memat.experiment.metrics import TIMING_FIELDS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(epochs=3, te=False):
    c = default_config()
    c.te.enabled = te
    c.te.ramp_start = 2
    c.te.ramp_end = 3
    c.epochs = epochs
    c.batch_size = 32
    c.dataset.name = "synthetic"
    c.dataset.num_train_examples = 96  # 3 steps per epoch
    c.dataset.num_test_examples = 40
    c.dataset.label_noise = 0.2
    c.model.name = "small_cnn"
    c.attack.eps = 0.1
    c.attack.step_size = 0.04
    c.attack.steps = 2
    c.optimizer.learning_rate = 0.05
    c.schedule.milestones = (2,)
    c.eval.batch_size = 16
    c.eval.pgd_steps = 2
    c.final_eval.pgd_steps = 3
    c.log_every_steps = 2
    c.progress_bar = False
    c.tensorboard = False
    return c


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def _final_state(workdir):
    ckpts = RunCheckpoints(workdir)
    try:
        meta = ckpts.meta("latest")
        step = ckpts.latest_step("latest")
        path = os.path.join(ckpts.directory, "latest", str(step))
    finally:
        ckpts.close()
    return meta, step, path


class _Kill(Exception):
    pass


@pytest.mark.parametrize("te", [False, True], ids=["plain", "te"])
def test_resume_after_kill_equals_uninterrupted(tmp_path, te):
    config = tiny_config(epochs=3, te=te)
    full = str(tmp_path / "full")
    report_full = train_and_evaluate(config, full)

    resumed = str(tmp_path / "resumed")

    def kill_in_epoch_two(step, state, metrics, per_example):
        if step == 5:  # epoch 2 of 3 steps each: after epoch 1's checkpoint
            raise _Kill

    with pytest.raises(_Kill):
        train_and_evaluate(config, resumed, hooks=[kill_in_epoch_two])
    assert [r["epoch"] for r in read_metrics(resumed)] == [1]
    report_resumed = train_and_evaluate(config, resumed)

    assert _strip(read_metrics(full)) == _strip(read_metrics(resumed))
    assert report_full == report_resumed
    # The saved states are identical, bit for bit.
    run_a, run_b = load_run(full, "final"), load_run(resumed, "final")
    assert run_a.meta["epoch"] == run_b.meta["epoch"] == 3
    if te:  # The soft-label table was filled during epochs 2-3 and survived resumption.
        assert (
            float(np.abs(run_b.state.objective_state["temporal_ensembling"]["soft_labels"]).sum())
            > 0
        )
    for a, b in zip(jax.tree.leaves(run_a.state), jax.tree.leaves(run_b.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_step_compiles_once_per_run(tmp_path):
    from jax import monitoring

    compiles = []

    def listener(event, duration, **kwargs):
        # Lowering to MLIR happens for every compilation, cached on disk or not.
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            compiles.append(event)

    monitoring.register_event_duration_secs_listener(listener)
    try:
        train_and_evaluate(tiny_config(epochs=1), str(tmp_path / "one"))
        one = len(compiles)
        compiles.clear()
        train_and_evaluate(tiny_config(epochs=4), str(tmp_path / "four"))
        four = len(compiles)
    finally:
        monitoring.clear_event_listeners()
    assert one > 0
    # Three more epochs (with evaluation and checkpoints) compile nothing new.
    assert four == one


def test_outputs_and_best_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(epochs=2)
    config.tensorboard = True
    report = train_and_evaluate(config, workdir)
    for name in (
        "config.json",
        "metrics.jsonl",
        "labels.npz",
        "final_report.json",
        "learning_curves.png",
        "per_example/test_epoch0002.npz",
    ):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    with np.load(os.path.join(workdir, "labels.npz")) as labels:
        assert labels["labels"].shape == (96,)
        assert (labels["labels"] != labels["clean_labels"]).sum() == labels["changed"].sum()
    rows = read_metrics(workdir)
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in (
        "train_loss",
        "grad_norm_sq",
        "train_natural_accuracy",
        "train_pgd_accuracy",
        "test_natural_accuracy",
        "test_pgd_accuracy",
        "learning_rate",
    ):
        assert key in rows[0], key
    best_epoch = max(rows, key=lambda r: (r["test_pgd_accuracy"], r["test_natural_accuracy"]))
    assert report["best"]["epoch"] == best_epoch["epoch"]
    assert report["final"]["epoch"] == 2
    assert {
        "test_natural_accuracy",
        "test_pgd_accuracy",
        "test_cw_accuracy",
        "train_pgd_accuracy",
    } <= set(report["final"])
    ckpts = RunCheckpoints(workdir)
    try:
        assert ckpts.latest_step("init") == 0
        assert ckpts.latest_step("latest") == 6
        assert ckpts.meta("best")["epoch"] == best_epoch["epoch"]
    finally:
        ckpts.close()


def snapshot(path):
    """{relative path: sha256} of every file under ``path``."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("dataset.name", "imagenet", "dataset.name='imagenet' is not accepted"),
        ("model.name", "resnet50", "model.name='resnet50' is not accepted"),
        ("objective.name", "mart", "objective.name='mart' is not accepted"),
        ("schedule.name", "linear", "schedule.name='linear' is not accepted"),
        ("attack.norm", "l1", r"attack.norm must be one of \('linf', 'l2'\), got 'l1'"),
        ("attack.name", "apgd", "attack.name='apgd' is not accepted"),
        ("attack.name", "fgsm", "attack.name='fgsm' takes exactly 1 step"),
        (
            "attack.eps",
            2.0,
            r"attack.eps must be in \[0, 1\] under L-inf .*, got 2.0",
        ),
        ("attack.step_size", 0.0, "attack.step_size must be a finite float > 0, got 0.0"),
        (
            "dataset.label_noise",
            1.5,
            r"dataset.label_noise: label noise rate must be a number in \[0, 1\], got 1.5",
        ),
        (
            "batch_size",
            12,
            "batch_size=12 does not split over the 8 devices; accepted: a multiple of 8, e.g. 8 "
            "or 16",
        ),
    ],
)
def test_bad_config_stops_before_anything_compiles(tmp_path, field, value, match):
    from jax import monitoring

    config = tiny_config()
    section, _, name = field.rpartition(".")
    setattr(config[section] if section else config, name, value)
    compiles = []
    monitoring.register_event_duration_secs_listener(lambda e, d, **k: compiles.append(e))
    try:
        with pytest.raises((ConfigError, ValueError), match=match):
            train_and_evaluate(config, str(tmp_path / "w"))
    finally:
        monitoring.clear_event_listeners()
    assert not [e for e in compiles if e.startswith("/jax/core/compile")]
    assert not os.path.exists(tmp_path / "w")


def test_missing_dataset_is_reported_and_nothing_written(tmp_path):
    config = tiny_config()
    config.dataset.name = "mnist"
    config.dataset.source = "idx"
    config.dataset.data_dir = str(tmp_path / "empty")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="mnist"):
        train_and_evaluate(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_workdir_of_another_config_is_left_untouched(tmp_path):
    workdir = str(tmp_path / "w")
    train_and_evaluate(tiny_config(epochs=1), workdir)
    before = snapshot(workdir)
    other = tiny_config(epochs=1)
    other.attack.eps = 0.2
    with pytest.raises(WorkdirConflictError, match=r"attack.eps: saved 0.1, now 0.2"):
        train_and_evaluate(other, workdir)
    assert snapshot(workdir) == before


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import optax

    from jax_memat.experiment import setup

    # A learning rate that explodes in the second epoch drives the loss to Inf/NaN.
    def exploding(name, learning_rate, *, steps_per_epoch, **kwargs):
        return optax.piecewise_constant_schedule(learning_rate, {steps_per_epoch: 1e30})

    monkeypatch.setattr(setup, "make_schedule", exploding)
    workdir = str(tmp_path / "w")
    with pytest.raises(NonFiniteLossError, match=r"NaN/Inf at step [4-6] \(epoch 2\)"):
        train_and_evaluate(tiny_config(epochs=3), workdir)
    meta, step, _ = _final_state(workdir)
    assert meta["epoch"] == 1 and step == 3
    assert np.isfinite(meta["metrics"]["train_loss"])
    assert [r["epoch"] for r in read_metrics(workdir)] == [1]


def test_cli_end_to_end(tmp_path):
    workdir = str(tmp_path / "cli")
    overrides = [
        "--config.epochs=2",
        "--config.batch_size=32",
        "--config.dataset.name=synthetic",
        "--config.dataset.num_train_examples=64",
        "--config.dataset.num_test_examples=32",
        "--config.eval.num_train_examples=32",
        "--config.eval.num_test_examples=32",
        "--config.eval.batch_size=32",
        "--config.attack.steps=2",
        "--config.eval.pgd_steps=2",
        "--config.final_eval.pgd_steps=2",
        "--config.progress_bar=False",
    ]
    cmd = [
        sys.executable,
        "-m",
        "jax_memat.main",
        "--config=configs/quickstart.py",
        f"--workdir={workdir}",
        *overrides,
    ]
    env = dict(os.environ)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best  (epoch" in proc.stdout and "final (epoch 2)" in proc.stdout
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    assert saved["model"]["name"] == "small_cnn" and saved["epochs"] == 2
    assert [r["epoch"] for r in read_metrics(workdir)] == [1, 2]
    # Running it again finds the run finished: nothing is rewritten.
    before = snapshot(workdir)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "has finished all 2 epochs; nothing to do" in proc.stdout
    assert snapshot(workdir) == before
    # A bad field fails with exit code 2 and a clear message, before compiling.
    bad = [*cmd[: -len(overrides)], "--config.model.name=resnet50"]
    proc = subprocess.run(bad, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "model.name='resnet50' is not accepted" in proc.stderr


def test_evaluate_entry_point_on_a_finished_run(tmp_path):
    from jax_memat.evaluate import run_evaluation

    workdir = str(tmp_path / "run")
    report = train_and_evaluate(tiny_config(epochs=2), workdir)
    result = run_evaluation(workdir, checkpoint="final", attack="pgd", steps=3, batch_size=16)
    assert result["epoch"] == 2 and result["num_examples"] == 40
    # Same checkpoint and test set as the final report: identical natural accuracy.
    assert result["natural_accuracy"] == report["final"]["test_natural_accuracy"]
    assert result["robust_accuracy"] <= result["natural_accuracy"]
    by_step = run_evaluation(workdir, checkpoint=6, attack="cw", steps=3, batch_size=16)
    assert by_step["natural_accuracy"] == result["natural_accuracy"]
    # AutoAttack through the same entry point: never above PGD, outputs checked.
    adv_path = str(tmp_path / "adv.npz")
    aa = run_evaluation(
        workdir, checkpoint="final", attack="autoattack", batch_size=16, save_adversarial=adv_path
    )
    assert aa["natural_accuracy"] == result["natural_accuracy"]
    assert aa["robust_accuracy"] <= report["final"]["test_pgd_accuracy"]
    assert list(aa["accuracy_after_each_attack"]) == [
        "clean",
        "apgd-ce",
        "apgd-t",
        "fab-t",
        "square",
    ]
    assert {k: v for k, v in aa["checks"].items() if k != "max_perturbation"} == {
        "outside_eps": 0,
        "outside_box": 0,
        "nonfinite": 0,
        "flag_mismatch": 0,
    }
    assert aa["checks"]["max_perturbation"] <= 0.1 + 1e-6
    with np.load(adv_path) as adv:
        assert adv["x_adv"].shape == (40, 8, 8, 1)
        assert adv["robust"].mean() == pytest.approx(aa["robust_accuracy"])
    # The command line writes its JSON under <workdir>/eval/.
    cmd = [
        sys.executable,
        "-m",
        "jax_memat.evaluate",
        f"--workdir={workdir}",
        "--attack=cw",
        "--steps=3",
        "--batch_size=16",
        "--checkpoint=best",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "eval", "best_cw_test.json")) as f:
        assert json.load(f)["attack"] == "cw"
    proc = subprocess.run(
        [*cmd[:-1], "--checkpoint=5"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 3 and "keeps no 5 checkpoint" in proc.stderr
    with pytest.raises(WorkdirError, match="keeps no 5 checkpoint"):
        run_evaluation(workdir, checkpoint=5)
    with pytest.raises(ValueError, match="attack='fgsm' is not accepted"):
        run_evaluation(workdir, attack="fgsm")
