"""On-device batching: index plans made on the host, gathers and augmentation on device.

The whole uint8 dataset lives on the accelerators; an epoch is a host-side
int32 array of example indices [steps, batch], and each step gathers its rows,
scales them to [0, 1] and augments them inside the jitted step. Shapes never
change, so the step compiles once:

- training drops the last partial batch of each epoch (a fresh permutation
  every epoch, so every example is still seen about equally often);
- evaluation pads the last batch with index 0 and returns a mask that is 1 for
  real examples and 0 for padding, so that every example counts exactly once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from jax_memat.data import _random
from jax_memat.parallel import batch_sharded, replicated


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Number of full training batches in an epoch (the remainder is dropped).

    Args:
      num_examples: size N of the training set.
      batch_size: global batch size B.

    Returns:
      ``N // B``.

    Example:
      >>> steps_per_epoch(50_000, 128)
      390
    """
    _check_positive(num_examples, "num_examples")
    _check_positive(batch_size, "batch_size")
    return num_examples // batch_size


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the training examples in one epoch, deterministic in (seed, epoch).

    Args:
      num_examples: size N of the training set.
      seed: non-negative int.
      epoch: non-negative int (0-based or 1-based, as long as it is consistent).

    Returns:
      An int32 permutation of ``range(N)``.

    Example:
      >>> sorted(epoch_permutation(5, seed=0, epoch=3).tolist())
      [0, 1, 2, 3, 4]
    """
    _check_positive(num_examples, "num_examples")
    rng = np.random.default_rng([_random.check_seed(seed), _random.check_seed(epoch, "epoch")])
    return rng.permutation(num_examples).astype(np.int32)


def train_batch_indices(num_examples: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """The batches of one training epoch: ``epoch_permutation`` cut into full batches.

    The last ``num_examples % batch_size`` examples of the permutation are
    dropped so that every batch has the same static shape; they differ from
    epoch to epoch.

    Args:
      num_examples: size N of the training set.
      batch_size: global batch size B, at most N.
      seed: non-negative int.
      epoch: non-negative int.

    Returns:
      int32 array [N // B, B] of example indices, each at most once.

    Raises:
      ValueError: ``batch_size > num_examples`` or non-positive sizes.

    Example:
      >>> train_batch_indices(10, 4, seed=0, epoch=0).shape
      (2, 4)
    """
    steps = steps_per_epoch(num_examples, batch_size)
    if steps == 0:
        raise ValueError(
            f"batch_size ({batch_size}) is larger than the number of examples ({num_examples})."
        )
    permutation = epoch_permutation(num_examples, seed, epoch)
    return permutation[: steps * batch_size].reshape(steps, batch_size)


def eval_batches(num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation batches in order, the last one padded, with a mask.

    Args:
      num_examples: size N of the evaluated set.
      batch_size: batch size B.

    Returns:
      ``(indices, mask)``: int32 indices [S, B] with S = ceil(N / B), in order,
      the padding slots of the last batch holding index 0; float32 mask [S, B],
      1 for real examples and 0 for padding. Sums weighted by the mask count
      every example exactly once.

    Example:
      >>> indices, mask = eval_batches(5, 2)
      >>> indices.tolist(), mask.tolist()[-1]
      ([[0, 1], [2, 3], [4, 0]], [1.0, 0.0])
    """
    _check_positive(num_examples, "num_examples")
    _check_positive(batch_size, "batch_size")
    steps = -(-num_examples // batch_size)
    indices = np.zeros(steps * batch_size, np.int32)
    indices[:num_examples] = np.arange(num_examples)
    mask = np.zeros(steps * batch_size, np.float32)
    mask[:num_examples] = 1.0
    return indices.reshape(steps, batch_size), mask.reshape(steps, batch_size)


def augment(
    images: jax.Array, key: jax.Array, *, crop_padding: int = 4, flip: bool = True
) -> jax.Array:
    """Random crop after zero padding, and random horizontal flip, per example.

    Each image is padded with ``crop_padding`` zero pixels on every side and a
    window of the original size is cut at a uniformly random offset (as
    torchvision's ``RandomCrop(H, padding=crop_padding)``), then flipped left
    to right with probability 1/2 (``RandomHorizontalFlip``). Jit-compatible;
    ``crop_padding`` and ``flip`` must be static.

    Args:
      images: float array [B, H, W, C].
      key: PRNG key; example ``i`` uses ``jax.random.split(key, B)[i]``.
      crop_padding: padding in pixels; 0 disables cropping.
      flip: whether to flip at random.

    Returns:
      Array of the shape and dtype of ``images``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> out = augment(jnp.ones((2, 8, 8, 3)), jax.random.key(0))
      >>> out.shape
      (2, 8, 8, 3)
    """
    _check_crop_padding(crop_padding)
    return _augment(images, key, crop_padding, flip)


def make_batch(
    images_u8: jax.Array,
    labels: jax.Array,
    indices: jax.Array,
    key: jax.Array | None,
    *,
    augment: bool,
    crop_padding: int = 4,
    flip: bool = True,
) -> dict[str, jax.Array]:
    """Gathers a batch from a dataset held on device, scales it to [0, 1], augments it.

    A pure function; ``augment``, ``crop_padding`` and ``flip`` are static (bind
    them with ``functools.partial`` before ``jax.jit``).

    Args:
      images_u8: uint8 array [N, H, W, C], the whole dataset.
      labels: integer array [N].
      indices: integer array [B] of example indices (a row of
        ``train_batch_indices`` or ``eval_batches``).
      key: PRNG key for the augmentation; may be None when ``augment`` is False.
      augment: whether to apply ``augment``.
      crop_padding: see ``augment``.
      flip: see ``augment``.

    Returns:
      ``{"image": float32 [B, H, W, C] in [0, 1], "label": int32 [B],
      "index": int32 [B]}``.

    Example:
      >>> import functools, jax, jax.numpy as jnp
      >>> step_batch = jax.jit(functools.partial(make_batch, augment=True))
      >>> batch = step_batch(jnp.zeros((10, 8, 8, 3), jnp.uint8), jnp.arange(10),
      ...                    jnp.array([3, 1]), jax.random.key(0))
      >>> batch["image"].shape, batch["label"].tolist(), batch["index"].tolist()
      ((2, 8, 8, 3), [3, 1], [3, 1])
    """
    indices = jnp.asarray(indices, jnp.int32)
    images = jnp.asarray(images_u8)[indices].astype(jnp.float32) / 255.0
    if augment:
        if key is None:
            raise ValueError("make_batch(augment=True) needs a PRNG key; got None.")
        _check_crop_padding(crop_padding)
        images = _augment(images, key, crop_padding, flip)
    return {
        "image": images,
        "label": jnp.asarray(labels)[indices].astype(jnp.int32),
        "index": indices,
    }


def _augment(images: jax.Array, key: jax.Array, crop_padding: int, flip: bool) -> jax.Array:
    if crop_padding == 0 and not flip:
        return images
    keys = jax.random.split(key, images.shape[0])
    one = functools.partial(_augment_one, crop_padding=crop_padding, flip=flip)
    return jax.vmap(one)(images, keys)


def _augment_one(image: jax.Array, key: jax.Array, *, crop_padding: int, flip: bool) -> jax.Array:
    crop_key, flip_key = jax.random.split(key)
    if crop_padding:
        p = crop_padding
        padded = jnp.pad(image, ((p, p), (p, p), (0, 0)))
        # Offsets 0..2p inclusive: every window that fits in the padded image.
        top, left = jax.random.randint(crop_key, (2,), 0, 2 * p + 1)
        image = lax.dynamic_slice(padded, (top, left, 0), image.shape)
    if flip:
        image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
    return image


def _check_positive(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{what} must be a positive int; got {value!r}.")


def _check_crop_padding(crop_padding: int) -> None:
    if (
        isinstance(crop_padding, bool)
        or not isinstance(crop_padding, int | np.integer)
        or crop_padding < 0
    ):
        raise ValueError(f"crop_padding must be a non-negative int; got {crop_padding!r}.")


def make_batch_fn(
    mesh: Mesh,
    key: jax.Array,
    *,
    augment: bool,
    crop_padding: int = 4,
    flip: bool = True,
) -> Callable[[jax.Array, jax.Array, Any, Any], dict]:
    """Jitted ``batch_fn(images_u8, labels, indices, step) -> batch`` on the devices.

    Gathers the rows ``indices`` of the device-resident uint8 dataset, scales to
    [0, 1] and augments with a key ``fold_in(key, step)``, so the data never
    leaves the accelerators and augmentation is reproducible from the step.
    """
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)

    def batch_fn(images, labels, indices, step):
        return make_batch(
            images,
            labels,
            indices,
            jax.random.fold_in(key, step),
            augment=augment,
            crop_padding=crop_padding,
            flip=flip,
        )

    rep, split = replicated(mesh), batch_sharded(mesh)
    return jax.jit(batch_fn, in_shardings=(rep, rep, split, rep), out_shardings=split)
