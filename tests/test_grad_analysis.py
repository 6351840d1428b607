"""Per-example gradients of objectives, their reductions, and the gradient-statistics probe."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_memat.analysis import (
    GradStats,
    find_recorder_state,
    grad_reductions,
    noise_scale,
    per_example_grads,
    plot_gradient_stats,
    summarize_epoch,
)
from jax_memat.attacks import AttackSpec
from jax_memat.models import get_model, init_model, make_apply_fn
from jax_memat.objectives import LossAux, Objective, StepInfo, make_objective, stateless_init
from jax_memat.training import (
    create_train_state,
    make_mesh,
    make_optimizer,
    make_train_step,
    shard_batch,
)
from jax_memat.training.state import TrainState
from jax_memat.training.train_step import step_keys
from tests.helpers import F32_EPS, mlp_apply

SHAPE, CLASSES = (8, 8, 1), 4


def _batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.uniform(size=(n, *SHAPE)).astype(np.float32),
        "label": rng.integers(0, CLASSES, n).astype(np.int32),
        "index": np.arange(n, dtype=np.int32),
    }


def _info(step=0, seed=1):
    return StepInfo(step=jnp.int32(step), epoch=None, key=jax.random.key(seed))


def _mlp_params(hidden=16, seed=0):
    rng = np.random.default_rng(seed)
    dim = int(np.prod(SHAPE))
    params = {
        "w1": rng.normal(size=(dim, hidden)) / np.sqrt(dim),
        "b1": rng.normal(size=hidden) * 0.1,
        "w2": rng.normal(size=(hidden, CLASSES)) / np.sqrt(hidden),
        "b2": np.zeros(CLASSES),
    }
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def _cnn():
    module = get_model("small_cnn", CLASSES)
    variables = init_model(module, jax.random.key(0), SHAPE)
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return make_apply_fn(module), variables["params"], model_state


def _assert_trees_close(a, b, rounds):
    """Equal up to ``rounds`` float32 roundings of the largest entry of ``b``."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=0, atol=rounds * F32_EPS * np.abs(y).max())


def _stack(trees):
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


# Attack without random start: each example's adversarial input depends on it alone,
# so the gradient in the batch equals the gradient of the example on its own.
DETERMINISTIC_PGD = AttackSpec("pgd", 0.1, 0.03, 3, "linf", random_start=False)


@pytest.mark.parametrize("name", ["standard", "pgd_at"])
@pytest.mark.parametrize("microbatch", [None, 4, 1])
def test_per_example_grads_match_a_loop_over_single_examples(name, microbatch):
    objective = make_objective(name, mlp_apply, DETERMINISTIC_PGD)
    params, batch, info = _mlp_params(), _batch(6), _info()
    got = jax.jit(per_example_grads(objective, microbatch=microbatch))(params, {}, {}, batch, info)

    def single_loss(p, one):
        return objective.loss(p, {}, {}, one, info)[0][0]

    expected = _stack(
        [
            jax.grad(single_loss)(params, {k: v[i : i + 1] for k, v in batch.items()})
            for i in range(6)
        ]
    )
    # Forward passes of different batch shapes round differently (matmul blocking).
    _assert_trees_close(got, expected, rounds=64)
    # Every example has its own gradient (no example is a copy of another).
    norms = np.sqrt(sum(np.sum(np.square(g).reshape(6, -1), 1) for g in jax.tree.leaves(got)))
    assert len(np.unique(np.round(norms, 4))) == 6


def test_batchnorm_per_example_grads_follow_the_stated_semantics():
    """With BatchNorm, ``g_i`` is the gradient of l_i in the full-batch forward pass."""
    apply_fn, params, model_state = _cnn()
    attack = AttackSpec("pgd", 0.1, 0.03, 2, "linf", random_start=True)
    objective = make_objective("pgd_at", apply_fn, attack)
    batch, info = _batch(6), _info()
    got = jax.jit(per_example_grads(objective, microbatch=4))(params, model_state, {}, batch, info)

    def term(p, i):
        return objective.loss(p, model_state, {}, batch, info)[0][i]

    grad_term = jax.jit(jax.grad(term))  # one compile: the index is traced
    expected = _stack([grad_term(params, jnp.int32(i)) for i in range(6)])
    _assert_trees_close(got, expected, rounds=64)
    # It is not the gradient of the example alone (one-example BatchNorm statistics).
    alone = jax.grad(
        lambda p: objective.loss(p, model_state, {}, {k: v[:1] for k, v in batch.items()}, info)[0][
            0
        ]
    )(params)
    differences = [
        np.abs(np.asarray(g[0]) - np.asarray(a)).max()
        for g, a in zip(jax.tree.leaves(got), jax.tree.leaves(alone), strict=True)
    ]
    assert max(differences) > 1e-2


@pytest.mark.parametrize("name", ["pgd_at", "trades"])
def test_mean_of_per_example_grads_is_the_train_steps_gradient(name):
    """Mean over examples == the gradient the step handed the optimizer (BatchNorm model)."""
    mesh = make_mesh()
    module = get_model("small_cnn", CLASSES)
    attack = AttackSpec("pgd", 0.1, 0.03, 2, "linf", random_start=True)
    objective = make_objective(name, make_apply_fn(module), attack)
    stats = GradStats(every_steps=1, microbatch=3)
    tx = stats.optimizer(make_optimizer("sgd", 0.05, momentum=0.9, weight_decay=5e-4))
    state = create_train_state(module, jax.random.key(0), SHAPE, tx, mesh)
    batch = _batch(8)
    info = StepInfo(step=state.step, epoch=None, key=step_keys(state.rng, state.step)["attack"])
    args = (state.params, state.model_state, state.objective_state, batch, info)
    grads = jax.jit(per_example_grads(objective, microbatch=3))(*args)
    reductions = jax.jit(grad_reductions(objective, microbatch=5))(*args)

    step = make_train_step(objective, tx, mesh, probe=stats)
    new_state, metrics = step(state, shard_batch(batch, mesh))
    step_grad = find_recorder_state(new_state.opt_state).previous
    # A sum of 8 float32 gradients in another order than the step's.
    _assert_trees_close(jax.tree.map(lambda g: g.mean(0), grads), step_grad, rounds=32)
    _assert_trees_close(reductions.mean, step_grad, rounds=32)
    # The probe's per-example statistics (inside the step) agree with the same reductions.
    np.testing.assert_allclose(
        metrics["grad_example_norm_mean"], np.mean(reductions.norms), rtol=64 * F32_EPS
    )


@pytest.mark.parametrize(
    "microbatch, unroll, examples",
    [(None, None, None), (3, True, None), (3, False, None), (2, None, 5)],
)
@pytest.mark.parametrize("name", ["standard", "trades"])
def test_reductions_equal_those_of_the_full_pytree(name, microbatch, unroll, examples):
    apply_fn, params, model_state = _cnn()
    objective = make_objective(name, apply_fn, AttackSpec("pgd", 0.1, 0.03, 2))
    args = (params, model_state, {}, _batch(8, seed=3), _info())
    grads = jax.device_get(jax.jit(per_example_grads(objective))(*args))
    reductions = grad_reductions(objective, microbatch=microbatch, unroll=unroll, examples=examples)
    r = jax.device_get(jax.jit(reductions)(*args))

    k = examples or 8  # the reductions cover the first k examples of the batch
    grads = jax.tree.map(lambda g: g[:k], grads)
    flat = np.concatenate(
        [np.asarray(g, np.float64).reshape(k, -1) for g in jax.tree.leaves(grads)], 1
    )
    mean = flat.mean(0)
    sq = np.sum(flat**2, 1)
    scale = sq.max()
    np.testing.assert_allclose(r.sq_norms, sq, rtol=0, atol=64 * F32_EPS * scale)
    np.testing.assert_allclose(r.norms, np.sqrt(sq), rtol=64 * F32_EPS)
    _assert_trees_close(r.mean, jax.tree.map(lambda g: g.mean(0), grads), rounds=32)
    variance = np.mean(np.sum((flat - mean) ** 2, 1))
    # mean ||g_i||^2 - ||mean||^2: absolute error of order eps * mean ||g_i||^2.
    np.testing.assert_allclose(r.variance, variance, rtol=0, atol=256 * F32_EPS * sq.mean())
    cosine = flat @ mean / (np.sqrt(sq) * np.linalg.norm(mean))
    np.testing.assert_allclose(r.cosine, cosine, rtol=0, atol=1e-4)
    # The cosines are not all alike (a real check of the per-example dot products).
    assert np.ptp(cosine) > 0.1
    np.testing.assert_array_equal(r.loss, jax.jit(objective.loss)(*args)[0])


def test_reductions_refuse_more_examples_than_the_batch():
    reductions = grad_reductions(make_objective("standard", mlp_apply), examples=7)
    with pytest.raises(ValueError, match="examples=7 exceeds the batch of 6"):
        reductions(_mlp_params(), {}, {}, _batch(6), _info())


# A linear model with the squared loss: l_i = (w . x_i + b - t_i)^2 / 2, whose
# per-example gradients are (r_i x_i, r_i) with r_i the residual, by hand.
DIM = 3


def _linear_objective() -> Objective:
    def loss(params, model_state, state, batch, info):
        x = batch["image"].reshape(batch["image"].shape[0], -1)
        prediction = x @ params["w"] + params["b"]
        residual = prediction - batch["target"]
        logits = jnp.stack([prediction, -prediction], -1)
        return 0.5 * residual**2, LossAux(model_state, state, {"logits": logits})

    return Objective(stateless_init, loss)


def _linear_batch(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(8, DIM))
    return {
        "image": x.astype(np.float32),
        "target": (x @ np.array([1.0, -2.0, 0.5]) + 3.0 + rng.normal(size=8)).astype(np.float32),
        "label": np.zeros(8, np.int32),
        "index": np.arange(8, dtype=np.int32),
    }


def _hand_grads(params, batch):
    """Per-example gradients [8, DIM + 1] (w then b), in float64."""
    x = np.asarray(batch["image"], np.float64)
    residual = x @ params[:DIM] + params[DIM] - np.asarray(batch["target"], np.float64)
    return np.concatenate([residual[:, None] * x, residual[:, None]], 1)


def test_probe_statistics_match_hand_computations_on_a_linear_model():
    objective = _linear_objective()
    lr = 0.1
    stats = GradStats(every_steps=2, microbatch=3)
    tx = stats.optimizer(optax.sgd(lr))
    params0 = {"w": jnp.array([0.3, 0.1, -0.2], jnp.float32), "b": jnp.float32(0.5)}
    mesh = make_mesh(jax.devices()[:1])
    state = TrainState(
        step=jnp.int32(0),
        params=params0,
        model_state={},
        opt_state=tx.init(params0),
        rng=jax.random.key_data(jax.random.key(0)),
    )
    step = make_train_step(objective, tx, mesh, probe=stats)
    batches = [_linear_batch(s) for s in range(3)]
    theta = np.array([0.3, 0.1, -0.2, 0.5])
    metrics, previous = [], None
    for t, batch in enumerate(batches):
        state, m = step(state, shard_batch(batch, mesh))
        m = jax.device_get(m)
        metrics.append(m)
        per_example = _hand_grads(theta, batch)
        g = per_example.mean(0)
        new_theta = theta - lr * g
        np.testing.assert_allclose(m["grad_norm"], np.linalg.norm(g), rtol=1e-5)
        np.testing.assert_allclose(m["grad_norm_sq"], g @ g, rtol=1e-5)
        if previous is None:
            assert np.isnan(m["grad_cosine_prev"])
        else:
            cos = g @ previous / (np.linalg.norm(g) * np.linalg.norm(previous))
            np.testing.assert_allclose(m["grad_cosine_prev"], cos, rtol=0, atol=1e-5)
        if t % 2 == 0:  # sampled
            assert m["grad_sampled"] == 1.0
            norms = np.linalg.norm(per_example, axis=1)
            quantiles = np.quantile(norms, [0, 0.25, 0.5, 0.75, 1])
            for key, q in zip(("min", "q25", "median", "q75", "max"), quantiles, strict=True):
                np.testing.assert_allclose(
                    m[f"grad_example_norm_{key}"], q, rtol=0, atol=1e-5 * norms.max()
                )
            np.testing.assert_allclose(m["grad_example_norm_mean"], norms.mean(), rtol=1e-5)
            cosines = per_example @ g / (norms * np.linalg.norm(g))
            np.testing.assert_allclose(
                m["grad_example_cosine_mean"], cosines.mean(), rtol=0, atol=1e-5
            )
            trace = np.sum((per_example - g) ** 2) / (8 - 1)
            signal = g @ g - trace / 8
            scale = np.mean(norms**2)  # the size of the terms the estimates subtract
            np.testing.assert_allclose(m["grad_variance"], trace, rtol=0, atol=1e-5 * scale)
            np.testing.assert_allclose(m["grad_signal_sq"], signal, rtol=0, atol=1e-5 * scale)
            assert signal > 0.1 * scale  # the noise scale below is well conditioned
            np.testing.assert_allclose(m["grad_noise_scale"], trace / signal, rtol=1e-4)
            # Smoothness on the same batch: for this quadratic, g(theta') - g(theta) =
            # X~^T X~ (theta' - theta) / B with X~ = [X, 1].
            g_new = _hand_grads(new_theta, batch).mean(0)
            ratio = np.linalg.norm(g_new - g) / np.linalg.norm(new_theta - theta)
            np.testing.assert_allclose(m["grad_smoothness"], ratio, rtol=1e-4)
        else:
            assert m["grad_sampled"] == 0.0
            for key in stats.sampled_keys:
                assert np.isnan(m[key]), key
        previous, theta = g, new_theta
    np.testing.assert_allclose(
        np.concatenate([np.asarray(state.params["w"]), [state.params["b"]]]), theta, rtol=1e-5
    )


def test_probe_leaves_the_update_bit_identical():
    mesh = make_mesh()
    module = get_model("small_cnn", CLASSES)
    attack = AttackSpec("pgd", 0.1, 0.03, 2, "linf", random_start=True)
    objective = make_objective("trades", make_apply_fn(module), attack)
    tx = make_optimizer("sgd", 0.05, momentum=0.9, weight_decay=5e-4)
    stats = GradStats(every_steps=2, microbatch=3)

    def run(with_probe, host=False):
        opt = stats.optimizer(tx) if with_probe else tx
        state = create_train_state(module, jax.random.key(0), SHAPE, opt, mesh)
        step = make_train_step(objective, opt, mesh, probe=stats if with_probe else None)
        metrics = []
        for i in range(3):
            # host: the loop's way, sampling decided on the host (a static argument).
            sample = (stats.samples(i),) if host else ()
            state, m = step(state, shard_batch(_batch(8, seed=i), mesh), *sample)
            metrics.append(jax.device_get(m))
        return jax.device_get(state), metrics

    plain, m_plain = run(False)
    probed, m_probed = run(True)
    hosted, m_hosted = run(True, host=True)
    assert int(probed.step) == 3
    for field in ("params", "model_state", "rng", "step"):
        for a, b, c in zip(
            jax.tree.leaves(getattr(plain, field)),
            jax.tree.leaves(getattr(probed, field)),
            jax.tree.leaves(getattr(hosted, field)),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c)
    # The optimizer's own state (momentum) is the same; the recorder is chained before it.
    for a, b in zip(
        jax.tree.leaves(plain.opt_state), jax.tree.leaves(probed.opt_state[1]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(m_plain, m_probed, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert [m["grad_sampled"] for m in m_probed] == [1.0, 0.0, 1.0]
    assert np.isnan(m_probed[0]["grad_cosine_prev"])
    assert all(-1 <= m["grad_cosine_prev"] <= 1 for m in m_probed[1:])
    for key in stats.sampled_keys:
        assert np.isfinite(m_probed[0][key]) and np.isnan(m_probed[1][key]), key
    # Sampling decided on the host gives the same statistics (another program: roundings).
    for a, b in zip(m_probed, m_hosted, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
    with pytest.raises(TypeError, match="use True, False or None"):
        make_train_step(objective, stats.optimizer(tx), mesh, probe=stats)(
            hosted, shard_batch(_batch(8), mesh), 1
        )


def test_summarize_epoch_averages_sampled_values_over_sampled_steps_only():
    nan = float("nan")

    def step(norm, cos, sampled, variance=nan, signal=nan, smooth=nan):
        return {
            "grad_norm": norm,
            "grad_cosine_prev": cos,
            "grad_sampled": float(sampled),
            "grad_variance": variance,
            "grad_signal_sq": signal,
            "grad_noise_scale": variance / signal if sampled else nan,
            "grad_smoothness": smooth,
        }

    rows = [
        step(1.0, nan, True, variance=4.0, signal=1.0, smooth=2.0),
        step(2.0, 0.5, False),
        step(3.0, -0.1, True, variance=8.0, signal=3.0, smooth=6.0),
        step(6.0, 0.2, False),
    ]
    out = summarize_epoch(rows)
    assert out["grad_norm"] == pytest.approx(3.0)
    assert out["grad_cosine_prev"] == pytest.approx(0.2)  # the first step has no previous
    assert out["grad_sampled_steps"] == 2
    assert out["grad_variance"] == pytest.approx(6.0)
    assert out["grad_smoothness"] == pytest.approx(4.0)
    # Ratio of the means (6 / 2), not the mean of the per-step ratios ((4 + 8/3) / 2).
    assert out["grad_noise_scale"] == pytest.approx(3.0)
    # No sampled step: the sampled keys are left out; no statistics at all: nothing.
    out = summarize_epoch([rows[1], rows[3]])
    assert out["grad_sampled_steps"] == 0 and "grad_variance" not in out
    assert summarize_epoch([{"loss": 1.0}]) == {}
    # A non-positive mean signal gives no noise scale (JSON null).
    assert (
        summarize_epoch([step(1.0, 0.1, True, variance=1.0, signal=-0.5)])["grad_noise_scale"]
        is None
    )


def test_noise_scale_needs_two_examples():
    r = grad_reductions(_linear_objective())(
        {"w": jnp.zeros(DIM), "b": jnp.float32(0)},
        {},
        {},
        {k: v[:1] for k, v in _linear_batch(0).items()},
        _info(),
    )
    with pytest.raises(ValueError, match="at least 2 examples"):
        noise_scale(r)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "8"])
def test_bad_microbatch_is_refused_before_tracing(bad):
    objective = make_objective("standard", mlp_apply)
    for build in (per_example_grads, grad_reductions):
        with pytest.raises(ValueError, match="microbatch=.* is not accepted; use None"):
            build(objective, microbatch=bad)
    with pytest.raises(ValueError, match="microbatch"):
        GradStats(every_steps=1, microbatch=bad)


@pytest.mark.parametrize("bad", [0, -1, 2.0, None])
def test_bad_every_steps_is_refused(bad):
    with pytest.raises(ValueError, match="every_steps=.* is not accepted; use a positive integer"):
        GradStats(every_steps=bad)


def test_bad_examples_are_refused():
    with pytest.raises(ValueError, match="examples=0 is not accepted; use None"):
        grad_reductions(make_objective("standard", mlp_apply), examples=0)
    with pytest.raises(ValueError, match="examples=1 is not accepted: a variance needs"):
        GradStats(every_steps=1, examples=1)


def test_not_an_objective_or_a_bad_unroll_is_refused():
    with pytest.raises(TypeError, match="takes an Objective"):
        per_example_grads(lambda *a: None)
    with pytest.raises(ValueError, match="unroll=1 is not accepted; use None, True or False"):
        grad_reductions(make_objective("standard", mlp_apply), unroll=1)


def test_probe_without_its_optimizer_or_with_a_clashing_name_is_refused():
    mesh = make_mesh(jax.devices()[:1])
    module = get_model("small_cnn", CLASSES)
    objective = make_objective("standard", make_apply_fn(module))
    tx = optax.sgd(0.1)
    state = create_train_state(module, jax.random.key(0), SHAPE, tx, mesh)
    batch = shard_batch(_batch(8), mesh)
    step = make_train_step(objective, tx, mesh, probe=GradStats(every_steps=1))
    with pytest.raises(ValueError, match="grad_stats.optimizer"):
        step(state, batch)
    step = make_train_step(objective, tx, mesh, probe=lambda view: {"loss": view.state.step})
    with pytest.raises(ValueError, match=r"reuse the step's own names"):
        step(state, batch)


def test_plot_gradient_stats_writes_a_png_and_refuses_rows_without_statistics(tmp_path):
    rows = [
        {
            "epoch": e,
            "grad_norm_sq": 4.0 / e,
            "grad_norm": 2.0 / e**0.5,
            "grad_cosine_prev": 0.1 * e,
            "grad_example_cosine_mean": 0.3,
            "grad_noise_scale": 10.0 * e,
            "grad_example_norm_min": 0.5,
            "grad_example_norm_q25": 1.0,
            "grad_example_norm_median": 1.5,
            "grad_example_norm_q75": 2.0,
            "grad_example_norm_max": 3.0,
            "grad_smoothness": None if e == 2 else 5.0,
        }
        for e in (1, 2, 3)
    ]
    path = str(tmp_path / "grads.png")
    assert plot_gradient_stats(rows, path, "run") == path
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["grads.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match="no gradient statistics"):
        plot_gradient_stats([{"epoch": 1, "train_loss": 1.0}], str(tmp_path / "x.png"))
    assert os.listdir(tmp_path) == ["grads.png"]
