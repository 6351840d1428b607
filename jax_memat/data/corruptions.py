"""Label noise and input corruptions of the random-label study (Zhang et al., 2017).

All functions are pure numpy: they return new arrays and are deterministic
in their ``seed``. Each kind of randomness uses its own stream drawn from the
seed, so label noise and image corruption made from the same seed are
independent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jax_memat.data import _random
from jax_memat.data.dataset import Dataset

IMAGE_CORRUPTIONS = ("none", "shuffled_pixels", "random_pixels", "gaussian")
# Images are corrupted this many at a time, to bound the temporary memory
# (float noise for CIFAR-10 at once would take ~1 GB). The results depend on
# this constant: changing it changes the corrupted images of a given seed.
_CHUNK = 4096


def label_noise_problem(rate: object) -> str:
    """What is wrong with a label-noise rate (``""`` when nothing): a number in [0, 1].

    The one rule, used by ``corrupt_labels`` and config validation.
    """
    if isinstance(rate, bool) or not isinstance(rate, int | float | np.floating | np.integer):
        return f"label noise rate must be a number in [0, 1], got {rate!r}"
    if not 0.0 <= rate <= 1.0:  # also rejects NaN
        return f"label noise rate must be a number in [0, 1], got {rate!r}"
    return ""


def corrupt_labels(labels: np.ndarray, num_classes: int, rate: float, seed: int) -> np.ndarray:
    """Symmetric label noise, as in the authors' code.

    Each label is, independently with probability ``rate``, replaced by a
    class drawn uniformly from all ``num_classes`` classes, which may be its
    own class: the expected fraction of labels that actually change is
    ``rate * (1 - 1 / num_classes)``, and ``rate=1`` gives completely random
    labels. With a fixed seed the noise is nested across rates: the labels
    redrawn at a lower rate are redrawn, to the same values, at a higher one.

    Args:
      labels: integer array [N] of clean labels in [0, num_classes).
      num_classes: number of classes K.
      rate: probability of redrawing a label, in [0, 1].
      seed: non-negative int.

    Returns:
      A new int32 array [N] of noisy labels.

    Raises:
      ValueError: ``rate`` outside [0, 1], or invalid labels/num_classes/seed.

    Example:
      >>> import numpy as np
      >>> clean = np.zeros(10_000, np.int32)
      >>> noisy = corrupt_labels(clean, num_classes=10, rate=0.5, seed=0)
      >>> bool(abs(np.mean(noisy != clean) - 0.5 * (1 - 1 / 10)) < 0.02)
      True
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D integer array; got dtype {labels.dtype}, shape {labels.shape}."
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise ValueError(f"num_classes must be an int; got {num_classes!r}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive; got {num_classes}.")
    problem = label_noise_problem(rate)
    if problem:
        raise ValueError(problem)
    rng = _random.generator(seed, "label_noise")
    # Draw for every example (not only the redrawn ones) so that the noise is
    # nested across rates; `<` so that rate 0 never redraws (random() can be 0).
    redraw = rng.random(labels.shape[0]) < rate
    new_labels = rng.integers(0, num_classes, size=labels.shape[0])
    return np.where(redraw, new_labels, labels).astype(np.int32)


def corrupt_images(
    images: np.ndarray,
    kind: str,
    seed: int,
    *,
    mean: float | Sequence[float] | np.ndarray | None = None,
    std: float | Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Input corruptions of Zhang et al. (2017).

    - ``"none"``: an unchanged copy.
    - ``"shuffled_pixels"``: one random permutation of the H*W pixel positions
      (the channels of a pixel move together), the same for every image.
    - ``"random_pixels"``: an independent permutation of pixel positions per image.
    - ``"gaussian"``: every pixel drawn i.i.d. from a Gaussian with the
      per-channel mean and standard deviation of the dataset, then rounded and
      clipped to [0, 255]; clipping makes the result's statistics differ from
      the requested ones when the mean is within a few deviations of 0 or 255.

    Args:
      images: uint8 array [N, H, W, C].
      kind: one of ``IMAGE_CORRUPTIONS``.
      seed: non-negative int.
      mean: ``gaussian`` only: per-channel mean in pixel units [0, 255], a
        scalar or [C]; computed from ``images`` when None.
      std: ``gaussian`` only: per-channel standard deviation in pixel units, a
        scalar or [C]; computed from ``images`` when None.

    Returns:
      A new uint8 array of the shape of ``images``.

    Raises:
      ValueError: unknown ``kind`` (the message lists the accepted ones), or
        invalid images, mean or std.

    Example:
      >>> import numpy as np
      >>> images = np.arange(2 * 2 * 2 * 1, dtype=np.uint8).reshape(2, 2, 2, 1)
      >>> out = corrupt_images(images, "shuffled_pixels", seed=0)
      >>> out.shape, sorted(out[0].ravel().tolist()) == [0, 1, 2, 3]
      ((2, 2, 2, 1), True)
    """
    _check_image_corruption(kind)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError("images must be a uint8 numpy array [N, H, W, C].")
    if kind != "gaussian" and (mean is not None or std is not None):
        raise ValueError(f"mean and std apply only to the 'gaussian' corruption, not {kind!r}.")
    rng = _random.generator(seed, f"image_corruption.{kind}")
    n, height, width, channels = images.shape
    pixels = images.reshape(n, height * width, channels)

    if kind == "none":
        return images.copy()
    if kind == "shuffled_pixels":
        permutation = rng.permutation(height * width)
        return pixels[:, permutation].reshape(images.shape)
    out = np.empty_like(pixels)
    if kind == "random_pixels":
        for start in range(0, n, _CHUNK):
            chunk = pixels[start : start + _CHUNK]
            rows, positions = chunk.shape[:2]
            permutations = rng.permuted(
                np.broadcast_to(np.arange(positions, dtype=np.int32), (rows, positions)), axis=1
            )
            # One flat gather (twice as fast as np.take_along_axis here).
            flat = (permutations + positions * np.arange(rows)[:, None]).ravel()
            out[start : start + rows] = chunk.reshape(-1, channels)[flat].reshape(chunk.shape)
        return out.reshape(images.shape)

    # gaussian
    if mean is None or std is None:
        data_mean, data_std = _channel_mean_std(images)
        mean = data_mean if mean is None else mean
        std = data_std if std is None else std
    mean = _per_channel(mean, channels, "mean")
    std = _per_channel(std, channels, "std")
    if np.any(std < 0):
        raise ValueError(f"std must be non-negative; got {std}.")
    for start in range(0, n, _CHUNK):
        size = (min(_CHUNK, n - start), height * width, channels)
        values = rng.standard_normal(size, dtype=np.float32)
        values *= std
        values += mean
        out[start : start + _CHUNK] = np.clip(np.rint(values, out=values), 0, 255, out=values)
    return out.reshape(images.shape)


def apply_corruptions(
    dataset: Dataset, *, label_noise: float, image_corruption: str, seed: int
) -> tuple[Dataset, dict[str, np.ndarray]]:
    """Applies label noise and an image corruption to a (training) dataset.

    The record returned holds the labels to save with the run. It does not
    hold the images: they are regenerated exactly from ``seed`` (and the clean
    dataset) by calling this function again.

    Args:
      dataset: the clean dataset.
      label_noise: symmetric label noise rate in [0, 1] (see ``corrupt_labels``).
      image_corruption: one of ``IMAGE_CORRUPTIONS`` (see ``corrupt_images``).
      seed: non-negative int.

    Returns:
      ``(corrupted, record)``: the corrupted dataset (sharing the images array
      of ``dataset`` when ``image_corruption == "none"``) and a dict of numpy
      arrays ``{"labels": int32 [N] noisy labels, "clean_labels": int32 [N],
      "changed": bool [N] where the label differs}``.

    Raises:
      ValueError: invalid rate, corruption name or seed.

    Example:
      >>> from jax_memat.data import load_dataset
      >>> clean = load_dataset("synthetic", "train")
      >>> noisy, record = apply_corruptions(clean, label_noise=1.0, image_corruption="none",
      ...                                   seed=0)
      >>> bool(0.8 < record["changed"].mean() < 1.0)  # about 1 - 1/10
      True
    """
    _check_image_corruption(image_corruption)
    labels = corrupt_labels(dataset.labels, dataset.num_classes, label_noise, seed)
    if image_corruption == "none":
        images = dataset.images
    else:
        images = corrupt_images(dataset.images, image_corruption, seed)
    record = {
        "labels": labels,
        "clean_labels": dataset.labels.copy(),
        "changed": labels != dataset.labels,
    }
    return dataclasses.replace(dataset, images=images, labels=labels), record


def _check_image_corruption(kind: str) -> None:
    if kind not in IMAGE_CORRUPTIONS:
        raise ValueError(
            f"Unknown image corruption {kind!r}; accepted: "
            + ", ".join(repr(k) for k in IMAGE_CORRUPTIONS)
            + "."
        )


def _channel_mean_std(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean and std of uint8 images, from 256-bin histograms."""
    values = np.arange(256, dtype=np.float64)
    means, stds = [], []
    for c in range(images.shape[-1]):
        counts = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
        total = counts.sum()
        mean = (counts @ values) / total
        means.append(mean)
        stds.append(np.sqrt((counts @ (values - mean) ** 2) / total))
    return np.array(means), np.array(stds)


def _per_channel(value: object, channels: int, what: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim > 1 or (array.ndim == 1 and array.shape[0] not in (1, channels)):
        raise ValueError(f"{what} must be a scalar or have one value per channel ({channels}).")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} must be finite; got {array}.")
    return np.broadcast_to(array, (channels,)).astype(np.float32)
