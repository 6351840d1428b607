"""Layers shared by every architecture, configured once so the models agree.

Conventions (PyTorch's, since the reference code is PyTorch):

* Convolutions pad explicitly by ``kernel_size // 2`` on both sides, as
  ``nn.Conv2d(..., padding=k // 2)``. Flax's ``"SAME"`` would pad a stride-2
  3x3 conv only at the bottom/right, shifting its sampling grid by one pixel
  against the 1x1 stride-2 shortcut it is added to.
* Convolution kernels are drawn from N(0, 2 / fan_out), fan_out =
  kh * kw * out_channels (``kaiming_normal_(mode="fan_out")``), the init of the
  WideResNet code of TRADES / Rice et al. and of torchvision. Their
  (PreAct)ResNet-18 and VGG keep PyTorch's default, U(+-1/sqrt(fan_in)); with
  BatchNorm after every conv the difference does not matter in practice.
* The classifier's kernel is U(+-1/sqrt(fan_in)) (PyTorch's ``nn.Linear``
  default) and its bias is zero (as the WRN code sets it).
* BatchNorm: momentum 0.9 in Flax's convention (``new = 0.9 * old + 0.1 *
  batch``, i.e. PyTorch's ``momentum=0.1``), epsilon 1e-5. Both normalize a
  training batch with its biased variance, but PyTorch updates the running
  variance with the unbiased one (times n / (n - 1), n the values per channel)
  and Flax with the biased one. ``batch_norm(..., unbiased_var=True)`` gives
  PyTorch's update (``UnbiasedVarBatchNorm``); the default is Flax's.
* Mixed precision: parameters are float32, activations are in the module's
  ``dtype``; BatchNorm statistics are reduced and stored in float32 (Flax's
  ``force_float32_reductions``), and the classifier head runs in float32 so
  logits keep full precision for margins and soft labels.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

Dtype = Any

_conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# U(-a, a) has variance a^2 / 3, so scale 1/3 gives a = 1/sqrt(fan_in).
_dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _input_gradient_kernel(kernel: jax.Array, out_axis: int, in_axis: int) -> jax.Array:
    """The kernel with its feature axes swapped, kept as its own array on the CPU.

    The optimization barrier stops XLA from folding the transpose into the
    convolution's dimension labels; elsewhere the plain transpose is left to
    the compiler.
    """
    swapped = jnp.swapaxes(kernel, out_axis, in_axis)
    return jax.lax.platform_dependent(
        swapped, cpu=jax.lax.optimization_barrier, default=lambda k: k
    )


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
    """``jax.lax.conv_general_dilated`` whose input gradient runs fast in XLA:CPU loops.

    The value and every derivative (forward and reverse mode, any order,
    ``vmap``) are those of ``jax.lax.conv_general_dilated``; only the program
    XLA sees differs. JAX differentiates a convolution with respect to its
    input by a convolution with the flipped kernel read with its input and
    output features swapped. Outside a loop XLA:CPU copies that kernel into
    the layout its convolution kernels want; inside a ``while`` loop body
    (the PGD attack's ``fori_loop``) it does not, and the convolution runs on
    a slower path: a PGD-10 attack on PreActResNet-18 (batch 32, 2-core CPU)
    took 1.7 s per step in a loop against 0.9 s unrolled. Here the tangent
    with respect to the input uses a kernel whose feature axes were swapped
    explicitly (behind an optimization barrier on the CPU, a copy of the
    kernel per step, which is small), so the transposed convolution JAX
    derives from it reads the kernel in the canonical layout.

    Costs of the rewrite: forward mode (``jax.jvp``, ``jax.linearize``) now
    runs the tangent convolution with the swapped kernel, so a forward-mode
    derivative inside a CPU loop takes the slow path this avoids for reverse
    mode (the library's one forward-mode use, ``jax.linearize`` in the
    gradient analyses, is outside a loop); and reverse mode keeps the swapped
    kernel until the backward pass (XLA's buffers for the PreActResNet-18
    step grew by 6.5 MiB, about 0.7%). Grouped convolutions are passed to
    ``jax.lax.conv_general_dilated`` unchanged.

    Args:
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, batch_group_count, precision,
      preferred_element_type: as for ``jax.lax.conv_general_dilated``.

    Returns:
      The convolution, as ``jax.lax.conv_general_dilated`` returns it.

    Example:
      >>> x, k = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 5))
      >>> dn = ("NHWC", "HWIO", "NHWC")
      >>> y = conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn)
      >>> bool(jnp.all(y == jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
      ...                                                   dimension_numbers=dn)))
      True
    """
    options = dict(
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    if feature_group_count != 1 or batch_group_count != 1:
        return jax.lax.conv_general_dilated(
            lhs,
            rhs,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            **options,
        )
    numbers = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    out_axis, in_axis, *spatial = numbers.rhs_spec
    swapped_numbers = jax.lax.ConvDimensionNumbers(
        numbers.lhs_spec, (in_axis, out_axis, *spatial), numbers.out_spec
    )

    def plain(x, k):
        return jax.lax.conv_general_dilated(x, k, dimension_numbers=numbers, **options)

    @jax.custom_jvp
    def convolve(x, k):
        return plain(x, k)

    def convolve_jvp(primals, tangents):
        x, k = primals
        dx, dk = tangents
        y = plain(x, k)
        dy = None
        if not isinstance(dx, SymbolicZero):
            k_swapped = _input_gradient_kernel(k, out_axis, in_axis)
            dy = jax.lax.conv_general_dilated(
                dx, k_swapped, dimension_numbers=swapped_numbers, **options
            )
        if not isinstance(dk, SymbolicZero):
            dy_k = plain(x, dk)
            dy = dy_k if dy is None else dy + dy_k
        if dy is None:
            dy = jnp.zeros_like(y)
        return y, dy

    convolve.defjvp(convolve_jvp, symbolic_zeros=True)
    return convolve(lhs, rhs)


def conv(features: int, kernel_size: int, strides: int, dtype: Dtype, name: str) -> nn.Conv:
    """A bias-free square convolution with PyTorch padding and fan-out init.

    Args:
      features: output channels.
      kernel_size: height and width of the kernel (odd).
      strides: stride in both spatial dimensions.
      dtype: compute dtype (parameters stay float32).
      name: submodule name.

    Returns:
      An unbound ``nn.Conv``; every conv here is followed by BatchNorm, which
      makes a bias redundant.
    """
    pad = kernel_size // 2
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=_conv_kernel_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        conv_general_dilated=conv_general_dilated,
        name=name,
    )


class UnbiasedVarBatchNorm(nn.Module):
    """BatchNorm that updates its running variance as PyTorch does.

    The forward pass is Flax's ``nn.BatchNorm`` over all axes but the last:
    in training mode the input is normalized with the batch mean and the
    *biased* batch variance (``E[x^2] - E[x]^2`` in float32, clipped at 0),
    then scaled and shifted. Only the running-variance update differs:
    ``var <- momentum * var + (1 - momentum) * var_batch * n / (n - 1)``, with
    ``n`` the number of values per channel (batch x height x width), as
    ``torch.nn.BatchNorm2d`` does. Under ``jax.jit`` with the batch sharded
    over a mesh the shapes, and so ``n``, are those of the global batch.

    The variables are ``nn.BatchNorm``'s (``params``: ``scale``, ``bias``;
    ``batch_stats``: ``mean``, ``var``, all float32), so checkpoints of either
    restore into the other.

    Attributes:
      use_running_average: normalize with the running statistics (inference)
        instead of the batch's, and leave them unchanged.
      momentum: decay of the running averages (Flax's convention).
      epsilon: added to the variance before the square root.
      dtype: dtype of the output.

    Example:
      >>> bn = UnbiasedVarBatchNorm(use_running_average=False)
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> variables = bn.init(jax.random.key(0), x)
      >>> _, updates = bn.apply(variables, x, mutable=["batch_stats"])
      >>> updates["batch_stats"]["var"]  # 0.9 * 1 + 0.1 * 5 * 4 / 3
      Array([1.5666666, 1.5666666], dtype=float32)
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            # Statistics in float32 whatever the compute dtype, one pass as Flax's.
            x32 = x.astype(jnp.float32)
            mean = jnp.mean(x32, axes)
            var = jnp.maximum(0.0, jnp.mean(jnp.square(x32), axes) - jnp.square(mean))
            if not self.is_initializing():
                count = math.prod(x.shape[:-1])
                if count < 2:
                    raise ValueError(
                        "UnbiasedVarBatchNorm needs at least 2 values per channel in training "
                        f"mode (the unbiased variance divides by n - 1); got input shape {x.shape}."
                    )
                unbiased = var * (count / (count - 1))
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
        mul = jax.lax.rsqrt(var + self.epsilon) * scale
        return ((x - mean) * mul + bias).astype(self.dtype)


def batch_norm(
    train: bool, dtype: Dtype, name: str, unbiased_var: bool = False
) -> nn.BatchNorm | UnbiasedVarBatchNorm:
    """BatchNorm with PyTorch's defaults; batch statistics iff ``train``.

    Args:
      train: use (and update) batch statistics if True, else the running ones.
      dtype: compute dtype of the output.
      name: submodule name.
      unbiased_var: update the running variance with the unbiased batch
        variance, as PyTorch (``UnbiasedVarBatchNorm``), instead of the biased
        one, as Flax. Same variables and same outputs either way.

    Returns:
      An unbound ``nn.BatchNorm`` (or ``UnbiasedVarBatchNorm``).

    Example:
      >>> bn = batch_norm(True, jnp.float32, "bn1", unbiased_var=True)
    """
    if unbiased_var:
        return UnbiasedVarBatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
        )
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
    """A fully connected layer with PyTorch's ``nn.Linear`` kernel init.

    Args:
      features: output features.
      dtype: compute dtype (parameters stay float32).
      name: submodule name.

    Returns:
      An unbound ``nn.Dense`` with a zero-initialised bias.
    """
    return nn.Dense(
        features,
        kernel_init=_dense_kernel_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def pooled_logits(features: jax.Array, num_classes: int) -> jax.Array:
    """Global average pooling and the linear classifier, in float32.

    Must be called inside a compact ``__call__``; the classifier is named
    ``"linear"``. Pooling over whatever spatial size is left (instead of a
    fixed ``avg_pool2d(out, 4)`` and flatten) lets 28x28 and 32x32 inputs share
    the code; for 32x32 inputs it computes the same thing as the reference.

    Args:
      features: ``[B, H, W, C]`` activations in any dtype.
      num_classes: number of logits.

    Returns:
      ``[B, num_classes]`` float32 logits.
    """
    pooled = jnp.mean(features.astype(jnp.float32), axis=(1, 2))
    return dense(num_classes, jnp.float32, "linear")(pooled)
