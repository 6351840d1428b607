"""The in-memory dataset container shared by every data source."""

from __future__ import annotations

import dataclasses

import numpy as np


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they were looked for.

    The message says what was looked for, where, and how to get the files.
    """


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A whole split of an image-classification dataset, held in host memory.

    The paper's datasets are small enough to live on the accelerators as uint8
    arrays (see ``pipeline.py``), so a split is simply two arrays. The index of
    an example is its row number: the training loop passes these row numbers
    along with each batch (``make_batch(...)["index"]``), and per-example
    records (temporal-ensembling soft labels, memorization statistics, label
    noise records) are indexed by them. Row order is fixed by the source and
    never depends on a seed.

    ``eq=False``: comparing two datasets with ``==`` is identity, as comparing
    numpy arrays element-wise has no single truth value.

    Attributes:
      images: uint8 array [N, H, W, C].
      labels: int32 array [N], values in [0, num_classes).
      num_classes: number of classes K.
      name: the dataset's name, e.g. ``"cifar10"``.
      source: where the examples were read from, for logs and reports, e.g.
        ``"cifar10 test: 10000 examples from data/cifar10/cifar-10-batches-bin
        (CIFAR-10 binary version, rows in file order)"``; empty when unknown.

    Example:
      >>> import numpy as np
      >>> ds = Dataset(np.zeros((4, 8, 8, 1), np.uint8), np.arange(4, dtype=np.int32), 10, "toy")
      >>> ds.num_examples, ds.image_shape, ds.source
      (4, (8, 8, 1), '')
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    source: str = ""

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                "Dataset.images must be a uint8 numpy array of shape [N, H, W, C]; got "
                f"{_describe(images)}."
            )
        if not isinstance(labels, np.ndarray) or labels.dtype != np.int32 or labels.ndim != 1:
            raise ValueError(
                "Dataset.labels must be an int32 numpy array of shape [N]; got "
                f"{_describe(labels)}."
            )
        if labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"Dataset has {images.shape[0]} images but {labels.shape[0]} labels; "
                "they must match."
            )
        if (
            not isinstance(self.num_classes, int | np.integer)
            or isinstance(self.num_classes, bool)
            or self.num_classes < 1
        ):
            raise ValueError(
                f"Dataset.num_classes must be a positive int; got {self.num_classes!r}."
            )
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"Dataset labels must lie in [0, {self.num_classes}); got values in "
                f"[{labels.min()}, {labels.max()}]."
            )
        if not isinstance(self.name, str):
            raise ValueError(f"Dataset.name must be a str; got {self.name!r}.")
        if not isinstance(self.source, str):
            raise ValueError(f"Dataset.source must be a str; got {self.source!r}.")

    @property
    def num_examples(self) -> int:
        """The number of examples N."""
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The shape (H, W, C) of one image."""
        height, width, channels = self.images.shape[1:]
        return int(height), int(width), int(channels)


def _describe(x: object) -> str:
    if isinstance(x, np.ndarray):
        return f"numpy array of dtype {x.dtype} and shape {x.shape}"
    return f"object of type {type(x).__name__}"
