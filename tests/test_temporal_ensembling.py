"""Temporal ensembling: ramp, regularizer, table updates, composition, devices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_memat.attacks import AttackSpec
from jax_memat.models import get_model, make_apply_fn
from jax_memat.objectives import (
    StepInfo,
    make_objective,
    ramp,
    te_penalty,
    update_soft_labels,
    with_temporal_ensembling,
)
from jax_memat.objectives.temporal_ensembling import NAME, SOFT_LABELS
from jax_memat.training import (
    create_train_state,
    make_mesh,
    make_optimizer,
    make_train_step,
    shard_batch,
)
from tests.helpers import F32_EPS

ATTACK = AttackSpec("pgd", eps=0.1, step_size=0.04, steps=2)
N, K = 40, 4


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [(1, 0.0), (89, 0.0), (90, math.exp(-5)), (120, math.exp(-1.25)), (150, 1.0), (200, 1.0)],
)
def test_ramp_hand_values(epoch, expected):
    assert float(ramp(epoch, 90, 150)) == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_penalty_hand_value():
    # softmax([0, ln 3]) = (1/4, 3/4); target (1/2, 1/2): mean of squares 1/16.
    logits = jnp.array([[0.0, math.log(3.0)]])
    pen = te_penalty(logits, jnp.array([[0.5, 0.5]]), 300.0)
    assert float(pen[0]) == pytest.approx(300.0 / 16, rel=1e-6)


def test_table_update_touches_only_batch_rows_and_normalizes():
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.uniform(size=(6, 3)), jnp.float32)
    idx = jnp.array([1, 4])
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 3)), jnp.float32))
    new, targets = update_soft_labels(table, idx, probs, 0.9)
    untouched = np.array([0, 2, 3, 5])
    np.testing.assert_array_equal(np.asarray(new)[untouched], np.asarray(table)[untouched])
    expected = 0.9 * np.asarray(table)[[1, 4]] + 0.1 * np.asarray(probs)
    np.testing.assert_allclose(np.asarray(new)[[1, 4]], expected, rtol=1e-6)
    np.testing.assert_allclose(targets, expected / expected.sum(-1, keepdims=True), rtol=1e-6)
    # From the all-zero start the target is p itself.
    _, first = update_soft_labels(jnp.zeros((6, 3)), idx, probs, 0.9)
    np.testing.assert_allclose(first, probs, rtol=1e-6)


def _setup(seed=0):
    module = get_model("small_cnn", K)
    apply_fn = make_apply_fn(module)
    state = create_train_state(module, jax.random.key(seed), (8, 8, 1), make_optimizer("sgd", 0.1))
    rng = np.random.default_rng(seed)
    batch = {
        "image": jnp.asarray(rng.uniform(size=(8, 8, 8, 1)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, K, 8), jnp.int32),
        "index": jnp.asarray(rng.permutation(N)[:8], jnp.int32),
    }
    # Pretend the table already holds some history.
    table = jnp.asarray(rng.uniform(size=(N, K)), jnp.float32)
    return apply_fn, state, batch, table


def _info(step, key, steps_per_epoch=5):
    return StepInfo(
        step=jnp.int32(step), epoch=jnp.int32(step // steps_per_epoch + 1), key=jax.random.key(key)
    )


def _te_state(table, inner=None):
    return {NAME: {SOFT_LABELS: table}, "inner": {} if inner is None else inner}


@pytest.mark.parametrize("objective", ["pgd_at", "trades"])
def test_weight_zero_is_exactly_the_base_loss_and_gradient(objective):
    apply_fn, state, batch, table = _setup()
    base = make_objective(objective, apply_fn, ATTACK)
    te = with_temporal_ensembling(base, apply_fn, weight=0.0, ramp_start=1, ramp_end=2)
    info = _info(12, 7)

    def mean_of(obj, obj_state):
        return lambda p: jnp.mean(obj.loss(p, state.model_state, obj_state, batch, info)[0])

    lb, gb = jax.value_and_grad(mean_of(base, {}))(state.params)
    lt, gt = jax.value_and_grad(mean_of(te, _te_state(table)))(state.params)
    assert float(lb) == float(lt)
    for a, b in zip(jax.tree.leaves(gb), jax.tree.leaves(gt), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("objective", "output"),
    [("pgd_at", "natural"), ("trades", "natural"), ("trades", "adversarial")],
)
def test_composes_with_objectives(objective, output):
    """TE loss = base loss + w(t) * mean_k (softmax(z) - q)^2, q from the updated table."""
    apply_fn, state, batch, table = _setup(1)
    base = make_objective(objective, apply_fn, ATTACK)
    te = with_temporal_ensembling(
        base,
        apply_fn,
        weight=300.0,
        ramp_start=2,
        ramp_end=4,
        regularize_attack=False,
        output=output,
    )
    info = _info(12, 3)  # epoch 3: ramp exp(-5 (1 - 1/2)^2)
    loss_b, aux_b = base.loss(state.params, state.model_state, {}, batch, info)
    loss_t, aux_t = te.loss(state.params, state.model_state, _te_state(table), batch, info)

    clean, _ = apply_fn(state.variables, batch["image"], False)
    rows = 0.9 * table[batch["index"]] + 0.1 * jax.nn.softmax(clean)
    q = rows / rows.sum(-1, keepdims=True)
    w = 300.0 * math.exp(-5 * 0.25)
    key_logits = "logits_natural" if objective == "trades" and output == "natural" else "logits"
    z = aux_b.per_example[key_logits]
    expected = loss_b + w * jnp.mean((jax.nn.softmax(z) - q) ** 2, -1)
    np.testing.assert_allclose(loss_t, expected, rtol=1e-5, atol=1e-6)
    new_table = aux_t.objective_state[NAME][SOFT_LABELS]
    # Same formula along another code path (jit inside the loss vs eager here): a few ulps.
    np.testing.assert_allclose(new_table[batch["index"]], rows, rtol=16 * F32_EPS)
    mask = np.ones(N, bool)
    mask[np.asarray(batch["index"])] = False
    np.testing.assert_array_equal(np.asarray(new_table)[mask], np.asarray(table)[mask])
    assert aux_t.objective_state["inner"] == {}


def test_no_update_before_ramp_start():
    apply_fn, state, batch, table = _setup(2)
    base = make_objective("pgd_at", apply_fn, ATTACK)
    te = with_temporal_ensembling(base, apply_fn, ramp_start=3, ramp_end=4)
    info = _info(9, 0)  # epoch 2
    loss_b, _ = base.loss(state.params, state.model_state, {}, batch, info)
    loss_t, aux = te.loss(state.params, state.model_state, _te_state(table), batch, info)
    np.testing.assert_array_equal(aux.objective_state[NAME][SOFT_LABELS], table)
    np.testing.assert_array_equal(loss_b, loss_t)


def test_needs_its_state_and_the_epoch():
    apply_fn, state, batch, table = _setup(2)
    te = with_temporal_ensembling(make_objective("pgd_at", apply_fn, ATTACK), apply_fn)
    with pytest.raises(ValueError, match="objective_state=objective.init"):
        te.loss(state.params, state.model_state, {}, batch, _info(9, 0))
    no_epoch = StepInfo(step=jnp.int32(9), epoch=None, key=jax.random.key(0))
    with pytest.raises(ValueError, match="steps_per_epoch"):
        te.loss(state.params, state.model_state, _te_state(table), batch, no_epoch)


def _te_steps(devices, num_steps=3):
    mesh = make_mesh(devices)
    module = get_model("small_cnn", K)
    apply_fn = make_apply_fn(module)
    tx = make_optimizer("sgd", 0.05, momentum=0.9)
    objective = with_temporal_ensembling(
        make_objective("pgd_at", apply_fn, ATTACK),
        apply_fn,
        ramp_start=1,
        ramp_end=2,
        weight=30.0,
    )
    state = create_train_state(
        module, jax.random.key(0), (8, 8, 1), tx, mesh, objective_state=objective.init(N, K)
    )
    step = make_train_step(objective, tx, mesh, steps_per_epoch=1)
    rng = np.random.default_rng(0)
    for i in range(num_steps):
        batch = {
            "image": rng.uniform(size=(16, 8, 8, 1)).astype(np.float32),
            "label": rng.integers(0, K, 16).astype(np.int32),
            "index": ((np.arange(16) + 16 * i) % N).astype(np.int32),
        }
        state, _ = step(state, shard_batch(batch, mesh))
    return jax.device_get(state)


def test_eight_devices_give_the_same_table_and_step_as_one():
    s8, s1 = _te_steps(jax.devices()), _te_steps(jax.devices()[:1])
    t8 = s8.objective_state[NAME][SOFT_LABELS]
    t1 = s1.objective_state[NAME][SOFT_LABELS]
    assert np.abs(t1).sum() > 0
    np.testing.assert_allclose(t8, t1, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_bad_te_arguments():
    base = make_objective("pgd_at", lambda v, x, t: (x, {}), ATTACK)
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\), got 1.0"):
        with_temporal_ensembling(base, None, momentum=1.0)
    with pytest.raises(ValueError, match="1 <= ramp_start < ramp_end, got 5 and 5"):
        with_temporal_ensembling(base, None, ramp_start=5, ramp_end=5)
    with pytest.raises(ValueError, match="weight must be a finite number >= 0, got -1.0"):
        with_temporal_ensembling(base, None, weight=-1.0)
    with pytest.raises(ValueError, match="output='logits' is not accepted"):
        with_temporal_ensembling(base, None, output="logits")
