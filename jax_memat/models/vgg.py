"""VGG-16 with BatchNorm, CIFAR variant (kuangliu/pytorch-cifar, as used in AT code).

Differences from that definition, both deliberate:

* Convolutions have no bias (it is redundant before BatchNorm): 14,724,042
  parameters for 10 classes instead of 14,728,266.
* Max pools pad like PyTorch's ``ceil_mode=True`` ("SAME" in Flax) and the
  features are globally average pooled before the classifier. For 32x32 inputs
  (every map even, 1x1 at the end) this is exactly the reference; for 28x28
  inputs the maps go 28-14-7-4-2-1 instead of shrinking to nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_memat.models.layers import Dtype, batch_norm, conv, pooled_logits

# Channels of the 3x3 conv-BN-ReLU layers; "M" is a 2x2 stride-2 max pool.
VGG16_CFG: tuple[int | str, ...] = (
    *(64, 64, "M"),
    *(128, 128, "M"),
    *(256, 256, 256, "M"),
    *(512, 512, 512, "M"),
    *(512, 512, 512, "M"),
)


class VGG(nn.Module):
    """conv-BN-ReLU layers and max pools as in ``cfg``, global pool, linear.

    Attributes:
      cfg: channels of each conv layer, or ``"M"`` for a max pool.
      num_classes: number of logits.
      dtype: compute dtype (parameters stay float32, logits are float32).
      bn_unbiased_var: BatchNorm running variance updated as PyTorch's
        (``layers.UnbiasedVarBatchNorm``).
    """

    cfg: Sequence[int | str]
    num_classes: int
    dtype: Dtype = jnp.float32
    bn_unbiased_var: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> jax.Array:
        x = jnp.asarray(images, self.dtype)
        layer = 0
        for item in self.cfg:
            if item == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
            else:
                layer += 1
                x = conv(int(item), 3, 1, self.dtype, f"conv{layer}")(x)
                x = nn.relu(batch_norm(train, self.dtype, f"bn{layer}", self.bn_unbiased_var)(x))
        return pooled_logits(x, self.num_classes)


def vgg16(num_classes: int, dtype: Dtype = jnp.float32, bn_unbiased_var: bool = False) -> VGG:
    """VGG-16 with BatchNorm (13 convs, one linear layer).

    Args:
      num_classes: number of logits.
      dtype: compute dtype.
      bn_unbiased_var: BatchNorm running variance updated as PyTorch's.

    Returns:
      The module (14,724,042 parameters for 10 classes).
    """
    return VGG(VGG16_CFG, num_classes, dtype, bn_unbiased_var)
