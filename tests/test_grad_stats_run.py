"""Gradient statistics in a training run: config, metrics rows, plot, resume."""

import os

import jax
import ml_collections
import numpy as np
import pytest

from jax_memat.analysis import GRAD_PLOT_FILE, GradStats, find_recorder_state, summarize_epoch
from jax_memat.analysis.grad_stats import EVERY_STEP_KEYS, PER_EXAMPLE_KEYS, SMOOTHNESS_KEYS
from jax_memat.experiment import (
    ConfigError,
    default_config,
    load_run,
    loop,
    read_metrics,
    train_and_evaluate,
    validate_config,
)
from jax_memat.experiment.metrics import TIMING_FIELDS
from jax_memat.experiment.setup import grad_stats_from_config
from tests.test_run import tiny_config


def _config():
    c = tiny_config(epochs=2)  # 3 steps per epoch
    c.grad_stats.every_steps = 2  # steps 0, 2 (epoch 1) and 4 (epoch 2)
    c.grad_stats.microbatch = 8
    c.grad_stats.examples = 16  # of the batch of 32
    c.eval.pgd_steps = 1
    c.final_eval.pgd_steps = 1
    c.final_eval.cw = False
    return c


class _Kill(Exception):
    pass


def test_run_with_grad_stats_writes_them_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    config = _config()
    full = str(tmp_path / "full")
    train_and_evaluate(config, full)
    rows = read_metrics(full)
    assert [r["grad_sampled_steps"] for r in rows] == [2, 1]
    for row in rows:
        for key in (*EVERY_STEP_KEYS, *PER_EXAMPLE_KEYS, *SMOOTHNESS_KEYS):
            if key != "grad_noise_scale":
                assert isinstance(row[key], float), (key, row.get(key))
        # The epoch's noise scale is the ratio of its means; none when the signal is not > 0
        # (as on these random images with 20% noisy labels, from 16 examples).
        if row["grad_signal_sq"] > 0:
            ratio = row["grad_variance"] / row["grad_signal_sq"]
            assert row["grad_noise_scale"] == pytest.approx(ratio, rel=1e-6)
        else:
            assert row["grad_noise_scale"] is None
        assert row["grad_variance"] > 0
        assert row["grad_example_norm_min"] <= row["grad_example_norm_median"]
        assert row["grad_example_norm_median"] <= row["grad_example_norm_max"]
        assert -1 <= row["grad_cosine_prev"] <= 1
        assert row["grad_smoothness"] > 0
    assert os.path.getsize(os.path.join(full, GRAD_PLOT_FILE)) > 0

    # Killed at the end of epoch 2's steps (past its sampled step 4), before its row
    # and checkpoint. Not by a hook: a hook asks the step for per-example outputs,
    # another program, whose loss metric may round differently.
    resumed = str(tmp_path / "resumed")
    epochs_trained = []

    def summarize_then_kill(step_metrics):
        epochs_trained.append(len(step_metrics))
        if len(epochs_trained) == 2:
            raise _Kill
        return summarize_epoch(step_metrics)

    monkeypatch.setattr(loop, "summarize_epoch", summarize_then_kill)
    with pytest.raises(_Kill):
        train_and_evaluate(config, resumed)
    monkeypatch.undo()
    assert [r["epoch"] for r in read_metrics(resumed)] == [1]
    train_and_evaluate(config, resumed)

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]

    # The previous gradient was restored with the optimizer state: epoch 2's first
    # cosine (step 3, against step 2's gradient) is the uninterrupted run's.
    assert strip(read_metrics(resumed)) == strip(rows)
    run_a, run_b = load_run(full, "final"), load_run(resumed, "final")
    recorder = find_recorder_state(run_b.state.opt_state)
    assert int(recorder.count) == 6
    for a, b in zip(jax.tree.leaves(run_a.state), jax.tree.leaves(run_b.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_grad_stats_config_defaults_off_and_builds_the_probe():
    config = default_config()
    assert config.grad_stats.every_steps == 0
    assert grad_stats_from_config(config) is None
    config.grad_stats.every_steps = 50
    config.grad_stats.microbatch = 16
    config.grad_stats.examples = 32
    assert grad_stats_from_config(config) == GradStats(50, microbatch=16, examples=32)
    config.grad_stats.microbatch = config.grad_stats.examples = 0
    assert grad_stats_from_config(config) == GradStats(50)
    # A config saved before the option existed runs without it.
    del config["grad_stats"]
    validate_config(config)
    assert grad_stats_from_config(config) is None


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("every_steps", -1, r"grad_stats.every_steps=-1 is invalid; accepted: a non-negative"),
        ("every_steps", 1.5, r"grad_stats.every_steps=1.5 is invalid"),
        ("microbatch", "8", r"grad_stats.microbatch='8' is invalid"),
        ("microbatch", 129, r"grad_stats.microbatch=129 exceeds batch_size=128"),
        ("examples", 1, r"grad_stats.examples=1 is invalid; accepted: 0 .* \[2, batch_size=128\]"),
        ("examples", 129, r"grad_stats.examples=129 is invalid"),
    ],
)
def test_bad_grad_stats_config_is_refused(field, value, match):
    config = default_config()
    # A whole new section: ConfigDict refuses a value of another type field by field
    # (as the command line does), but a saved config.json can hold anything.
    section = {"every_steps": 0, "microbatch": 0, "examples": 0, field: value}
    config.grad_stats = ml_collections.ConfigDict(section)
    with pytest.raises(ConfigError, match=match):
        validate_config(config)
