"""Objectives with their own state: nesting transforms, per-example outputs, and the redesign.

- Two stateful transforms nested both advance their state, in the documented
  layout ``{outer: ..., "inner": {inner: ..., "inner": base}}``.
- The train step's per-example outputs equal a direct evaluation of the
  objective on the same state, batch and key.
- The same seed gives the parameters recorded with the API before the
  redesign (``tests/fixtures/te_reference.npz``, commit in its JSON).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_memat.attacks import AttackSpec
from jax_memat.data import load_dataset
from jax_memat.experiment import read_metrics, train_and_evaluate
from jax_memat.models import get_model, make_apply_fn
from jax_memat.objectives import (
    INNER,
    Objective,
    StepInfo,
    make_objective,
    margin,
    transform_state,
    with_temporal_ensembling,
)
from jax_memat.objectives.temporal_ensembling import NAME as TE
from jax_memat.objectives.temporal_ensembling import SOFT_LABELS
from jax_memat.training import (
    create_train_state,
    make_mesh,
    make_optimizer,
    make_train_step,
    shard_batch,
)
from jax_memat.training.train_step import step_keys
from tests.helpers import F32_EPS
from tests.test_run import tiny_config

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
ATTACK = AttackSpec("pgd", 0.1, 0.04, 3)


def counting(objective: Objective) -> Objective:
    """A test transform whose state counts the steps it has seen."""

    def init(n, k):
        return transform_state("count", jnp.zeros((), jnp.int32), objective.init(n, k))

    def loss(params, model_state, state, batch, info):
        losses, aux = objective.loss(params, model_state, state[INNER], batch, info)
        new = transform_state("count", state["count"] + 1, aux.objective_state)
        return losses, aux._replace(objective_state=new)

    return Objective(init, loss)


def _batches(train, n):
    for i in range(n):
        rows = np.arange(32) + 32 * (i % 2)
        yield {
            "image": train.images[rows].astype(np.float32) / 255.0,
            "label": train.labels[rows],
            "index": rows.astype(np.int32),
        }


def _run(objective_of, steps, devices=None, per_example=False):
    mesh = make_mesh(devices or jax.devices()[:1])
    train = load_dataset("synthetic", "train", num_examples=64, seed=0)
    module = get_model("small_cnn", train.num_classes)
    apply_fn = make_apply_fn(module)
    tx = make_optimizer("sgd", 0.05, momentum=0.9, weight_decay=5e-4)
    objective = objective_of(apply_fn)
    state = create_train_state(
        module,
        jax.random.key(0),
        train.image_shape,
        tx,
        mesh,
        objective_state=objective.init(train.num_examples, train.num_classes),
    )
    step = make_train_step(objective, tx, mesh, steps_per_epoch=1, per_example=per_example)
    outputs = []
    for batch in _batches(train, steps):
        state, metrics, *rest = step(state, shard_batch(batch, mesh))
        outputs.append(rest)
    return state, metrics, outputs


def _te(objective, apply_fn):
    return with_temporal_ensembling(objective, apply_fn, weight=30.0, ramp_start=1, ramp_end=3)


@pytest.mark.parametrize("order", ["te_outside", "count_outside"])
def test_nested_stateful_transforms_each_advance_their_own_state(order):
    def build(apply_fn):
        base = make_objective("pgd_at", apply_fn, ATTACK)
        if order == "te_outside":
            return _te(counting(base), apply_fn)
        return counting(_te(base, apply_fn))

    state, _, _ = _run(build, steps=3)
    s = jax.device_get(state.objective_state)
    if order == "te_outside":  # {"temporal_ensembling": ..., "inner": {"count": ..., "inner": {}}}
        count, table, base = s[INNER]["count"], s[TE][SOFT_LABELS], s[INNER][INNER]
    else:  # {"count": ..., "inner": {"temporal_ensembling": ..., "inner": {}}}
        count, table, base = s["count"], s[INNER][TE][SOFT_LABELS], s[INNER][INNER]
    assert int(count) == 3
    # Rows 0-31 were seen twice, 32-63 once: 1 - 0.9^2 and 1 - 0.9 of their mass.
    np.testing.assert_allclose(table.sum(-1)[:32], 0.19, rtol=1e-5)
    np.testing.assert_allclose(table.sum(-1)[32:], 0.1, rtol=1e-5)
    assert base == {}


def test_same_parameters_as_before_the_redesign():
    """Four PGD-AT+TE steps, as recorded with the API of the commit in te_reference.json."""
    with open(os.path.join(FIXTURES, "te_reference.json")) as f:
        assert json.load(f)["commit"]
    ref = np.load(os.path.join(FIXTURES, "te_reference.npz"))
    state, metrics, _ = _run(
        lambda apply_fn: _te(make_objective("pgd_at", apply_fn, ATTACK), apply_fn), steps=4
    )
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))
    assert len(leaves) == len(ref.files) - 2
    for path, value in leaves:
        expected = ref[jax.tree_util.keystr(path)]
        # Measured bit-identical on jax 0.10 (CPU); another XLA version may fuse the
        # float32 sums differently, hence a few ulps of the largest entry.
        np.testing.assert_allclose(
            value, expected, rtol=0, atol=64 * F32_EPS * np.abs(expected).max()
        )
    table = jax.device_get(state.objective_state[TE][SOFT_LABELS])
    np.testing.assert_allclose(table, ref["te_table"], rtol=0, atol=64 * F32_EPS)
    assert float(metrics["loss"]) == pytest.approx(float(ref["loss"]), rel=64 * F32_EPS)


def test_per_example_outputs_equal_a_direct_evaluation():
    def build(apply_fn):
        return _te(make_objective("trades", apply_fn, ATTACK), apply_fn)

    # One step on 8 devices with outputs, then the same objective evaluated
    # directly (eagerly, on the host) on the state and batch that step saw.
    mesh8 = make_mesh(jax.devices())
    train = load_dataset("synthetic", "train", num_examples=64, seed=0)
    module = get_model("small_cnn", train.num_classes)
    apply_fn = make_apply_fn(module)
    tx = make_optimizer("sgd", 0.05, momentum=0.9)
    objective = build(apply_fn)
    state = create_train_state(
        module, jax.random.key(0), train.image_shape, tx, mesh8,
        objective_state=objective.init(train.num_examples, train.num_classes),
    )  # fmt: skip
    before = jax.tree.map(jnp.asarray, jax.device_get(state))  # on one device, eager
    batch = next(_batches(train, 1))
    step = make_train_step(objective, tx, mesh8, steps_per_epoch=1, per_example=True)
    _, metrics, outputs = step(state, shard_batch(batch, mesh8))
    assert outputs["loss"].sharding.spec == shard_batch(batch, mesh8)["index"].sharding.spec
    outputs = jax.device_get(outputs)

    info = StepInfo(
        step=before.step, epoch=before.step + 1, key=step_keys(before.rng, before.step)["attack"]
    )
    losses, aux = objective.loss(
        before.params, before.model_state, before.objective_state, batch, info
    )
    logits = aux.per_example["logits"]
    scale = float(np.abs(losses).max())
    np.testing.assert_array_equal(outputs["index"], batch["index"])
    np.testing.assert_array_equal(outputs["label"], batch["label"])
    np.testing.assert_allclose(outputs["loss"], losses, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(
        outputs["margin"], margin(logits, batch["label"]), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_array_equal(outputs["correct"], np.argmax(logits, -1) == batch["label"])
    assert float(metrics["loss"]) == pytest.approx(float(np.mean(outputs["loss"])), rel=1e-5)


def test_margin_hand_values():
    logits = jnp.array([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]])
    np.testing.assert_allclose(margin(logits, jnp.array([0, 0])), [1.0, -3.0])


def test_loop_hands_per_example_outputs_to_hooks_and_records_them(tmp_path):
    config = tiny_config(epochs=2)
    config.record.train_per_example = True
    seen = {}

    def hook(step, state, metrics, per_example):
        seen[step] = jax.device_get(per_example)

    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir, hooks=[hook])
    assert sorted(seen) == list(range(1, 7))  # 3 steps per epoch
    record = np.load(os.path.join(workdir, "per_example", "train_steps_epoch0002.npz"))
    for step in (4, 5, 6):  # epoch 2
        out = seen[step]
        np.testing.assert_array_equal(record["loss"][out["index"]], out["loss"])
        np.testing.assert_array_equal(record["correct"][out["index"]], out["correct"])
    visited = np.isfinite(record["loss"])
    assert visited.sum() == 96  # 3 full batches of 32 cover the 96 examples
    rows = read_metrics(workdir)
    epoch2 = [seen[s]["loss"].mean() for s in (4, 5, 6)]
    assert rows[1]["train_loss"] == pytest.approx(float(np.mean(epoch2)), rel=1e-5)
