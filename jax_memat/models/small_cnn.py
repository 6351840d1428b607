"""A small CNN for CPU-sized runs (Fashion-MNIST, smoke tests of CIFAR pipelines).

Two stride-2 3x3 conv-BN-ReLU layers (32 and 64 channels), a 2x2 max pool,
flatten, a 128-unit hidden layer and the classifier. Both 28x28 and 32x32
inputs end in a 4x4x64 map (28-14-7-4 and 32-16-8-4; the pool pads like
``ceil_mode=True``), so the flatten size does not depend on the dataset:
151,402 parameters for 28x28x1 inputs and 10 classes, 151,978 for 32x32x3.

Striding the convolutions instead of pooling after stride-1 convs keeps the
full-resolution layer out of the network; on a 2-core CPU this is about 8x
faster per PGD step than conv-pool-conv-pool at the same parameter count.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_memat.models.layers import Dtype, batch_norm, conv, dense


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """``nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")`` as a reshape and a max.

    The windows do not overlap, so the pool is a max over two axes of a
    reshaped array. Its gradient is JAX's for ``max`` (an equality mask), where
    the windowed max's is a variadic reduce-window that XLA:CPU runs slowly:
    129 of 1260 ms of a FAB-T run on this model. The values are the same; the
    gradients differ only where two entries of a window tie for the maximum
    (``max`` splits the gradient between them, the windowed max gives it to
    one). In float32 after the ReLU that is in practice only at zero, where
    the ReLU's own gradient is zero; in bfloat16 positive values tie too
    (166 of 200,704 entries of a 64x7x7x64 batch, measured), and there both
    choices are valid subgradients of the max.

    Args:
      x: ``[B, H, W, C]``.

    Returns:
      ``[B, ceil(H / 2), ceil(W / 2), C]``; odd sizes are padded at the bottom
      and right with ``-inf``, as ``"SAME"`` pads.
    """
    b, h, w, ch = x.shape
    low = jnp.asarray(-jnp.inf, x.dtype)
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=low)
    x = x.reshape(b, (h + 1) // 2, 2, (w + 1) // 2, 2, ch)
    return jnp.max(x, axis=(2, 4))


class SmallCNN(nn.Module):
    """conv32/2-BN-ReLU, conv64/2-BN-ReLU, max pool, dense 128-ReLU, linear.

    Attributes:
      num_classes: number of logits.
      dtype: compute dtype (parameters stay float32, logits are float32).
      width: channel multiplier (32w and 64w channels, 128w hidden units).
      bn_unbiased_var: BatchNorm running variance updated as PyTorch's
        (``layers.UnbiasedVarBatchNorm``).
    """

    num_classes: int
    dtype: Dtype = jnp.float32
    width: int = 1
    bn_unbiased_var: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> jax.Array:
        x = jnp.asarray(images, self.dtype)
        x = nn.relu(
            batch_norm(train, self.dtype, "bn1", self.bn_unbiased_var)(
                conv(32 * self.width, 3, 2, self.dtype, "conv1")(x)
            )
        )
        x = nn.relu(
            batch_norm(train, self.dtype, "bn2", self.bn_unbiased_var)(
                conv(64 * self.width, 3, 2, self.dtype, "conv2")(x)
            )
        )
        x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(dense(128 * self.width, self.dtype, "fc1")(x))
        return dense(self.num_classes, jnp.float32, "linear")(x.astype(jnp.float32))


def small_cnn(
    num_classes: int, dtype: Dtype = jnp.float32, width: int = 1, bn_unbiased_var: bool = False
) -> SmallCNN:
    """The small CNN described in the module docstring.

    Args:
      num_classes: number of logits.
      dtype: compute dtype.
      width: channel multiplier (1: 151,402 parameters on 28x28x1, 10 classes).
      bn_unbiased_var: BatchNorm running variance updated as PyTorch's.

    Returns:
      The module.
    """
    return SmallCNN(num_classes, dtype, width, bn_unbiased_var)
