"""Soft targets for chosen examples: hand values on the linear model, and in a run.

The model of tests/test_objectives.py: ``logits = [0, z]`` with ``z = w . x``,
``z = -0.5`` at the clean point and ``z`` in ``[-0.8, -0.2]`` over the eps-box.
With the uniform target the cross-entropy is ``log(2 cosh(z / 2))``: even in
``z``, so an attack on it moves ``z`` away from 0 (to -0.8), while the attack on
the label-0 cross-entropy ``softplus(z)`` moves it to -0.2.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_memat.analysis import write_hard_examples
from jax_memat.attacks.losses import cross_entropy, soft_cross_entropy
from jax_memat.experiment import ConfigError, load_run, train_and_evaluate
from jax_memat.experiment.errors import WorkdirConflictError
from jax_memat.objectives import (
    StepInfo,
    make_objective,
    soft_target_penalty,
    with_soft_targets,
    with_temporal_ensembling,
)
from tests.helpers import F32_EPS
from tests.test_objectives import BATCH, KEY, PARAMS, apply_fn, kl_two_class, pgd, softplus
from tests.test_run import tiny_config


def run(objective, index=0, num_examples=3):
    batch = dict(BATCH, index=jnp.array([index]))
    info = StepInfo(step=jnp.int32(0), epoch=jnp.int32(1), key=KEY)
    return objective.loss(PARAMS, {}, objective.init(num_examples, 2), batch, info)


def uniform_ce(z):
    return math.log(2 * math.cosh(z / 2))


def test_penalty_turns_cross_entropy_into_soft_cross_entropy():
    logits = jax.random.normal(jax.random.key(1), (6, 5)) * 3
    labels = jnp.array([0, 1, 2, 3, 4, 0])
    chosen = jnp.array([True, False, True, False, True, True])
    for s in (0.1, 0.5, 1.0):
        q = (1 - s) * jax.nn.one_hot(labels, 5) + s / 5
        got = cross_entropy(logits, labels) + soft_target_penalty(logits, labels, chosen, s)
        want = np.where(chosen, soft_cross_entropy(logits, q), cross_entropy(logits, labels))
        # A few log-sum-exps of values up to ~10: a few ulps of the result each.
        np.testing.assert_allclose(got, want, rtol=32 * F32_EPS, atol=32 * F32_EPS)
    # Rows not chosen are untouched, bit for bit.
    untouched = cross_entropy(logits, labels) + soft_target_penalty(logits, labels, chosen, 1.0)
    np.testing.assert_array_equal(
        np.asarray(untouched)[~np.asarray(chosen)],
        np.asarray(cross_entropy(logits, labels))[~np.asarray(chosen)],
    )


def test_pgd_at_attacks_and_trains_on_the_soft_target():
    base = make_objective("pgd_at", apply_fn, pgd())
    loss, aux = run(with_soft_targets(base, [0]))
    # The attack maximizes the uniform-target loss: z goes to -0.8.
    assert float(loss[0]) == pytest.approx(uniform_ce(-0.8), rel=1e-5)
    assert float(aux.per_example["logits"][0, 1]) == pytest.approx(-0.8, abs=1e-5)
    # Leaving the attack alone: it maximizes CE(y) (z = -0.2); training sees the soft target.
    loss, _ = run(with_soft_targets(base, [0], regularize_attack=False))
    assert float(loss[0]) == pytest.approx(uniform_ce(-0.2), rel=1e-5)
    # Smoothing 0.5: q = (0.75, 0.25), CE_q = softplus(z) - z / 4, increasing on the box.
    loss, _ = run(with_soft_targets(base, [0], smoothing=0.5))
    assert float(loss[0]) == pytest.approx(softplus(-0.2) + 0.05, rel=1e-5)
    # An example that is not chosen keeps its label, attack and loss.
    loss, _ = run(with_soft_targets(base, [1]), index=0)
    assert float(loss[0]) == pytest.approx(softplus(-0.2), rel=1e-5)


def test_trades_soft_target_on_the_natural_cross_entropy():
    beta = 6.0
    base = make_objective("trades", apply_fn, pgd(), beta=beta)
    loss, _ = run(with_soft_targets(base, [0], regularize_attack=False))
    candidates = [uniform_ce(-0.5) + beta * kl_two_class(-0.5, z) for z in (-0.2, -0.8)]
    assert min(abs(float(loss[0]) - c) for c in candidates) < 1e-5


def test_state_nests_with_temporal_ensembling():
    base = make_objective("standard", apply_fn)
    objective = with_temporal_ensembling(with_soft_targets(base, [2, 0]), apply_fn)
    state = objective.init(4, 2)
    np.testing.assert_array_equal(
        state["inner"]["soft_targets"]["rows"], [True, False, True, False]
    )
    assert state["inner"]["inner"] == {}
    info = StepInfo(step=jnp.int32(0), epoch=jnp.int32(1), key=KEY)
    loss, aux = objective.loss(PARAMS, {}, state, BATCH, info)
    # TE is off before its ramp: the loss is the uniform-target cross-entropy at z = -0.5.
    assert float(loss[0]) == pytest.approx(uniform_ce(-0.5), rel=1e-5)
    assert jax.tree.structure(aux.objective_state) == jax.tree.structure(state)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"smoothing": 0.0}, "smoothing must be a number in \\(0, 1\\]"),
        ({"smoothing": 1.5}, "smoothing must be a number in \\(0, 1\\]"),
        ({"smoothing": True}, "smoothing must be a number"),
        ({"output": "both"}, "output='both' is not accepted"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        with_soft_targets(make_objective("standard", apply_fn), [0], **kwargs)


def test_bad_rows():
    base = make_objective("standard", apply_fn)
    with pytest.raises(ValueError, match="1-D list of integers"):
        with_soft_targets(base, [0.5])
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 3\); got 0 .. 3"):
        with_soft_targets(base, [0, 3]).init(3, 2)


# --------------------------------------------------------------------------- in a run


def test_run_with_soft_targets(tmp_path):
    listed = write_hard_examples(
        str(tmp_path / "hard.json"), [5, 40, 7], {"dataset": "synthetic", "num_examples": 96}
    )
    config = tiny_config(epochs=1)
    config.objective.soft_label_examples = listed
    config.objective.soft_label_smoothing = 0.5
    workdir = str(tmp_path / "soft")
    train_and_evaluate(config, workdir)
    with np.load(os.path.join(workdir, "labels.npz")) as saved:
        np.testing.assert_array_equal(saved["soft_index"], [5, 7, 40])
    # The list changed under the run: resuming would train other targets.
    write_hard_examples(listed, [5, 8], {"dataset": "synthetic", "num_examples": 96})
    config.epochs = 2
    with pytest.raises(WorkdirConflictError, match="other soft_index rows"):
        train_and_evaluate(config, workdir)
    # A finished run loads without the list: its rows are in labels.npz.
    os.remove(listed)
    loaded = load_run(workdir, "latest")
    np.testing.assert_array_equal(
        np.flatnonzero(loaded.state.objective_state["soft_targets"]["rows"]), [5, 7, 40]
    )


def test_soft_rows_follow_the_renumbering_of_a_run_with_rows_left_out(tmp_path):
    meta = {"dataset": "synthetic", "num_examples": 96}
    config = tiny_config(epochs=1)
    config.dataset.exclude_examples = write_hard_examples(str(tmp_path / "x.json"), [0, 6], meta)
    config.objective.soft_label_examples = write_hard_examples(
        str(tmp_path / "s.json"), [7, 1], meta
    )
    workdir = str(tmp_path / "both")
    train_and_evaluate(config, workdir)
    with np.load(os.path.join(workdir, "labels.npz")) as saved:
        # Rows 1 and 7 of the full set are rows 0 and 5 once 0 and 6 are left out.
        np.testing.assert_array_equal(saved["soft_index"], [0, 5])
        np.testing.assert_array_equal(saved["original_index"][saved["soft_index"]], [1, 7])


def test_bad_soft_label_configs_stop_before_anything_is_written(tmp_path):
    meta = {"dataset": "synthetic", "num_examples": 96}
    overlap = tiny_config(epochs=1)
    overlap.dataset.exclude_examples = write_hard_examples(str(tmp_path / "x.json"), [3], meta)
    overlap.objective.soft_label_examples = overlap.dataset.exclude_examples
    missing = tiny_config(epochs=1)
    missing.objective.soft_label_examples = str(tmp_path / "absent.json")
    smoothing = tiny_config(epochs=1)
    smoothing.objective.soft_label_examples = overlap.dataset.exclude_examples
    smoothing.objective.soft_label_smoothing = 2.0
    other = tiny_config(epochs=1)
    other.objective.soft_label_examples = write_hard_examples(
        str(tmp_path / "svhn.json"), [1], {"dataset": "svhn"}
    )
    cases = {
        "overlap": (overlap, "also left out by dataset.exclude_examples"),
        "missing": (missing, "soft_label_examples: .*does not exist"),
        "smoothing": (smoothing, r"soft_label_smoothing must be a number in \(0, 1\]"),
        "other": (other, "made on dataset 'svhn'"),
    }
    for name, (config, message) in cases.items():
        workdir = tmp_path / name
        with pytest.raises(ConfigError, match=message):
            train_and_evaluate(config, str(workdir))
        assert not workdir.exists(), name
