"""Residual networks: pre-activation (PreActResNet-18, WideResNet) and ResNet-18.

The CIFAR variants of adversarial-training code (Madry et al.; TRADES; Rice et
al. 2020): a 3x3 stride-1 stem, no max pooling, global average pooling and
one linear layer. See ``layers`` for initialisation and BatchNorm settings
(``bn_unbiased_var``: PyTorch's running-variance update).

The pre-activation WideResNet of Zagoruyko & Komodakis (as written in the
TRADES / robust-overfitting code) has the same block as PreActResNet: when a
block changes the width or stride, its 1x1 shortcut reads the activated input
``relu(bn1(x))``; otherwise the shortcut is ``x`` itself. The two differ only
in widths and depths, so one module serves both.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_memat.models.layers import Dtype, batch_norm, conv, pooled_logits


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the (projected) input.

    Attributes:
      features: output channels.
      strides: stride of the first conv and of the shortcut.
      dtype: compute dtype.
      bn_unbiased_var: BatchNorm running variance updated as PyTorch's.
    """

    features: int
    strides: int
    dtype: Dtype
    bn_unbiased_var: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = nn.relu(batch_norm(train, self.dtype, "bn1", self.bn_unbiased_var)(x))
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, 1, self.strides, self.dtype, "shortcut")(out)
        else:
            shortcut = x
        out = conv(self.features, 3, self.strides, self.dtype, "conv1")(out)
        out = nn.relu(batch_norm(train, self.dtype, "bn2", self.bn_unbiased_var)(out))
        out = conv(self.features, 3, 1, self.dtype, "conv2")(out)
        return out + shortcut


class PreActResNet(nn.Module):
    """Stem conv, stages of ``PreActBlock``s, BN-ReLU, global pool, linear.

    Attributes:
      stem_features: channels of the 3x3 stem conv.
      stage_features: channels of each stage; every stage after the first
        starts with a stride-2 block.
      blocks_per_stage: number of blocks in every stage.
      num_classes: number of logits.
      dtype: compute dtype (parameters stay float32, logits are float32).
      bn_unbiased_var: BatchNorm running variance updated as PyTorch's
        (``layers.UnbiasedVarBatchNorm``).
    """

    stem_features: int
    stage_features: Sequence[int]
    blocks_per_stage: int
    num_classes: int
    dtype: Dtype = jnp.float32
    bn_unbiased_var: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> jax.Array:
        x = jnp.asarray(images, self.dtype)
        x = conv(self.stem_features, 3, 1, self.dtype, "conv1")(x)
        for stage, features in enumerate(self.stage_features):
            for index in range(self.blocks_per_stage):
                strides = 2 if stage > 0 and index == 0 else 1
                name = f"stage{stage + 1}_block{index}"
                block = PreActBlock(features, strides, self.dtype, self.bn_unbiased_var, name=name)
                x = block(x, train)
        x = nn.relu(batch_norm(train, self.dtype, "bn", self.bn_unbiased_var)(x))
        return pooled_logits(x, self.num_classes)


class BasicBlock(nn.Module):
    """Post-activation block: conv-BN-ReLU-conv-BN, add shortcut, ReLU.

    Attributes:
      features: output channels.
      strides: stride of the first conv and of the shortcut.
      dtype: compute dtype.
      bn_unbiased_var: BatchNorm running variance updated as PyTorch's.
    """

    features: int
    strides: int
    dtype: Dtype
    bn_unbiased_var: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = conv(self.features, 3, self.strides, self.dtype, "conv1")(x)
        out = nn.relu(batch_norm(train, self.dtype, "bn1", self.bn_unbiased_var)(out))
        out = conv(self.features, 3, 1, self.dtype, "conv2")(out)
        out = batch_norm(train, self.dtype, "bn2", self.bn_unbiased_var)(out)
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, 1, self.strides, self.dtype, "shortcut_conv")(x)
            shortcut = batch_norm(train, self.dtype, "shortcut_bn", self.bn_unbiased_var)(shortcut)
        else:
            shortcut = x
        return nn.relu(out + shortcut)


class ResNet(nn.Module):
    """Post-activation ResNet (CIFAR variant): conv-BN-ReLU stem, stages, pool, linear.

    Attributes:
      stage_features: channels of each stage; every stage after the first
        starts with a stride-2 block. The stem has ``stage_features[0]``.
      blocks_per_stage: number of ``BasicBlock``s in every stage.
      num_classes: number of logits.
      dtype: compute dtype (parameters stay float32, logits are float32).
      bn_unbiased_var: BatchNorm running variance updated as PyTorch's
        (``layers.UnbiasedVarBatchNorm``).
    """

    stage_features: Sequence[int]
    blocks_per_stage: int
    num_classes: int
    dtype: Dtype = jnp.float32
    bn_unbiased_var: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> jax.Array:
        x = jnp.asarray(images, self.dtype)
        x = conv(self.stage_features[0], 3, 1, self.dtype, "conv1")(x)
        x = nn.relu(batch_norm(train, self.dtype, "bn1", self.bn_unbiased_var)(x))
        for stage, features in enumerate(self.stage_features):
            for index in range(self.blocks_per_stage):
                strides = 2 if stage > 0 and index == 0 else 1
                name = f"stage{stage + 1}_block{index}"
                block = BasicBlock(features, strides, self.dtype, self.bn_unbiased_var, name=name)
                x = block(x, train)
        return pooled_logits(x, self.num_classes)


def preact_resnet18(
    num_classes: int, dtype: Dtype = jnp.float32, bn_unbiased_var: bool = False
) -> PreActResNet:
    """PreActResNet-18: widths 64-128-256-512, two blocks per stage.

    Args:
      num_classes: number of logits.
      dtype: compute dtype.
      bn_unbiased_var: BatchNorm running variance updated as PyTorch's.

    Returns:
      The module (11,172,170 parameters for 10 classes: Rice et al.'s
      definition, which has the final BN-ReLU; the often quoted 11,171,146 is
      kuangliu/pytorch-cifar's, without that BatchNorm).
    """
    return PreActResNet(64, (64, 128, 256, 512), 2, num_classes, dtype, bn_unbiased_var)


def resnet18(num_classes: int, dtype: Dtype = jnp.float32, bn_unbiased_var: bool = False) -> ResNet:
    """ResNet-18 (CIFAR variant): widths 64-128-256-512, two blocks per stage.

    Args:
      num_classes: number of logits.
      dtype: compute dtype.
      bn_unbiased_var: BatchNorm running variance updated as PyTorch's.

    Returns:
      The module (11,173,962 parameters for 10 classes).
    """
    return ResNet((64, 128, 256, 512), 2, num_classes, dtype, bn_unbiased_var)


def wide_resnet(
    num_classes: int,
    depth: int = 28,
    width: int = 10,
    dtype: Dtype = jnp.float32,
    bn_unbiased_var: bool = False,
) -> PreActResNet:
    """WRN-depth-width: a 16-channel stem and stages of 16k, 32k, 64k channels.

    Args:
      num_classes: number of logits.
      depth: total depth, 6 n + 4 for n blocks per stage (28 and 34 are the usual).
      width: widening factor k.
      dtype: compute dtype.
      bn_unbiased_var: BatchNorm running variance updated as PyTorch's.

    Returns:
      The module (WRN-28-10: 36,479,194 parameters, WRN-34-10: 46,160,474, for
      10 classes).

    Raises:
      ValueError: if ``(depth - 4) % 6 != 0``, ``depth < 10`` or ``width < 1``.
    """
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(
            f"wide_resnet depth must satisfy (depth - 4) % 6 == 0 with depth >= 10 "
            f"(e.g. 16, 22, 28, 34, 40), got {depth}."
        )
    if width < 1:
        raise ValueError(f"wide_resnet width must be a positive integer, got {width}.")
    stage_features = (16 * width, 32 * width, 64 * width)
    return PreActResNet(16, stage_features, (depth - 4) // 6, num_classes, dtype, bn_unbiased_var)
