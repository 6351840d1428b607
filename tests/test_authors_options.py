"""The two options that reproduce details of the authors' PyTorch code (Dong et al., 2022).

* ``clip_start=False``: the random start of an attack is not clipped to the
  image box (their TRADES, TRADES+TE and PGD-AT+TE attacks); every step still
  projects onto the ball and the box.
* ``bn_unbiased_var=True``: BatchNorm running variances are updated with the
  unbiased batch variance, ``var_batch * n / (n - 1)``, as ``torch.nn.BatchNorm2d``.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jax_memat import models
from jax_memat.attacks import AttackSpec, cross_entropy, make_attack, pgd
from jax_memat.data import load_dataset
from jax_memat.experiment import ConfigError, default_config, validate_config
from jax_memat.experiment.setup import build_run
from jax_memat.models.layers import UnbiasedVarBatchNorm
from jax_memat.parallel import batch_sharded, replicated
from jax_memat.training import make_mesh
from tests.helpers import F32_EPS, mlp_apply, train_mlp

IMAGE_SHAPE = (4, 4, 2)
NUM_CLASSES = 3
EPS = 8 / 255


# ----------------------------------------------------------------------------
# The attack's start.


@pytest.fixture(scope="module")
def mlp():
    """An MLP trained on images with many pixels exactly on the faces of the box."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, NUM_CLASSES, 32)
    centres = rng.uniform(0.0, 1.0, (NUM_CLASSES, *IMAGE_SHAPE))
    # Saturated pixels (0 or 1), as in real images: a start off the box is possible there.
    x = np.clip(centres[y] + 0.8 * rng.normal(size=(32, *IMAGE_SHAPE)), 0.0, 1.0)
    assert np.mean(x == 0.0) > 0.1 and np.mean(x == 1.0) > 0.1
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
    return train_mlp(x, y, NUM_CLASSES, seed=1, steps=100), x, y


def _first_iterates(attack, variables, x, y, key):
    """Runs ``attack``; returns (every input the model saw, in call order; the output)."""
    seen = []

    def recording_apply(v, images, train):
        # Under tracing the inputs are abstract: report their values at run time.
        jax.debug.callback(lambda a: seen.append(np.asarray(a)), images, ordered=True)
        return mlp_apply(v, images, train)

    x_adv = attack(recording_apply, variables, x, y, key)
    jax.block_until_ready(x_adv)
    jax.effects_barrier()
    return seen, np.asarray(x_adv)


def _assert_in_ball_and_box(x_adv, x, eps):
    # Float rounding of x + delta: one ulp of values <= 1.
    assert np.abs(x_adv - np.asarray(x)).max() <= eps + F32_EPS
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


@pytest.mark.parametrize("name", ["trades", "pgd"])
@pytest.mark.parametrize("clip_start", [True, False])
def test_first_gradient_is_taken_at_the_clipped_or_unclipped_start(mlp, name, clip_start):
    variables, x, y = mlp
    key = jax.random.key(3)
    spec = AttackSpec(name, EPS, 2 / 255, 1, "linf", True, clip_start)
    seen, x_adv = _first_iterates(make_attack(spec), variables, x, y, key)
    # TRADES evaluates the clean logits first (its KL target), then the one step.
    assert len(seen) == (2 if name == "trades" else 1)
    start = seen[-1]
    # The start as the authors draw it: x + 0.001 N(0, 1) (TRADES) or x + U(-eps, eps).
    if name == "trades":
        np.testing.assert_array_equal(seen[0], x)
        noise = 0.001 * jax.random.normal(key, x.shape, x.dtype)
    else:
        noise = jax.random.uniform(key, x.shape, x.dtype, -EPS, EPS)
    expected = np.asarray(x + noise)
    if clip_start:
        expected = np.clip(expected, 0.0, 1.0)
        assert start.min() >= 0.0 and start.max() <= 1.0
    else:
        # Off the box on both faces: the saturated pixels moved outward.
        assert start.min() < 0.0 and start.max() > 1.0
    # x + noise is one rounding; XLA may fuse it differently inside the loop.
    np.testing.assert_allclose(start, expected, rtol=0, atol=2 * F32_EPS)
    # After the one step the iterate is in the ball and the box, either way.
    _assert_in_ball_and_box(x_adv, x, EPS)


def test_clip_start_changes_the_attack_on_saturated_images(mlp):
    """The two starts give different adversarial examples (so the option matters)."""
    variables, x, y = mlp
    spec = AttackSpec("trades", EPS, 2 / 255, 3, "linf")
    key = jax.random.key(4)
    clipped = make_attack(spec)(mlp_apply, variables, x, y, key)
    unclipped = make_attack(dataclasses.replace(spec, clip_start=False))(
        mlp_apply, variables, x, y, key
    )
    assert not np.array_equal(np.asarray(clipped), np.asarray(unclipped))
    for x_adv in (clipped, unclipped):
        _assert_in_ball_and_box(np.asarray(x_adv), x, EPS)


@pytest.mark.parametrize("norm, init", [("linf", "uniform"), ("l2", "uniform"), ("linf", "normal")])
def test_zero_steps_still_returns_a_point_in_the_box(mlp, norm, init):
    variables, x, y = mlp
    eps = EPS if norm == "linf" else 0.5
    x_adv = pgd(
        lambda v: mlp_apply(variables, v, False)[0],
        lambda z: cross_entropy(z, y),
        x,
        jax.random.key(5),
        eps=eps,
        step_size=0.0,
        steps=0,
        norm=norm,
        init=init,
        init_std=0.01,
        clip_start=False,
    )
    x_adv = np.asarray(x_adv)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert not np.array_equal(x_adv, np.asarray(x))  # It is the random start, clipped.


def test_clip_start_must_be_a_bool():
    with pytest.raises(ValueError, match="clip_start must be True or False"):
        AttackSpec("pgd", EPS, 2 / 255, 10, clip_start="no").validate()
    with pytest.raises(ValueError, match="clip_start must be True or False"):
        pgd(
            lambda v: v,
            lambda z: z[:, 0],
            jnp.zeros((1, 2)),
            jax.random.key(0),
            eps=0.1,
            step_size=0.1,
            steps=1,
            clip_start=1,
        )


# ----------------------------------------------------------------------------
# BatchNorm's running variance.


def _torch_running_var(old, inputs, momentum):
    """PyTorch's rule, in float64: momentum * old + (1 - momentum) * unbiased batch variance."""
    flat = np.asarray(inputs, np.float64).reshape(-1, inputs.shape[-1])
    return momentum * np.asarray(old, np.float64) + (1 - momentum) * flat.var(0, ddof=1)


def _var_atol(inputs, momentum):
    """Float32 error of the statistic: E[x^2] - E[x]^2 over n values, both sums rounded.

    A sum of n float32 terms is within n * eps of exact relative to the sum of
    magnitudes (any summation order), and the subtraction cancels up to E[x^2];
    the bound is per channel, scaled by (1 - momentum) as in the update.
    """
    flat = np.asarray(inputs, np.float64).reshape(-1, inputs.shape[-1])
    n = flat.shape[0]
    return (1 - momentum) * 4 * n * F32_EPS * np.mean(flat**2, 0) + 4 * F32_EPS


def _assert_within(actual, expected, atol):
    """``|actual - expected| <= atol`` elementwise (``atol`` per channel)."""
    error = np.abs(np.asarray(actual, np.float64) - expected)
    assert np.all(error <= atol), f"error {error} exceeds tolerance {atol}"


def test_unbiased_var_batch_norm_matches_flax_except_the_variance_update():
    rng = np.random.default_rng(0)
    # n = 2 * 3 * 3 = 18 values per channel: the factor 18 / 17 is far from 1.
    x = jnp.asarray(rng.normal(0.5, 2.0, (2, 3, 3, 5)), jnp.float32)
    ours = UnbiasedVarBatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    variables = ours.init(jax.random.key(0), x)
    flax_variables = flax_bn.init(jax.random.key(0), x)
    # Same variables (names, shapes, dtypes, initial values): checkpoints carry over.
    assert jax.tree.structure(variables) == jax.tree.structure(flax_variables)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(flax_variables), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # Trained-looking variables: non-trivial scale, bias and running statistics.
    variables = {
        "params": {
            "scale": jnp.asarray(rng.uniform(0.5, 2.0, 5), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=5), jnp.float32),
        },
        "batch_stats": {
            "mean": jnp.asarray(rng.normal(size=5), jnp.float32),
            "var": jnp.asarray(rng.uniform(0.5, 3.0, 5), jnp.float32),
        },
    }
    y, state = ours.apply(variables, x, mutable=["batch_stats"])
    y_flax, state_flax = flax_bn.apply(variables, x, mutable=["batch_stats"])
    # The forward pass normalizes with the biased variance, as Flax and PyTorch: same ops.
    np.testing.assert_allclose(y, y_flax, rtol=0, atol=8 * F32_EPS * float(np.abs(y_flax).max()))
    np.testing.assert_allclose(
        state["batch_stats"]["mean"], state_flax["batch_stats"]["mean"], rtol=4 * F32_EPS
    )
    old = variables["batch_stats"]["var"]
    expected = _torch_running_var(old, x, 0.9)
    atol = _var_atol(x, 0.9)
    _assert_within(state["batch_stats"]["var"], expected, atol)
    # Teeth: Flax's biased update misses PyTorch's by far more than the tolerance.
    assert np.all(np.abs(np.asarray(state_flax["batch_stats"]["var"]) - expected) > 10 * atol)
    # Inference mode: the running statistics, exactly as Flax.
    bn_eval = ours.clone(use_running_average=True)
    y_eval = bn_eval.apply(variables, x)
    y_eval_flax = flax_bn.clone(use_running_average=True).apply(variables, x)
    np.testing.assert_allclose(
        y_eval, y_eval_flax, rtol=0, atol=8 * F32_EPS * float(np.abs(y_eval_flax).max())
    )


def test_unbiased_var_batch_norm_needs_two_values_per_channel():
    bn = UnbiasedVarBatchNorm(use_running_average=False)
    x = jnp.ones((1, 1, 1, 3))
    variables = bn.init(jax.random.key(0), x)  # Init never updates: fine.
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        bn.apply(variables, x, mutable=["batch_stats"])


def _batch_norm_kinds(model, input_shape):
    """Counts the BatchNorm modules of each kind that a training-mode call runs."""
    kinds = {"flax": 0, "unbiased": 0}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            if isinstance(context.module, UnbiasedVarBatchNorm):
                kinds["unbiased"] += 1
            elif isinstance(context.module, nn.BatchNorm):
                kinds["flax"] += 1
        return next_fun(*args, **kwargs)

    images = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
    with nn.intercept_methods(interceptor):
        # Abstract: traces, compiles nothing.
        jax.eval_shape(lambda im: model.init_with_output(jax.random.key(0), im, True), images)
    return kinds


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_every_model_passes_the_option_to_every_batch_norm(name):
    kwargs = {"depth": 10, "width": 1} if name == "wide_resnet" else {}
    default = _batch_norm_kinds(models.get_model(name, 3, **kwargs), (32, 32, 3))
    torch_like = _batch_norm_kinds(
        models.get_model(name, 3, bn_unbiased_var=True, **kwargs), (32, 32, 3)
    )
    assert default["unbiased"] == 0 and default["flax"] > 0
    assert torch_like == {"flax": 0, "unbiased": default["flax"]}


def test_get_model_rejects_a_non_bool_option():
    with pytest.raises(ValueError, match="bn_unbiased_var must be True or False"):
        models.get_model("small_cnn", 10, bn_unbiased_var="yes")


def _train_apply(model, variables, images, devices):
    """Training-mode apply on a mesh (batch split over ``devices``), capturing BN inputs."""
    mesh = make_mesh(devices)
    fn = jax.jit(
        functools.partial(
            model.apply,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda module, _: module.name in ("conv1", "conv2"),
        ),
        in_shardings=(replicated(mesh), batch_sharded(mesh)),
    )
    logits, state = fn(variables, images)
    return jax.device_get(logits), jax.device_get(state)


def test_running_variance_uses_the_global_batch_on_eight_devices():
    assert jax.device_count() == 8, "conftest must simulate 8 CPU devices"
    model = models.get_model("small_cnn", 4, bn_unbiased_var=True)
    flax_model = models.get_model("small_cnn", 4)
    variables = models.init_model(model, jax.random.key(0), (8, 8, 1))
    # Same initial variables as the default model, bit for bit.
    flax_variables = models.init_model(flax_model, jax.random.key(0), (8, 8, 1))
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(flax_variables), strict=True):
        np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(1)
    stats = variables["batch_stats"]
    variables = {
        **variables,
        "batch_stats": {
            layer: {
                "mean": jnp.asarray(rng.normal(size=s["mean"].shape), jnp.float32),
                "var": jnp.asarray(rng.uniform(0.5, 2.0, s["var"].shape), jnp.float32),
            }
            for layer, s in stats.items()
        },
    }
    # 16 images of 8x8: bn1 sees 16 x 4 x 4 = 256 values per channel, bn2 16 x 2 x 2 = 64
    # (per device: 32 and 8, whose factors 32/31 and 8/7 the tolerance tells apart).
    # Centred inputs keep E[x^2] near var at the BN inputs, so the error bound stays tight.
    images = jnp.asarray(rng.normal(size=(16, 8, 8, 1)), jnp.float32)
    logits8, state8 = _train_apply(model, variables, images, jax.devices())
    logits1, state1 = _train_apply(model, variables, images, jax.devices()[:1])
    flax_logits, _ = _train_apply(flax_model, variables, images, jax.devices())
    for layer, conv in (("bn1", "conv1"), ("bn2", "conv2")):
        inputs = state1["intermediates"][conv]["__call__"][0]
        old = variables["batch_stats"][layer]["var"]
        expected = _torch_running_var(old, inputs, 0.9)
        atol = _var_atol(inputs, 0.9)
        _assert_within(state8["batch_stats"][layer]["var"], expected, atol)
        _assert_within(state1["batch_stats"][layer]["var"], expected, atol)
        # Teeth: the per-device count n = 256 / 8 or 64 / 8 would be off by more than that.
        n_local = inputs.size // inputs.shape[-1] // 8
        flat = np.asarray(inputs, np.float64).reshape(-1, inputs.shape[-1])
        local = 0.9 * np.asarray(old) + 0.1 * flat.var(0) * n_local / (n_local - 1)
        assert np.all(np.abs(local - expected) > 10 * atol)
    # The forward pass is unchanged (batch statistics, biased variance). On 8 devices
    # the BatchNorm sums over up to 256 values are reduced in another order: ~sqrt(256)
    # roundings per statistic, over two layers. Normalizing with the unbiased variance
    # instead would move the logits by ~1/(2n) relative, far more.
    atol = 64 * F32_EPS * float(np.abs(logits1).max())
    np.testing.assert_allclose(logits8, flax_logits, rtol=0, atol=atol)
    np.testing.assert_allclose(logits8, logits1, rtol=0, atol=atol)


# ----------------------------------------------------------------------------
# Config wiring.


def _synthetic_config():
    c = default_config()
    c.dataset.name = "synthetic"
    c.dataset.num_train_examples = 64
    c.dataset.num_test_examples = 16
    c.model.name = "small_cnn"
    c.batch_size = 32
    return c


def test_build_run_passes_both_options():
    c = _synthetic_config()
    c.objective.name = "trades"
    c.attack.clip_start = False
    c.model.bn_unbiased_var = True
    validate_config(c)
    train = load_dataset("synthetic", "train", num_examples=64)
    setup = build_run(c, train, make_mesh(jax.devices()[:1]))
    assert setup.attack.clip_start is False
    assert setup.module.bn_unbiased_var is True


def test_configs_saved_before_the_options_existed_use_the_old_behaviour():
    c = _synthetic_config()
    del c.attack["clip_start"]
    del c.model["bn_unbiased_var"]
    validate_config(c)
    train = load_dataset("synthetic", "train", num_examples=64)
    setup = build_run(c, train, make_mesh(jax.devices()[:1]))
    assert setup.attack.clip_start is True
    assert setup.module.bn_unbiased_var is False


def test_validate_config_rejects_non_bool_options():
    # A ConfigDict keeps field types, but a config read from JSON has any types.
    d = _synthetic_config().to_dict()
    d["attack"]["clip_start"] = "false"
    d["model"]["bn_unbiased_var"] = 1
    c = ml_collections.ConfigDict(d)
    with pytest.raises(ConfigError) as err:
        validate_config(c)
    assert "attack.clip_start='false'" in str(err.value)
    assert "model.bn_unbiased_var=1" in str(err.value)
