"""A small deterministic image-classification dataset for tests and benchmarks."""

from __future__ import annotations

import numpy as np

from jax_memat.data import _random
from jax_memat.data.dataset import Dataset

# Pixel values (uint8 units): each class template lies in [_LOW, _LOW + _RANGE]
# and every image adds Gaussian noise of standard deviation _NOISE_STD. With
# these values the nearest template is right for almost every image even at
# 8x8x1, so a small model learns quickly, yet no two images are equal.
_LOW = 48.0
_RANGE = 160.0
_NOISE_STD = 48.0
_SPLIT_IDS = {"train": 1, "test": 2}


def make_synthetic(
    split: str,
    *,
    num_examples: int,
    image_shape: tuple[int, int, int],
    num_classes: int,
    seed: int,
) -> Dataset:
    """Generates the ``synthetic`` dataset: class templates plus noise.

    The class templates depend only on ``seed`` (and the shape and number of
    classes), so the train and test splits share them and a model fitted on
    one generalizes to the other; labels and noise come from a separate stream
    per split. Examples are generated one after the other, so the first ``n``
    examples do not depend on ``num_examples``.

    Args:
      split: ``"train"`` or ``"test"``.
      num_examples: how many examples to generate.
      image_shape: (H, W, C) of each image.
      num_classes: number of classes K.
      seed: non-negative int from which everything is drawn.

    Returns:
      A ``Dataset`` named ``"synthetic"`` with uint8 images.

    Example:
      >>> ds = make_synthetic("train", num_examples=6, image_shape=(4, 4, 1), num_classes=3,
      ...                     seed=0)
      >>> ds.images.shape, ds.labels.dtype
      ((6, 4, 4, 1), dtype('int32'))
      >>> ds.source
      'synthetic train: 6 examples generated from seed 0 (4x4x1 images, 3 classes)'
    """
    templates = _random.generator(seed, "synthetic.templates").uniform(
        size=(num_classes, *image_shape)
    )
    split_id = _SPLIT_IDS[split]
    labels = _random.generator(seed, "synthetic.labels", split_id).integers(
        0, num_classes, size=num_examples
    )
    noise = _random.generator(seed, "synthetic.noise", split_id).normal(
        scale=_NOISE_STD, size=(num_examples, *image_shape)
    )
    pixels = _LOW + _RANGE * templates[labels] + noise
    images = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    height, width, channels = image_shape
    source = (
        f"synthetic {split}: {num_examples} examples generated from seed {seed} "
        f"({height}x{width}x{channels} images, {num_classes} classes)"
    )
    return Dataset(images, labels.astype(np.int32), num_classes, "synthetic", source)
