"""Norm- and margin-based complexity measures against closed forms and explicit sums.

Tiny hand-made networks whose norms are known in closed form, the conv
operator norm against the explicit convolution matrix, the path norm against
an explicit sum over paths, BatchNorm folding against the model's own
outputs, and the layer lists of the five registry models.
"""

import dataclasses
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_memat import models
from jax_memat.analysis.complexity import (
    apply_layers,
    bn_policy,
    conv_operator_norm,
    extract_layers,
    layer_norms,
    log_bartlett_complexity,
    margin_gamma,
    norm_measures,
    normalized_margins,
    output_margins,
    path_norm,
    require_positive,
    trace_layers,
)
from jax_memat.attacks import AttackSpec, make_attack
from jax_memat.models.layers import conv as repo_conv
from jax_memat.objectives import margin
from tests.helpers import F32_EPS

# 3 -> 2 -> 2 with singular values (3, 1) and (3, 1): ||W1||_F^2 = ||W2||_F^2 = 10.
W1 = np.array([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
W2 = np.array([[1.0, 2.0], [2.0, 1.0]])
B1 = np.array([0.5, -1.0])
B2 = np.array([0.25, 0.0])


class TinyMLP(nn.Module):
    """Dense(2)-ReLU-Dense(2) on flattened [N, 1, 1, 3] images."""

    @nn.compact
    def __call__(self, images, train):
        del train
        x = images.reshape(images.shape[0], -1)
        x = nn.relu(nn.Dense(2, name="fc1")(x))
        return nn.Dense(2, name="fc2")(x)


class TinyConvNet(nn.Module):
    """conv 2x2 VALID (1 -> 2 channels, with bias), ReLU, flatten, dense to 2."""

    @nn.compact
    def __call__(self, images, train):
        del train
        x = nn.relu(nn.Conv(2, (2, 2), padding="VALID", name="conv")(images))
        return nn.Dense(2, name="fc")(x.reshape(x.shape[0], -1))


def _mlp(w1=W1, w2=W2):
    model = TinyMLP()
    variables = {
        "params": {
            "fc1": {"kernel": jnp.asarray(w1, jnp.float32), "bias": jnp.asarray(B1, jnp.float32)},
            "fc2": {"kernel": jnp.asarray(w2, jnp.float32), "bias": jnp.asarray(B2, jnp.float32)},
        }
    }
    return models.make_apply_fn(model), variables


def _random_variables(model, shape, seed):
    """Random variables of ``model`` without compiling its init (fast for ResNet-18).

    Kernels ~ N(0, 1 / fan_in) and, unlike a fresh init (s ~ 1, shift 0), BatchNorms with
    non-trivial statistics and affine parameters, so folding them is a real change.
    """
    abstract = jax.eval_shape(lambda key: models.init_model(model, key, shape), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), leaf.shape)
        elif name == "var":
            value = rng.uniform(0.2, 3.0, leaf.shape)
        elif name == "scale":
            value = rng.uniform(0.5, 2.0, leaf.shape)
        else:  # means and biases
            value = rng.normal(0.0, 0.3, leaf.shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


# --- closed forms on a dense network ----------------------------------------------------------


def test_dense_norms_closed_form():
    apply_fn, variables = _mlp()
    _, init = _mlp(W1 / 2, W2 / 2)
    layers = extract_layers(apply_fn, variables, (1, 1, 3))
    init_layers = extract_layers(None, init, trace=layers.trace)
    assert [layer.name for layer in layers.layers] == ["fc1", "fc2"]
    norms = layer_norms(layers, init_layers)
    rtol = 16 * F32_EPS
    np.testing.assert_allclose(norms.fro_sq, [10.0, 10.0], rtol=rtol)
    np.testing.assert_allclose(norms.spec, [3.0, 3.0], rtol=rtol)
    # Columns (output units) of W1: (3, 0, 0), (0, 1, 0); of W2: (1, 2), (2, 1).
    np.testing.assert_allclose(norms.l21, [4.0, 2 * math.sqrt(5)], rtol=rtol)
    np.testing.assert_allclose(norms.dist_fro_sq, [2.5, 2.5], rtol=rtol)
    np.testing.assert_allclose(norms.dist_spec, [1.5, 1.5], rtol=rtol)
    # Bartlett: R = 3 * 3 * ((4/3)^(2/3) + (2 sqrt5 / 3)^(2/3))^(3/2).
    expected_r = 9.0 * ((4 / 3) ** (2 / 3) + (2 * math.sqrt(5) / 3) ** (2 / 3)) ** 1.5
    log_r = log_bartlett_complexity(norms.spec, norms.l21)
    assert math.exp(log_r) == pytest.approx(expected_r, rel=rtol)
    expected_r_init = 9.0 * ((2 / 3) ** (2 / 3) + (math.sqrt(5) / 3) ** (2 / 3)) ** 1.5
    log_r_init = log_bartlett_complexity(norms.spec, norms.dist_l21)
    assert math.exp(log_r_init) == pytest.approx(expected_r_init, rel=rtol)


def test_norm_measures_dense_closed_form():
    apply_fn, variables = _mlp()
    _, init = _mlp(W1 / 2, W2 / 2)
    # Inputs where both hidden units are active, so every margin is known: logits are
    # W2^T relu(W1^T x + b1) + b2.
    x = np.array([[1.0, 2.0, 0.0], [2.0, 3.0, 1.0], [0.5, 1.5, 0.0], [1.5, 4.0, 2.0]])
    labels = np.array([1, 1, 0, 1])
    logits = np.maximum(x @ W1 + B1, 0) @ W2 + B2
    true = logits[np.arange(4), labels]
    expected_margins = true - logits[np.arange(4), 1 - labels]
    images = x.reshape(4, 1, 1, 3).astype(np.float32)
    measures = norm_measures(apply_fn, variables, init, images, labels, margin_percentile=50)
    gamma = float(np.percentile(expected_margins, 50))
    assert gamma > 0
    rtol = 64 * F32_EPS
    assert measures["margin_gamma"] == pytest.approx(gamma, rel=rtol)
    assert measures["num_layers"] == 2
    assert measures["param_norm"] == pytest.approx(20.0, rel=rtol)
    assert measures["log_prod_fro"] == pytest.approx(math.log(100.0), rel=rtol)
    assert measures["log_prod_fro_over_margin"] == pytest.approx(
        math.log(100.0 / gamma**2), rel=rtol
    )
    assert measures["sum_of_fro"] == pytest.approx(20.0, rel=rtol)
    assert measures["sum_of_fro_over_margin"] == pytest.approx(2 * 10.0 / gamma, rel=rtol)
    assert measures["log_prod_spec"] == pytest.approx(math.log(81.0), rel=rtol)
    assert measures["fro_over_spec"] == pytest.approx(20.0 / 9.0, rel=rtol)
    assert measures["log_spec_bound"] == pytest.approx(
        math.log(81.0 / gamma**2 * 20.0 / 9.0), rel=rtol
    )
    assert measures["log_spec_bound_init"] == pytest.approx(
        math.log(81.0 / gamma**2 * 5.0 / 9.0), rel=rtol
    )
    assert measures["dist_fro"] == pytest.approx(5.0, rel=rtol)
    assert measures["dist_spec"] == pytest.approx(4.5, rel=rtol)
    # Path norm of the 3-2-2 net with biases, summed explicitly below.
    paths = _explicit_mlp_path_norm()
    assert measures["path_norm"] == pytest.approx(paths, rel=rtol)
    assert measures["path_norm_over_margin"] == pytest.approx(paths / gamma**2, rel=rtol)
    assert measures["margin_positive"] == 1.0
    assert measures["margin_adversarial"] == 0.0
    assert measures["conv_norm_operator"] == 1.0
    assert measures["bn_folded"] == measures["bn_diagonal"] == 0.0
    # Dense layers only: no power iteration ran, nothing to converge.
    assert measures["power_iterations"] == 0.0 and measures["power_converged"] == 1.0


# --- path norm ---------------------------------------------------------------------------------


def _explicit_mlp_path_norm():
    total = 0.0
    for i, j, k in itertools.product(range(3), range(2), range(2)):
        total += W1[i, j] ** 2 * W2[j, k] ** 2
    for j, k in itertools.product(range(2), range(2)):
        total += B1[j] ** 2 * W2[j, k] ** 2  # paths starting at a hidden bias
    return total + float(np.sum(B2**2))  # paths starting at an output bias


def test_path_norm_dense_explicit_sum():
    apply_fn, variables = _mlp()
    layers = extract_layers(apply_fn, variables, (1, 1, 3))
    expected = _explicit_mlp_path_norm()
    # A few dozen float32 products and sums of values up to ~100.
    assert path_norm(apply_fn, variables, layers) == pytest.approx(expected, rel=64 * F32_EPS)


def test_path_norm_conv_dense_explicit_sum():
    model = TinyConvNet()
    variables = models.init_model(model, jax.random.key(3), (3, 3, 1))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda leaf: jnp.asarray(rng.normal(size=np.shape(leaf)), jnp.float32), variables
    )
    apply_fn = models.make_apply_fn(model)
    layers = extract_layers(apply_fn, variables, (3, 3, 1))
    kernel = np.asarray(variables["params"]["conv"]["kernel"], np.float64)  # [2, 2, 1, 2]
    conv_bias = np.asarray(variables["params"]["conv"]["bias"], np.float64)
    dense = np.asarray(variables["params"]["fc"]["kernel"], np.float64)  # [2*2*2, 2]
    dense_bias = np.asarray(variables["params"]["fc"]["bias"], np.float64)
    total = 0.0
    # Conv output unit (r, c, o) reads input pixel (r + dr, c + dc) through kernel[dr, dc, 0, o];
    # its flattened index (row-major over r, c, o) is its row in the dense kernel.
    for r, c, o in itertools.product(range(2), range(2), range(2)):
        unit = (r * 2 + c) * 2 + o
        for k in range(2):
            out_sq = dense[unit, k] ** 2
            for dr, dc in itertools.product(range(2), range(2)):
                total += kernel[dr, dc, 0, o] ** 2 * out_sq
            total += conv_bias[o] ** 2 * out_sq
    total += float(np.sum(dense_bias**2))
    assert path_norm(apply_fn, variables, layers) == pytest.approx(total, rel=256 * F32_EPS)


class DeepChain(nn.Module):
    """``depth`` bias-free Dense(1) layers with ReLU between them, on [N, 1, 1, 1] images."""

    depth: int = 12

    @nn.compact
    def __call__(self, images, train):
        del train
        x = images.reshape(images.shape[0], -1)
        for i in range(self.depth):
            x = nn.Dense(1, use_bias=False, name=f"fc{i}")(x)
            if i < self.depth - 1:
                x = nn.relu(x)
        return x


def test_path_norm_past_float32_range():
    # One path, weight 1e4 per layer: the path norm is (1e4^2)^12 = 1e96, far past float32's
    # 3.4e38; the float64 forward pass returns it to float64 rounding of 12 products.
    model = DeepChain()
    variables = models.init_model(model, jax.random.key(0), (1, 1, 1))
    variables = jax.tree.map(lambda leaf: jnp.full(np.shape(leaf), 1e4, jnp.float32), variables)
    apply_fn = models.make_apply_fn(model)
    layers = extract_layers(apply_fn, variables, (1, 1, 1))
    assert len(layers.layers) == 12
    f64_eps = np.finfo(np.float64).eps
    assert path_norm(apply_fn, variables, layers) == pytest.approx(1e96, rel=64 * f64_eps)
    # What the float32 forward pass gave before: an overflow.
    squared = [dataclasses.replace(layer, kernel=layer.kernel**2) for layer in layers.layers]
    squared = dataclasses.replace(layers, layers=tuple(squared))
    float32 = apply_layers(apply_fn, variables, squared, np.ones((1, 1, 1, 1), np.float32))
    assert np.isinf(np.asarray(float32)).all()


# --- conv norms --------------------------------------------------------------------------------


def _explicit_conv_matrix(module, kernel, input_shape):
    size = int(np.prod(input_shape))
    basis = np.eye(size, dtype=np.float32).reshape(size, *input_shape)
    out = module.apply({"params": {"kernel": jnp.asarray(kernel, jnp.float32)}}, basis)
    return np.asarray(out, np.float64).reshape(size, -1).T


@pytest.mark.parametrize(
    "strides,padding",
    [(1, "SAME"), (2, "SAME"), (2, ((1, 1), (1, 1))), (1, "VALID")],
)
def test_conv_operator_norm_matches_explicit_matrix(strides, padding):
    module = nn.Conv(3, (3, 3), strides=(strides, strides), padding=padding, use_bias=False)
    input_shape = (5, 5, 2)
    # Power iteration converges at the rate (s2 / s1)^2 per step; a random kernel can have two
    # nearly equal top singular values (then the estimate lies between them). Take the first
    # seed whose gap is >= 2%, so 1000 iterations converge to float32 precision and the
    # check is of the operator (padding, stride, transpose), not of the convergence rate.
    for seed in range(20):
        kernel = np.random.default_rng(seed).normal(size=(3, 3, 2, 3))
        matrix = _explicit_conv_matrix(module, kernel, input_shape)
        singular = np.linalg.svd(matrix, compute_uv=False)
        if singular[1] < 0.98 * singular[0]:
            break
    assert singular[1] < 0.98 * singular[0]
    estimate = conv_operator_norm(module, kernel, input_shape, iterations=1000, tol=0.0)
    # float32 rounding of sums of at most 3*3*2 products per output element, over the
    # norm's ~75 terms.
    assert estimate == pytest.approx(singular[0], rel=256 * F32_EPS)
    # Far from converged, the estimate is still a lower bound.
    assert conv_operator_norm(module, kernel, input_shape, iterations=1) <= singular[0] * (
        1 + 256 * F32_EPS
    )


def test_conv_operator_norm_stopping_rule():
    module = nn.Conv(3, (3, 3), padding="SAME", use_bias=False)
    input_shape = (5, 5, 2)
    for seed in range(20):  # a kernel whose top singular value is separated by >= 10%
        kernel = np.random.default_rng(seed).normal(size=(3, 3, 2, 3))
        singular = np.linalg.svd(
            _explicit_conv_matrix(module, kernel, input_shape), compute_uv=False
        )
        if singular[1] < 0.9 * singular[0]:
            break
    assert singular[1] < 0.9 * singular[0]
    info = {}
    estimate = conv_operator_norm(module, kernel, input_shape, iterations=1000, tol=1e-6, info=info)
    # At rate (s2/s1)^2 <= 0.81 the tolerance stops it long before the limit, converged.
    assert info["converged"] and 2 <= info["iterations"] < 1000
    # Stopped when one step added <= 1e-6 relatively; at rate rho <= 0.81 what remains is at
    # most rho / (1 - rho) < 4.3 times that, plus float32 rounding of ~75-term sums.
    assert estimate == pytest.approx(singular[0], rel=5e-6 + 256 * F32_EPS)
    # tol=0 runs until the estimate stops rising at all: here, every iteration of the limit.
    full = {}
    conv_operator_norm(module, kernel, input_shape, iterations=7, tol=0.0, info=full)
    assert full == {"iterations": 7, "converged": False}
    # A limit below what the rule needs: not converged, still a lower bound.
    short = {}
    low = conv_operator_norm(module, kernel, input_shape, iterations=2, tol=1e-9, info=short)
    assert short == {"iterations": 2, "converged": False}
    assert low <= singular[0] * (1 + 256 * F32_EPS)
    with pytest.raises(ValueError, match="iterations must be a positive int"):
        conv_operator_norm(module, kernel, input_shape, iterations=0)
    with pytest.raises(ValueError, match=r"tol must be a number in \[0, 1\)"):
        conv_operator_norm(module, kernel, input_shape, tol=2.0)


def test_conv_reshaped_and_operator_norms_closed_form():
    class OneConv(nn.Module):
        @nn.compact
        def __call__(self, images, train):
            del train
            x = repo_conv(1, 3, 1, jnp.float32, "conv")(images)
            return jnp.mean(x, axis=(1, 2))  # a pool, so the only weight layer is the conv

    model = OneConv()
    apply_fn = models.make_apply_fn(model)
    # A centred delta of height 2: the convolution is 2 * identity, operator norm 2; as a
    # [9, 1] matrix its spectral norm is also 2. An all-ones kernel: reshaped norm 3 (= sqrt 9).
    delta = np.zeros((3, 3, 1, 1))
    delta[1, 1] = 2.0
    for kernel, reshaped, operator in [(delta, 2.0, 2.0), (np.ones((3, 3, 1, 1)), 3.0, None)]:
        variables = {"params": {"conv": {"kernel": jnp.asarray(kernel, jnp.float32)}}}
        layers = extract_layers(apply_fn, variables, (6, 6, 1))
        by_reshape = layer_norms(layers, conv_norm="reshaped")
        assert by_reshape.spec[0] == pytest.approx(reshaped, rel=16 * F32_EPS)
        assert by_reshape.fro_sq[0] == pytest.approx(float(np.sum(kernel**2)), rel=16 * F32_EPS)
        # tol=0: iterate until the estimate stops rising (or 500 times): the check is of the
        # operator, not of the stopping rule.
        by_operator = layer_norms(layers, conv_norm="operator", iterations=500, tol=0.0)
        assert 2 <= by_operator.power_iterations <= 500
        if operator is None:
            layer = layers.layers[0]
            matrix = _explicit_conv_matrix(layer.module, kernel, (6, 6, 1))
            operator = np.linalg.norm(matrix, 2)
            # Zero padding makes the all-ones operator norm smaller than the kernel sum 9.
            assert operator < 9.0
        assert by_operator.spec[0] == pytest.approx(operator, rel=256 * F32_EPS)


# --- BatchNorm folding and layer lists ----------------------------------------------------------


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
@pytest.mark.parametrize("bn", ["fold", "diagonal"])
def test_bn_policy_leaves_outputs_unchanged(name, bn):
    shape = (12, 12, 3)
    model = models.get_model(name, 10)
    variables = _random_variables(model, shape, seed=1)
    apply_fn = models.make_apply_fn(model)
    images = np.random.default_rng(2).uniform(size=(3, *shape)).astype(np.float32)
    expected = np.asarray(apply_fn(variables, images, False)[0])
    layers = extract_layers(apply_fn, variables, shape, bn=bn)
    got = np.asarray(apply_layers(apply_fn, variables, layers, images))
    # float32 rounding differs per layer (s * W vs. W then s): a few roundings per layer, in
    # units of the logits' size.
    tol = 16 * F32_EPS * len(layers.layers) * float(np.max(np.abs(expected)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=tol)
    # The random BatchNorms change the outputs far beyond the tolerance, so matching them
    # means the folding used their statistics: with identity BatchNorms (s = 1, shift 0) the
    # logits are others.
    plain = jax.tree_util.tree_map_with_path(
        lambda path, leaf: (
            jnp.full_like(leaf, 1.0 - 1e-5)
            if str(getattr(path[-1], "key", "")) in ("var", "scale")
            else (jnp.zeros_like(leaf) if str(getattr(path[-1], "key", "")) == "mean" else leaf)
        ),
        variables,
    )
    baseline = np.asarray(apply_fn(plain, images, False)[0])
    assert np.max(np.abs(baseline - expected)) > 100 * tol


def _abstract(name, shape, **kwargs):
    model = models.get_model(name, 10, **kwargs)
    variables = jax.eval_shape(lambda key: models.init_model(model, key, shape), jax.random.key(0))
    return models.make_apply_fn(model), variables


def _block_names(stages, blocks):
    return [f"stage{s}_block{b}" for s in range(1, stages + 1) for b in range(blocks)]


def test_layer_lists_of_registry_models():
    shape = (8, 8, 3)
    apply_fn, variables = _abstract("small_cnn", shape)
    trace = trace_layers(apply_fn, variables, shape)
    assert [(op.kind, op.name) for op in trace.ops] == [
        ("conv", "conv1"),
        ("bn", "bn1"),
        ("conv", "conv2"),
        ("bn", "bn2"),
        ("dense", "fc1"),
        ("dense", "linear"),
    ]
    assert bn_policy(trace, "fold") == {"bn1": "folded into conv1", "bn2": "folded into conv2"}
    assert set(bn_policy(trace, "diagonal").values()) == {"diagonal"}

    apply_fn, variables = _abstract("vgg16", shape)
    trace = trace_layers(apply_fn, variables, shape)
    convs = [op.name for op in trace.ops if op.kind == "conv"]
    assert convs == [f"conv{i}" for i in range(1, 14)]
    assert bn_policy(trace, "fold") == {f"bn{i}": f"folded into conv{i}" for i in range(1, 14)}
    assert [op.name for op in trace.ops if op.kind == "dense"] == ["linear"]

    apply_fn, variables = _abstract("resnet18", shape)
    trace = trace_layers(apply_fn, variables, shape)
    expected = {"bn1": "folded into conv1"}
    for block in _block_names(4, 2):
        expected[f"{block}/bn1"] = f"folded into {block}/conv1"
        expected[f"{block}/bn2"] = f"folded into {block}/conv2"
        if block.endswith("block0") and not block.startswith("stage1"):
            expected[f"{block}/shortcut_bn"] = f"folded into {block}/shortcut_conv"
    assert bn_policy(trace, "fold") == expected
    assert sum(op.kind == "conv" for op in trace.ops) == 20
    # Input shapes at the layers: stride-2 stages halve the map.
    by_name = {op.name: op for op in trace.ops}
    assert by_name["stage2_block0/conv1"].input_shape == (8, 8, 64)
    assert by_name["stage2_block0/conv2"].input_shape == (4, 4, 128)

    for name, kwargs, blocks, stages in [
        ("preact_resnet18", {}, 2, 4),
        ("wide_resnet", {"depth": 10, "width": 1}, 1, 3),
    ]:
        apply_fn, variables = _abstract(name, shape, **kwargs)
        trace = trace_layers(apply_fn, variables, shape)
        expected = {}
        for block in _block_names(stages, blocks):
            # bn1 reads a residual sum (or the stem conv's output, which the identity
            # shortcut reads too): it cannot be folded. bn2 reads conv1 only.
            expected[f"{block}/bn1"] = "diagonal"
            expected[f"{block}/bn2"] = f"folded into {block}/conv1"
        expected["bn"] = "diagonal"
        assert bn_policy(trace, "fold") == expected, name
        assert trace.ops[0].name == "conv1" and trace.ops[0].feeds_bn is None
        assert trace.ops[-1].name == "linear"


def test_extract_layers_preact_diagonal_values():
    shape = (8, 8, 3)
    model = models.get_model("wide_resnet", 10, depth=10, width=1)
    variables = _random_variables(model, shape, seed=4)
    apply_fn = models.make_apply_fn(model)
    layers = extract_layers(apply_fn, variables, shape)
    names = [layer.name for layer in layers.layers]
    assert names[:4] == [
        "conv1",
        "stage1_block0/bn1",
        "stage1_block0/conv1+bn2",
        "stage1_block0/conv2",
    ]
    diag = layers.layers[1]
    params = variables["params"]["stage1_block0"]["bn1"]
    stats = variables["batch_stats"]["stage1_block0"]["bn1"]
    s = np.asarray(params["scale"], np.float64) / np.sqrt(
        np.asarray(stats["var"], np.float64) + 1e-5
    )
    np.testing.assert_allclose(diag.kernel, s, rtol=16 * F32_EPS)
    np.testing.assert_allclose(
        diag.bias, np.asarray(params["bias"]) - s * np.asarray(stats["mean"]), rtol=64 * F32_EPS
    )
    norms = layer_norms(layers, conv_norm="reshaped")
    assert norms.spec[1] == pytest.approx(np.max(np.abs(s)), rel=16 * F32_EPS)
    assert norms.fro_sq[1] == pytest.approx(np.sum(s**2), rel=16 * F32_EPS)


# --- margins -----------------------------------------------------------------------------------


def test_margin_percentile_and_nonpositive_gamma():
    values = np.arange(101.0) - 5.0  # -5 .. 95
    stats = margin_gamma(values, 10)
    assert stats.gamma == pytest.approx(5.0) and stats.positive
    assert require_positive(stats) == stats.gamma
    low = margin_gamma(values, 5)  # exactly 0: not positive
    assert low.gamma == 0.0 and not low.positive
    assert low.fraction_nonpositive == pytest.approx(6 / 101)
    with pytest.raises(ValueError, match="gamma = 0 <= 0"):
        require_positive(low)
    np.testing.assert_allclose(
        normalized_margins(np.array([2.0, -1.0]), math.log(4.0)), [0.5, -0.25]
    )


def test_norm_measures_flag_nonpositive_margin():
    apply_fn, variables = _mlp()
    x = np.array([[1.0, 2.0, 0.0], [2.0, 3.0, 1.0]], np.float32).reshape(2, 1, 1, 3)
    labels = np.array([0, 0])  # both misclassified (class 1 wins), so every margin < 0
    measures = norm_measures(apply_fn, variables, variables, x, labels, conv_norm="reshaped")
    assert measures["margin_gamma"] < 0 and measures["margin_positive"] == 0.0
    for key in ("log_prod_fro_over_margin", "path_norm_over_margin", "log_spec_bound"):
        assert math.isnan(measures[key]), key
    assert math.isfinite(measures["log_prod_fro"])


def test_output_margins_clean_and_adversarial():
    apply_fn, variables = _mlp()
    rng = np.random.default_rng(5)
    images = rng.uniform(size=(5, 1, 1, 3)).astype(np.float32)
    labels = np.array([0, 1, 1, 0, 1])
    clean = output_margins(apply_fn, variables, images, labels, batch_size=2)
    logits = apply_fn(variables, images, False)[0]
    np.testing.assert_allclose(clean, np.asarray(margin(logits, labels)), rtol=0, atol=0)
    spec = AttackSpec("cw", eps=0.1, step_size=0.05, steps=5)
    adversarial = output_margins(apply_fn, variables, images, labels, attack=spec, batch_size=8)
    # The same attack, run directly on the one batch with the key output_margins uses.
    x_adv = make_attack(spec)(
        apply_fn, variables, images, labels, jax.random.fold_in(jax.random.key(0), 0)
    )
    direct = np.asarray(margin(apply_fn(variables, x_adv, False)[0], labels))
    np.testing.assert_allclose(
        adversarial, direct, rtol=0, atol=4 * F32_EPS * np.max(np.abs(direct))
    )
    assert np.all(adversarial <= clean + 4 * F32_EPS * np.max(np.abs(clean)))
    assert np.any(adversarial < clean - 0.01)
    uint8 = output_margins(apply_fn, variables, (images * 255).astype(np.uint8), labels)
    scaled = (images * 255).astype(np.uint8).astype(np.float32) / 255
    direct = np.asarray(margin(apply_fn(variables, scaled, False)[0], labels))
    # x * (1/255) and x / 255 differ by an ulp of the input; a few layers amplify it.
    np.testing.assert_allclose(uint8, direct, rtol=0, atol=64 * F32_EPS * np.max(np.abs(direct)))


# --- bad arguments -----------------------------------------------------------------------------


def _never_called(variables, images, train):
    raise AssertionError("apply_fn was called before the arguments were checked")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"bn": "merge"}, "Unknown BatchNorm policy"),
        ({"conv_norm": "fft"}, "Unknown conv_norm"),
        ({"margin_percentile": 101}, r"in \[0, 100\]"),
        ({"margin_percentile": -1}, r"in \[0, 100\]"),
        ({"margin_percentile": True}, r"in \[0, 100\]"),
        ({"power_iterations": 0}, "power_iterations"),
        ({"power_iterations": 1.5}, "power_iterations"),
        ({"power_tol": 1.0}, r"power_tol must be a number in \[0, 1\)"),
        ({"power_tol": -1e-3}, "power_tol"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments_raise_before_tracing(kwargs, message):
    _, variables = _mlp()
    images = np.zeros((2, 1, 1, 3), np.float32)
    with pytest.raises(ValueError, match=message):
        norm_measures(_never_called, variables, variables, images, np.array([0, 1]), **kwargs)


def test_init_of_another_model_raises_before_tracing():
    _, variables = _mlp()
    other = {"params": {"fc1": variables["params"]["fc1"]}}
    images = np.zeros((2, 1, 1, 3), np.float32)
    with pytest.raises(ValueError, match="structure of variables"):
        norm_measures(_never_called, variables, other, images, np.array([0, 1]))
    wider = jax.tree.map(lambda a: jnp.zeros((*np.shape(a)[:-1], 3)), variables)
    with pytest.raises(ValueError, match="not the same model"):
        norm_measures(_never_called, variables, wider, images, np.array([0, 1]))
    with pytest.raises(ValueError, match="labels must be"):
        norm_measures(_never_called, variables, variables, images, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="Unknown BatchNorm policy"):
        extract_layers(_never_called, variables, (1, 1, 3), bn="fused")
