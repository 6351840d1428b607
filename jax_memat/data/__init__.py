"""Datasets, corruptions and on-device batches with example indices.

- ``load_dataset`` reads a split into a ``Dataset`` of uint8 images and int32
  labels, with a description of where it was read (``Dataset.source``): from
  the official files (CIFAR-10/100's binary version, SVHN's .mat files, MNIST
  and Fashion-MNIST's IDX files; no TensorFlow needed), through
  tensorflow-datasets (the ``tfds`` extra), or a generated ``synthetic``
  dataset. Row ``i`` is the example with index ``i``. See docs/datasets.md.
- ``apply_corruptions`` adds symmetric label noise and an image corruption of
  the random-label study, and returns the record of labels to save.
- ``train_batch_indices`` / ``eval_batches`` plan the batches of an epoch on the
  host; ``make_batch`` gathers, scales and augments them on device.

Example:
  >>> import functools, jax
  >>> from jax_memat import data
  >>> train = data.load_dataset("synthetic", "train", seed=0)
  >>> train, record = data.apply_corruptions(train, label_noise=0.2,
  ...                                        image_corruption="none", seed=0)
  >>> plan = data.train_batch_indices(train.num_examples, 128, seed=0, epoch=0)
  >>> get_batch = jax.jit(functools.partial(data.make_batch, augment=True, crop_padding=1))
  >>> batch = get_batch(train.images, train.labels, plan[0], jax.random.key(0))
  >>> batch["image"].shape, plan.shape
  ((128, 8, 8, 1), (4, 128))
"""

from jax_memat.data.cifar import read_cifar_binary
from jax_memat.data.corruptions import (
    IMAGE_CORRUPTIONS,
    apply_corruptions,
    corrupt_images,
    corrupt_labels,
    label_noise_problem,
)
from jax_memat.data.dataset import Dataset, DatasetNotFoundError
from jax_memat.data.idx import read_idx
from jax_memat.data.pipeline import (
    augment,
    epoch_permutation,
    eval_batches,
    make_batch,
    make_batch_fn,
    steps_per_epoch,
    train_batch_indices,
)
from jax_memat.data.sources import (
    DATA_DIR_ENV,
    DATASET_NAMES,
    SOURCES,
    SPLIT_SIZES,
    SPLITS,
    TFDS_INSTALL,
    dataset_spec,
    load_dataset,
    validate_dataset_name,
)
from jax_memat.data.svhn import read_svhn_mat
from jax_memat.data.synthetic import make_synthetic

__all__ = [
    "DATASET_NAMES",
    "DATA_DIR_ENV",
    "IMAGE_CORRUPTIONS",
    "SOURCES",
    "SPLIT_SIZES",
    "SPLITS",
    "TFDS_INSTALL",
    "Dataset",
    "DatasetNotFoundError",
    "apply_corruptions",
    "augment",
    "corrupt_images",
    "corrupt_labels",
    "label_noise_problem",
    "dataset_spec",
    "epoch_permutation",
    "eval_batches",
    "load_dataset",
    "make_batch",
    "make_batch_fn",
    "make_synthetic",
    "read_cifar_binary",
    "read_idx",
    "read_svhn_mat",
    "steps_per_epoch",
    "train_batch_indices",
    "validate_dataset_name",
]
