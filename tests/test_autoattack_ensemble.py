"""The AutoAttack ensemble on a small trained model, over 8 simulated devices.

The model is a 2-layer MLP trained on synthetic 10-class "images" of shape
6x6x2; the default runs use the standard attacks and iteration counts except
Square's queries (300 instead of 5000, version="custom"); the full standard
version runs in the slow tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring
from jax.sharding import Mesh

from jax_memat.attacks import cross_entropy, pgd
from jax_memat.attacks.autoattack import (
    STANDARD_ATTACKS,
    apgd,
    apgd_targeted,
    autoattack,
    fab_targeted,
    square_attack,
)
from jax_memat.parallel import make_mesh
from tests.helpers import mlp_apply, train_mlp

# A lowering happens on every (re)compilation, also when the persistent
# compilation cache of the test set-up then skips the backend compile.
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)

SHAPE, K = (6, 6, 2), 10
EPS = {"linf": 0.06, "l2": 0.5}
N, CHUNK = 64, 16  # 4 chunks of 2 rows per device
QUERIES = 300


def _data(n, seed):
    means = np.random.default_rng(0).uniform(0.3, 0.7, (K, *SHAPE))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    x = np.clip(means[y] + 0.25 * rng.normal(size=(n, *SHAPE)), 0.0, 1.0)
    return x.astype(np.float32), y.astype(np.int32)


@pytest.fixture(scope="module")
def model():
    """``(variables, x_test, y_test)``: the MLP after 300 full-batch Adam steps."""
    x, y = _data(512, 1)
    variables = train_mlp(x, y, K, seed=2)
    x_test, y_test = _data(N, 3)
    return variables, x_test, y_test


def _predict(variables, x):
    return np.argmax(np.asarray(mlp_apply(variables, jnp.asarray(x), False)[0]), -1)


def _run(model, norm, **kwargs):
    variables, x, y = model
    args = {"version": "custom", "n_queries": QUERIES, "chunk_size": CHUNK} | kwargs
    return autoattack(
        mlp_apply, variables, x, y, eps=EPS[norm], norm=norm, key=jax.random.key(0), **args
    )


@pytest.fixture(scope="module")
def runs(model):
    return {norm: _run(model, norm) for norm in ("linf", "l2")}


def _distances(a, b, norm):
    d = (np.asarray(a, np.float64) - np.asarray(b, np.float64)).reshape(len(a), -1)
    return np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_autoattack_is_at_most_pgd20_is_at_most_natural(model, runs, norm):
    variables, x, y = model
    result = runs[norm]
    natural = float(np.mean(_predict(variables, x) == y))
    x_pgd = pgd(
        lambda v: mlp_apply(variables, v, False)[0],
        lambda z: cross_entropy(z, jnp.asarray(y)),
        jnp.asarray(x),
        jax.random.key(1),
        eps=EPS[norm],
        step_size=EPS[norm] / 4,
        steps=20,
        norm=norm,
    )
    pgd20 = float(np.mean(_predict(variables, x_pgd) == y))
    assert result.clean_accuracy == natural < 1.0
    assert result.robust_accuracy <= pgd20 < natural
    assert 0.0 < result.robust_accuracy  # some points survive: every attack ran


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_every_adversarial_input_is_checked(model, runs, norm):
    variables, x, y = model
    result = runs[norm]
    assert list(result.accuracy) == ["clean", *STANDARD_ATTACKS]
    accuracies = list(result.accuracy.values())
    assert accuracies == sorted(accuracies, reverse=True)
    assert result.robust_accuracy == accuracies[-1] == float(np.mean(result.robust))
    assert {k: v for k, v in result.checks.items() if k != "max_perturbation"} == {
        "outside_eps": 0,
        "outside_box": 0,
        "nonfinite": 0,
        "flag_mismatch": 0,
    }
    dist = _distances(result.x_adv, x, norm)
    assert dist.max() <= EPS[norm] + 1e-6 and result.checks["max_perturbation"] == dist.max()
    assert result.x_adv.min() >= 0.0 and result.x_adv.max() <= 1.0
    # The flags are exactly the model's verdict on the returned inputs.
    np.testing.assert_array_equal(result.robust, _predict(variables, result.x_adv) == y)
    # Misclassified points are never attacked; robust ones keep their clean input.
    clean_wrong = _predict(variables, x) != y
    keep = clean_wrong | result.robust
    np.testing.assert_array_equal(result.x_adv[keep], x[keep])
    assert set(result.seconds) == {"clean", *STANDARD_ATTACKS}


def test_each_attack_alone_finds_adversarial_points(model):
    variables, x, y = model
    x, y = jnp.asarray(x), jnp.asarray(y)
    logits_fn = lambda v: mlp_apply(variables, v, False)[0]  # noqa: E731
    natural = np.asarray(jnp.argmax(logits_fn(x), -1) == y)
    eps, key = EPS["linf"], jax.random.key(0)
    results = {
        "apgd-ce": apgd(logits_fn, x, y, key, eps=eps, norm="linf"),
        "apgd-t": apgd_targeted(logits_fn, x, y, key, eps=eps, norm="linf"),
        "fab-t": fab_targeted(logits_fn, x, y, eps=eps, norm="linf"),
        "square": square_attack(logits_fn, x, y, key, eps=eps, norm="linf", n_queries=QUERIES),
    }
    for name, (x_adv, robust) in results.items():
        robust = np.asarray(robust)
        assert robust.sum() < natural.sum(), name
        assert not np.any(robust & ~natural), name
        assert np.all(_distances(x_adv, x, "linf") <= eps + 1e-6), name


def test_nothing_recompiles_as_points_drop_out_and_runs_are_seeded(model, runs):
    variables, x, y = model
    compiles = []
    monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event)
    )
    try:
        # Fewer points: other chunk counts and paddings, the same compiled attacks.
        subset = autoattack(
            mlp_apply, variables, x[:40], y[:40], eps=EPS["linf"], norm="linf",
            key=jax.random.key(0), version="custom", n_queries=QUERIES, chunk_size=CHUNK,
        )  # fmt: skip
    finally:
        monitoring.clear_event_listeners()
    assert not [e for e in compiles if e in _COMPILE_EVENTS]
    assert subset.robust.shape == (40,)
    # The same key gives the same result; another key other random starts.
    again = _run(model, "linf", attacks=("apgd-ce",))
    same = _run(model, "linf", attacks=("apgd-ce",))
    np.testing.assert_array_equal(again.x_adv, same.x_adv)
    other = autoattack(
        mlp_apply, variables, x, y, eps=EPS["linf"], norm="linf", key=jax.random.key(1),
        version="custom", attacks=("apgd-ce",), chunk_size=CHUNK,
    )  # fmt: skip
    assert not np.array_equal(other.x_adv, again.x_adv)


def test_data_parallel_matches_one_device(model):
    # The random attacks: their draws must not depend on how the batch is split.
    attacks = ("apgd-ce", "square")
    eight = _run(model, "linf", attacks=attacks)
    one = _run(model, "linf", attacks=attacks, mesh=make_mesh(jax.devices()[:1]))
    assert len(jax.devices()) == 8
    np.testing.assert_array_equal(eight.robust, one.robust)
    np.testing.assert_allclose(eight.x_adv, one.x_adv, atol=1e-5)
    assert eight.accuracy == one.accuracy


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"norm": "linf1"}, "norm must be one of"),
        ({"eps": 0.0}, "eps must be"),
        ({"chunk_size": "not a multiple"}, "multiple of the device count"),
        ({"version": "plus"}, "version must be one of"),
        ({"attacks": ("apgd-ce",)}, "use version='custom'"),
        ({"n_queries": 100}, "use version='custom'"),
        ({"version": "custom", "attacks": ("apgd-ce", "pgd")}, "attacks must be"),
        ({"images": "outside"}, r"in \[0, 1\]"),
        ({"labels": "out of range"}, r"labels must be in \[0, 10\)"),
        ({"apply_fn": "three classes"}, "apgd-t needs K >= 4"),
        ({"mesh": "two axes"}, "one-axis"),
    ],
)
def test_bad_input_raises_before_compiling(model, kwargs, match):
    variables, x, y = model
    args = {
        "apply_fn": mlp_apply, "variables": variables, "images": x, "labels": y,
        "eps": 0.05, "norm": "linf", "key": jax.random.key(0), "chunk_size": CHUNK,
    }  # fmt: skip
    args |= kwargs
    if kwargs.get("chunk_size") == "not a multiple":  # 0 is none on a single device
        args["chunk_size"] = jax.device_count() + 1 if jax.device_count() > 1 else 0
    if kwargs.get("mesh") == "two axes":
        args["mesh"] = Mesh(np.asarray(jax.devices()).reshape(1, -1), ("a", "b"))
    if kwargs.get("images") == "outside":
        args["images"] = x * 2.0
    if kwargs.get("labels") == "out of range":
        args["labels"] = y + 10
    if kwargs.get("apply_fn") == "three classes":
        args["apply_fn"] = lambda v, images, train: (mlp_apply(v, images, train)[0][:, :3], {})
    compiles = []
    monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event)
    )
    try:
        with pytest.raises(ValueError, match=match):
            autoattack(**args)
    finally:
        monitoring.clear_event_listeners()
    assert not [e for e in compiles if e in _COMPILE_EVENTS]


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_standard_version(model, runs, norm):
    variables, x, y = model
    result = autoattack(
        mlp_apply,
        variables,
        x,
        y,
        eps=EPS[norm],
        norm=norm,
        key=jax.random.key(0),
        chunk_size=CHUNK,
    )
    assert result.robust_accuracy <= runs[norm].accuracy["fab-t"]
    assert result.checks["outside_eps"] == result.checks["flag_mismatch"] == 0
    np.testing.assert_array_equal(result.robust, _predict(variables, result.x_adv) == y)
