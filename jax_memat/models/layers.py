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
  batch``, i.e. PyTorch's ``momentum=0.1``), epsilon 1e-5. One difference
  stays: PyTorch updates the running variance with the unbiased batch
  variance (times n / (n - 1)), Flax with the biased one; for n = batch x H x W
  values per channel this is immaterial.
* Mixed precision: parameters are float32, activations are in the module's
  ``dtype``; BatchNorm statistics are reduced and stored in float32 (Flax's
  ``force_float32_reductions``), and the classifier head runs in float32 so
  logits keep full precision for margins and soft labels.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

_conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# U(-a, a) has variance a^2 / 3, so scale 1/3 gives a = 1/sqrt(fan_in).
_dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


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
        name=name,
    )


def batch_norm(train: bool, dtype: Dtype, name: str) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults; batch statistics iff ``train``.

    Args:
      train: use (and update) batch statistics if True, else the running ones.
      dtype: compute dtype of the output.
      name: submodule name.

    Returns:
      An unbound ``nn.BatchNorm``.
    """
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
