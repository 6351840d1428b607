"""Tests for jax_memat.models: registry, shapes, parameter counts, BatchNorm modes."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_memat import models

INPUT_SHAPES = [(28, 28, 1), (32, 32, 3)]


def _num_params(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _abstract_variables(model: nn.Module, input_shape):
    """Variable shapes without running (or compiling) the initialisers."""
    return jax.eval_shape(lambda: models.init_model(model, jax.random.key(0), input_shape))


def _stand_in_variables(model: nn.Module, input_shape):
    """Cheap deterministic variables, built on the host.

    XLA:CPU spends 0.3-1 s compiling each initialiser's RNG, i.e. 5-20 s per
    big model; a pseudo-random fill at PyTorch-like scale exercises the same
    forward pass at a fraction of that.
    """

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return np.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean"):
            return np.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        wave = np.sin(np.arange(leaf.size, dtype=np.float32) * 12.9898)
        return (wave * np.sqrt(6.0 / fan_in)).reshape(leaf.shape).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, _abstract_variables(model, input_shape))


def _assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


def _images(key, batch, input_shape):
    return jax.random.uniform(key, (batch, *input_shape), jnp.float32)


@pytest.fixture(scope="module")
def small_cnn():
    model = models.get_model("small_cnn", 7)
    return model, models.init_model(model, jax.random.key(0), (28, 28, 1))


@pytest.fixture(scope="module", params=["small_cnn", "wide_resnet"])
def small_model(request, small_cnn):
    """A model with real init, and a residual one (WRN-10-1) with stand-in weights."""
    if request.param == "small_cnn":
        model, variables = small_cnn
    else:
        model = models.get_model("wide_resnet", 7, depth=10, width=1)
        variables = _stand_in_variables(model, (28, 28, 1))
    return model, variables, jax.jit(models.make_apply_fn(model), static_argnums=2)


def test_model_names():
    assert models.MODEL_NAMES == (
        "preact_resnet18",
        "resnet18",
        "wide_resnet",
        "vgg16",
        "small_cnn",
    )


@pytest.mark.parametrize("input_shape", INPUT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_shapes_every_model(name, input_shape):
    num_classes = 3 if input_shape[-1] == 1 else 7
    model = models.get_model(name, num_classes)
    variables = _abstract_variables(model, input_shape)
    assert set(variables) == {"params", "batch_stats"}
    images = jax.ShapeDtypeStruct((5, *input_shape), jnp.float32)
    apply = models.make_apply_fn(model)
    for train in (True, False):
        logits, state = jax.eval_shape(functools.partial(apply, train=train), variables, images)
        assert logits.shape == (5, num_classes)
        assert logits.dtype == jnp.float32
        assert jax.tree.structure(state) == jax.tree.structure(
            {"batch_stats": variables["batch_stats"]}
        )


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("preact_resnet18", {}),
        ("resnet18", {}),
        ("wide_resnet", {"depth": 28, "width": 10}),
        ("vgg16", {}),
    ],
)
def test_real_forward_big_models(name, kwargs):
    model = models.get_model(name, 10, **kwargs)
    variables = _stand_in_variables(model, (32, 32, 3))
    apply = jax.jit(models.make_apply_fn(model), static_argnums=2)
    logits, state = apply(variables, _images(jax.random.key(1), 2, (32, 32, 3)), False)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    _assert_trees_equal(state, {"batch_stats": variables["batch_stats"]})


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        # Rice et al.'s PreActResNet-18 has a final BN(512) before the pool:
        # 11,171,146 (kuangliu's count, no final BN) + 2 * 512.
        ("preact_resnet18", {}, 11_172_170),
        ("resnet18", {}, 11_173_962),
        ("wide_resnet", {"depth": 28, "width": 10}, 36_479_194),
        ("wide_resnet", {"depth": 34, "width": 10}, 46_160_474),
        # kuangliu's VGG-16 (14,728,266) less the 4,224 conv biases before BN.
        ("vgg16", {}, 14_724_042),
    ],
)
def test_param_counts_cifar10(name, kwargs, expected):
    model = models.get_model(name, 10, **kwargs)
    assert _num_params(_abstract_variables(model, (32, 32, 3))["params"]) == expected


def test_small_cnn_is_small():
    for input_shape, expected in (((28, 28, 1), 151_402), ((32, 32, 3), 151_978)):
        variables = _abstract_variables(models.get_model("small_cnn", 10), input_shape)
        assert _num_params(variables["params"]) == expected


def test_init_model_returns_plain_dicts(small_cnn):
    _, variables = small_cnn
    assert type(variables) is dict
    assert all(type(collection) is dict for collection in variables.values())
    assert set(variables) == {"params", "batch_stats"}
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["batch_stats"]):
        expected = 0.0 if path[-1].key == "mean" else 1.0
        np.testing.assert_array_equal(leaf, expected)


def test_train_mode_updates_batch_stats(small_model):
    _, variables, apply = small_model
    images = _images(jax.random.key(1), 4, (28, 28, 1))
    logits, state = apply(variables, images, True)
    assert logits.shape == (4, 7)
    assert set(state) == {"batch_stats"}
    assert jax.tree.structure(state["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
    changed = jax.tree.map(
        lambda new, old: not np.allclose(new, old), state["batch_stats"], variables["batch_stats"]
    )
    assert all(jax.tree.leaves(changed))


def test_batch_norm_momentum_and_epsilon(small_cnn):
    """Running stats move 10% towards the batch's; normalization uses eps 1e-5."""
    model, variables = small_cnn
    images = _images(jax.random.key(1), 4, (28, 28, 1))
    _, state = jax.jit(
        functools.partial(
            model.apply,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda module, _: module.name in ("conv1", "bn1"),
        )
    )(variables, images)
    conv_out = state["intermediates"]["conv1"]["__call__"][0]
    bn_out = state["intermediates"]["bn1"]["__call__"][0]
    mean = conv_out.mean(axis=(0, 1, 2))
    var = conv_out.var(axis=(0, 1, 2))
    new_stats = state["batch_stats"]["bn1"]
    np.testing.assert_allclose(new_stats["mean"], 0.1 * mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new_stats["var"], 0.9 + 0.1 * var, rtol=1e-4, atol=1e-6)
    # scale 1, bias 0 at init.
    np.testing.assert_allclose(bn_out, (conv_out - mean) / np.sqrt(var + 1e-5), atol=1e-4)


def test_inference_mode_keeps_state_and_is_deterministic(small_model):
    _, variables, apply = small_model
    images = _images(jax.random.key(2), 4, (28, 28, 1))
    first, state = apply(variables, images, False)
    second, _ = apply(variables, images, False)
    np.testing.assert_array_equal(first, second)
    _assert_trees_equal(state, {"batch_stats": variables["batch_stats"]})


def test_inference_is_per_example_but_training_is_not(small_model):
    # Every call has the shapes of the other tests', so nothing recompiles.
    _, variables, apply = small_model
    # Non-trivial running statistics, as after some training.
    _, state = apply(variables, _images(jax.random.key(3), 4, (28, 28, 1)), True)
    variables = {**variables, **state}
    images = _images(jax.random.key(4), 4, (28, 28, 1))
    other = images.at[1:].set(_images(jax.random.key(5), 3, (28, 28, 1)))

    eval_logits, _ = apply(variables, images, False)
    eval_other, _ = apply(variables, other, False)
    assert not np.allclose(eval_logits[1:], eval_other[1:], atol=1e-3)
    np.testing.assert_allclose(eval_logits[0], eval_other[0], rtol=1e-5, atol=1e-5)

    train_logits, _ = apply(variables, images, True)
    train_other, _ = apply(variables, other, True)
    assert not np.allclose(train_logits[0], train_other[0], atol=1e-3)


def test_bfloat16_compute_keeps_float32_params_and_logits(small_model):
    model, variables, apply_f32 = small_model
    bf16_model = model.clone(dtype=jnp.bfloat16)
    # Mixed precision changes no variable: float32 weights are used directly.
    bf16_variables = _abstract_variables(bf16_model, (28, 28, 1))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), bf16_variables) == jax.tree.map(
        lambda x: (x.shape, x.dtype), variables
    )

    apply = jax.jit(models.make_apply_fn(bf16_model), static_argnums=2)
    images = _images(jax.random.key(6), 4, (28, 28, 1))
    logits, state = apply(variables, images, True)
    assert logits.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state))
    eval_logits, _ = apply(variables, images, False)
    assert eval_logits.dtype == jnp.float32
    reference, _ = apply_f32(variables, images, False)
    np.testing.assert_allclose(eval_logits, reference, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_bfloat16_every_model_abstract(name):
    model = models.get_model(name, 3, dtype="bfloat16")
    variables = _abstract_variables(model, (32, 32, 3))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    logits, _ = jax.eval_shape(
        functools.partial(models.make_apply_fn(model), train=True), variables, images
    )
    assert logits.dtype == jnp.float32


def test_model_without_batch_norm():
    class Linear(nn.Module):
        @nn.compact
        def __call__(self, images, train):
            return nn.Dense(3)(images.reshape(images.shape[0], -1))

    model = Linear()
    variables = models.init_model(model, jax.random.key(0), (4, 4, 1))
    assert set(variables) == {"params"}
    apply = models.make_apply_fn(model)
    images = jnp.ones((2, 4, 4, 1))
    assert apply(variables, images, True)[1] == {}
    assert apply(variables, images, False)[1] == {}


def test_wide_resnet_depth_and_width():
    for depth in (16, 22):
        model = models.get_model("wide_resnet", 5, depth=depth, width=2)
        variables = _abstract_variables(model, (32, 32, 3))
        blocks = [name for name in variables["params"] if name.startswith("stage")]
        assert len(blocks) == 3 * (depth - 4) // 6
    for depth in (27, 30, 4):
        with pytest.raises(ValueError, match=r"\(depth - 4\) % 6 == 0"):
            models.get_model("wide_resnet", 10, depth=depth)
    with pytest.raises(ValueError, match="width"):
        models.get_model("wide_resnet", 10, width=0)
    # depth/width are ignored by the other models.
    models.get_model("resnet18", 10, depth=27)


def test_bad_arguments_name_accepted_values():
    with pytest.raises(ValueError) as error:
        models.get_model("resnet50", 10)
    assert all(name in str(error.value) for name in models.MODEL_NAMES)
    with pytest.raises(ValueError, match="float32, bfloat16"):
        models.get_model("small_cnn", 10, dtype="float16")
    for num_classes in (1, 0):
        with pytest.raises(ValueError, match="at least 2"):
            models.get_model("small_cnn", num_classes)


def test_small_cnn_width_multiplier():
    import jax

    from jax_memat.models import get_model, init_model

    def count(module):
        shapes = jax.eval_shape(lambda: init_model(module, jax.random.key(0), (28, 28, 1)))
        return sum(x.size for x in jax.tree.leaves(shapes["params"]))

    # By hand: conv1 3*3*1*64 = 576, bn1 128, conv2 3*3*64*128 = 73,728, bn2 256,
    # fc1 4*4*128*256 + 256 = 524,544, linear 256*10 + 10 = 2,570.
    assert (
        count(get_model("small_cnn", 10, cnn_width=2)) == 576 + 128 + 73_728 + 256 + 524_544 + 2_570
    )
    assert count(get_model("small_cnn", 10)) == 151_402
    with pytest.raises(ValueError, match="cnn_width must be a positive integer"):
        get_model("small_cnn", 10, cnn_width=0)


@pytest.mark.parametrize("size", [(7, 7), (8, 6), (5, 8)])
def test_small_cnn_pool_is_flax_max_pool(size):
    from jax_memat.models.small_cnn import max_pool_2x2

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *size, 3)), jnp.float32)

    def flax_pool(x):
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")

    np.testing.assert_array_equal(np.asarray(max_pool_2x2(x)), np.asarray(flax_pool(x)))
    # No ties in normal samples: the gradient goes to the same entry, unchanged.
    weights = jnp.asarray(np.random.default_rng(1).normal(size=flax_pool(x).shape), jnp.float32)
    g_ours = jax.grad(lambda x: jnp.sum(weights * max_pool_2x2(x)))(x)
    g_flax = jax.grad(lambda x: jnp.sum(weights * flax_pool(x)))(x)
    np.testing.assert_array_equal(np.asarray(g_ours), np.asarray(g_flax))
