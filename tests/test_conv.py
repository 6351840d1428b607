"""The models' convolution: lax's values and derivatives, and a canonical kernel in loops."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_memat.models import get_model, init_model, make_apply_fn
from jax_memat.models.layers import conv_general_dilated
from tests.helpers import F32_EPS

# (input NHWC, kernel HWIO, strides, padding, lhs_dilation, rhs_dilation)
CASES = {
    "3x3": ((2, 8, 8, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1)), None, None),
    "3x3-stride2": ((2, 9, 9, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1)), None, None),
    "1x1-stride2": ((2, 8, 8, 4), (1, 1, 4, 3), (2, 2), ((0, 0), (0, 0)), None, None),
    "valid-dilated": ((1, 10, 7, 2), (3, 2, 2, 3), (1, 2), "VALID", (1, 1), (2, 1)),
    "lhs-dilated": ((1, 5, 5, 2), (3, 3, 2, 2), (1, 1), ((2, 2), (1, 1)), (2, 1), None),
}
DN = ("NHWC", "HWIO", "NHWC")


def _inputs(case, seed=0):
    x_shape, k_shape, *_ = CASES[case]
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    k = jnp.asarray(rng.normal(size=k_shape) / np.sqrt(np.prod(k_shape[:3])), jnp.float32)
    return x, k


def _fns(case):
    _, _, strides, padding, lhs_d, rhs_d = CASES[case]
    options = dict(lhs_dilation=lhs_d, rhs_dilation=rhs_d, dimension_numbers=DN)

    def ours(x, k):
        return conv_general_dilated(x, k, strides, padding, **options)

    def reference(x, k):
        return jax.lax.conv_general_dilated(x, k, strides, padding, **options)

    return ours, reference


def _close(a, b, terms):
    """Float32 results of sums of ``terms`` products agree to a few roundings each."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1.0, float(np.max(np.abs(b))))
    np.testing.assert_allclose(a, b, rtol=0, atol=8 * terms * F32_EPS * scale)


@pytest.mark.parametrize("case", sorted(CASES))
def test_value_and_derivatives_are_lax(case):
    ours, reference = _fns(case)
    x, k = _inputs(case)
    terms = int(np.prod(k.shape[:3]))
    _close(ours(x, k), reference(x, k), terms)

    # Reverse mode, both arguments, through a nonlinearity.
    def loss(f):
        return lambda x, k: jnp.sum(jnp.tanh(f(x, k)) ** 2)

    for g_ours, g_ref in zip(
        jax.grad(loss(ours), (0, 1))(x, k),
        jax.grad(loss(reference), (0, 1))(x, k),
        strict=True,
    ):
        _close(g_ours, g_ref, 4 * terms * int(np.prod(x.shape[:3])))

    # Forward mode (jax.linearize is what the gradient-instability analysis uses).
    dx, dk = _inputs(case, seed=1)
    _, t_ours = jax.jvp(ours, (x, k), (dx, dk))
    _, t_ref = jax.jvp(reference, (x, k), (dx, dk))
    _close(t_ours, t_ref, 2 * terms)

    # Second order: the gradient of a function of the input gradient.
    def second(f):
        def input_grad_norm(k):
            g = jax.grad(lambda x: jnp.sum(jnp.sin(f(x, k))))(x)
            return jnp.sum(g**2)

        return jax.grad(input_grad_norm)(k)

    _close(second(ours), second(reference), 16 * terms * int(np.prod(x.shape[:3])))


def test_per_example_gradients_under_vmap():
    ours, reference = _fns("3x3-stride2")
    x, k = _inputs("3x3-stride2")

    def per_example(f):
        def loss(k, xi):
            return jnp.sum(jnp.tanh(f(xi[None], k)))

        return jax.vmap(jax.grad(loss), in_axes=(None, 0))(k, x)

    _close(per_example(ours), per_example(reference), 4 * 36 * 81)


def test_grouped_convolution_is_passed_through():
    x = jnp.ones((1, 4, 4, 4))
    k = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 2, 4)), jnp.float32)
    y = conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2)
    ref = jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2
    )
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))


def _kernel_labels_in_loop(conv_fn):
    """The kernel dimension labels of every convolution XLA compiles for a PGD-like loop."""
    x = jnp.ones((2, 8, 8, 4))
    k = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 4, 4)), jnp.float32)

    def grad_x(z):
        return jax.grad(
            lambda z: jnp.sum(jnp.tanh(conv_fn(z, k, (1, 1), "SAME", dimension_numbers=DN)))
        )(z)

    def attack(z):
        return jax.lax.fori_loop(0, 3, lambda i, z: z + 0.01 * jnp.sign(grad_x(z)), z)

    text = jax.jit(attack).lower(x).compile().as_text()
    return set(re.findall(r"dim_labels=[a-z0-9]+_([a-z0-9]+)->", text))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the layout fix is for XLA:CPU")
def test_input_gradient_in_a_loop_reads_the_kernel_in_canonical_layout():
    # XLA:CPU's fast convolutions take the kernel as [h, w, in, out]; a kernel
    # read as [h, w, out, in] ("01oi") falls back to a slower path.
    assert _kernel_labels_in_loop(conv_general_dilated) == {"01io"}
    plain = _kernel_labels_in_loop(jax.lax.conv_general_dilated)
    if plain == {"01io"}:
        pytest.skip(
            "this XLA canonicalizes the loop's transposed convolution by itself; the "
            "explicit kernel transpose is then redundant (still correct)"
        )
    assert "01oi" in plain


def test_models_use_it():
    module = get_model("small_cnn", 10)
    variables = init_model(module, jax.random.key(0), (28, 28, 1))
    apply = make_apply_fn(module)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 28, 28, 1)), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda x: apply(variables, x, False)[0])(x))
    assert "custom_jvp_call" in jaxpr
