"""Train step, data parallelism, evaluation, optimizer and schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_memat.attacks import AttackSpec
from jax_memat.data import load_dataset
from jax_memat.evaluation import evaluate, make_eval_fn
from jax_memat.models import get_model, make_apply_fn
from jax_memat.objectives import make_objective
from jax_memat.training import (
    create_train_state,
    make_mesh,
    make_optimizer,
    make_schedule,
    make_train_step,
    replicate,
    shard_batch,
)

ATTACK = AttackSpec("pgd", eps=0.1, step_size=0.03, steps=3, norm="linf", random_start=True)


def _batch(n=16, shape=(8, 8, 1), classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.uniform(size=(n, *shape)).astype(np.float32),
        "label": rng.integers(0, classes, n).astype(np.int32),
        "index": np.arange(n, dtype=np.int32),
    }


def _run_steps(devices, objective, num_steps=2):
    mesh = make_mesh(devices)
    module = get_model("small_cnn", 4)
    tx = make_optimizer("sgd", 0.05, momentum=0.9, weight_decay=5e-4)
    state = create_train_state(module, jax.random.key(0), (8, 8, 1), tx, mesh)
    loss_fn = make_objective(objective, make_apply_fn(module), ATTACK, beta=6.0)
    step = make_train_step(loss_fn, tx, mesh)
    metrics = []
    for i in range(num_steps):
        state, m = step(state, shard_batch(_batch(seed=i), mesh))
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


@pytest.mark.parametrize("objective", ["standard", "pgd_at", "trades"])
def test_eight_devices_equal_one_device(objective):
    assert jax.device_count() == 8, "conftest must simulate 8 CPU devices"
    s8, m8 = _run_steps(jax.devices(), objective)
    s1, m1 = _run_steps(jax.devices()[:1], objective)
    for a, b in zip(jax.tree.leaves(s8), jax.tree.leaves(s1), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    for a, b in zip(m8, m1, strict=True):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-5)
    # The step did something: parameters moved away from their initialization.
    init = create_train_state(
        get_model("small_cnn", 4), jax.random.key(0), (8, 8, 1), make_optimizer("sgd", 0.1)
    )
    moved = [
        np.abs(np.asarray(a) - np.asarray(b)).max()
        for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(init.params), strict=True)
    ]
    assert max(moved) > 1e-4


def test_step_metrics_and_loss_decrease():
    state, metrics = _run_steps(jax.devices()[:1], "standard", num_steps=1)
    m = metrics[0]
    assert set(m) == {"loss", "accuracy", "grad_norm_sq", "finite"}
    assert m["finite"] and m["grad_norm_sq"] > 0 and 0 <= m["accuracy"] <= 1
    # Repeating one batch, standard training must reduce its loss.
    mesh = make_mesh(jax.devices()[:1])
    module = get_model("small_cnn", 4)
    tx = make_optimizer("sgd", 0.05, momentum=0.9)
    state = create_train_state(module, jax.random.key(1), (8, 8, 1), tx, mesh)
    step = make_train_step(make_objective("standard", make_apply_fn(module)), tx, mesh)
    batch = shard_batch(_batch(), mesh)
    losses = []
    for _ in range(15):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 15


def test_sgd_matches_pytorch_semantics():
    """PyTorch SGD: buf = mu * buf + (g + wd * w); w -= lr * buf (buf_0 = g_0 + wd * w_0)."""
    lr, mu, wd = 0.1, 0.9, 0.01
    tx = make_optimizer("sgd", lr, momentum=mu, weight_decay=wd)
    w = jnp.array([1.0, -2.0])
    opt_state = tx.init(w)
    grads = [jnp.array([0.5, 0.25]), jnp.array([-1.0, 2.0])]
    w_ref, buf = np.array([1.0, -2.0]), None
    for g in grads:
        updates, opt_state = tx.update(g, opt_state, w)
        w = optax.apply_updates(w, updates)
        d = np.asarray(g) + wd * w_ref
        buf = d if buf is None else mu * buf + d
        w_ref = w_ref - lr * buf
    np.testing.assert_allclose(w, w_ref, rtol=1e-6)


def test_schedules():
    spe = 10
    multi = make_schedule("multistep", 0.1, steps_per_epoch=spe, epochs=200, milestones=(100, 150))
    assert float(multi(100 * spe - 1)) == pytest.approx(0.1)
    assert float(multi(100 * spe)) == pytest.approx(0.01)
    assert float(multi(150 * spe)) == pytest.approx(0.001)
    step = make_schedule("step", 0.1, steps_per_epoch=spe, epochs=300, step_every=100)
    assert [float(step(e * spe)) for e in (0, 99, 100, 200, 299)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.001, 0.001]
    )
    cos = make_schedule("cosine", 0.1, steps_per_epoch=spe, epochs=10)
    assert float(cos(0)) == pytest.approx(0.1) and float(cos(50)) == pytest.approx(0.05)
    assert float(make_schedule("constant", 0.3, steps_per_epoch=1, epochs=1)(999)) == 0.3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "adam"}, "accepted optimizers: sgd"),
        ({"name": "sgd", "momentum": 1.5}, "momentum"),
        ({"name": "sgd", "weight_decay": -1.0}, "weight_decay"),
    ],
)
def test_optimizer_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer(learning_rate=0.1, **kwargs)


def test_schedule_bad_name():
    with pytest.raises(ValueError, match="accepted schedules: constant, step, multistep, cosine"):
        make_schedule("linear", 0.1, steps_per_epoch=1, epochs=1)


def test_evaluate_counts_every_example_once_and_matches_direct_computation():
    mesh = make_mesh()
    data = load_dataset("synthetic", "test", num_examples=37, image_shape=(8, 8, 1), num_classes=4)
    module = get_model("small_cnn", 4)
    state = create_train_state(
        module, jax.random.key(0), (8, 8, 1), make_optimizer("sgd", 0.1), mesh
    )
    apply_fn = make_apply_fn(module)
    eval_fn = make_eval_fn(apply_fn, {"pgd": ATTACK}, mesh)
    images, labels = replicate((data.images, data.labels), mesh)
    per_example, summary = evaluate(
        eval_fn,
        state.variables,
        images,
        labels,
        batch_size=16,
        key=jax.random.key(3),
        mesh=mesh,
    )
    np.testing.assert_array_equal(per_example["index"], np.arange(37))
    logits, _ = apply_fn(jax.device_get(state.variables), data.images / 255.0, False)
    direct = np.argmax(np.asarray(logits), -1) == data.labels
    np.testing.assert_array_equal(per_example["natural_correct"], direct)
    assert summary["natural_accuracy"] == pytest.approx(direct.mean())
    assert set(summary) == {"natural_accuracy", "natural_loss", "pgd_accuracy", "pgd_loss"}


def test_mixed_precision_step_keeps_float32_state():
    mesh = make_mesh(jax.devices()[:1])
    module = get_model("small_cnn", 4, dtype="bfloat16")
    tx = make_optimizer("sgd", 0.05, momentum=0.9)
    state = create_train_state(module, jax.random.key(0), (8, 8, 1), tx, mesh)
    step = make_train_step(make_objective("pgd_at", make_apply_fn(module), ATTACK), tx, mesh)
    batch = shard_batch(_batch(), mesh)
    losses = []
    for _ in range(10):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.model_state))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
