"""Loading datasets from tfds, from local IDX files, or generating them.

TensorFlow and tensorflow_datasets are imported only inside ``_load_tfds``:
the library runs without them for the IDX files and the synthetic dataset,
and TensorFlow is kept off the accelerators when it is imported.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from jax_memat.data import _random
from jax_memat.data.dataset import Dataset, DatasetNotFoundError
from jax_memat.data.idx import read_idx
from jax_memat.data.synthetic import make_synthetic

DATASET_NAMES = ("cifar10", "cifar100", "svhn", "mnist", "fashion_mnist", "synthetic")
SPLITS = ("train", "test")
SOURCES = ("auto", "tfds", "idx")
# Environment variable naming a folder with IDX files (or with one sub-folder per dataset).
DATA_DIR_ENV = "JAX_MEMAT_DATA_DIR"

_SYNTHETIC_IMAGE_SHAPE = (8, 8, 1)
_SYNTHETIC_NUM_CLASSES = 10
_SYNTHETIC_SIZES = {"train": 512, "test": 256}
# tfds is read in chunks: `batch_size=-1` asks TensorFlow for one batch as large
# as the dataset's recorded size, which is unknown (sys.maxsize) under
# `tfds.testing.mock_data` and aborts the process in recent TensorFlow.
_TFDS_CHUNK = 8192
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclasses.dataclass(frozen=True)
class _Source:
    """What is known about a dataset before loading it."""

    image_shape: tuple[int, int, int]
    num_classes: int
    tfds_name: str | None = None
    # IDX datasets: sub-folder names tried under data_dir / $JAX_MEMAT_DATA_DIR,
    # system folders tried last, and where to get the files.
    idx_subdirs: tuple[str, ...] = ()
    idx_system_dirs: tuple[str, ...] = ()
    idx_help: str = ""


_SOURCES = {
    "cifar10": _Source((32, 32, 3), 10, tfds_name="cifar10"),
    "cifar100": _Source((32, 32, 3), 100, tfds_name="cifar100"),
    "svhn": _Source((32, 32, 3), 10, tfds_name="svhn_cropped"),
    "mnist": _Source(
        (28, 28, 1),
        10,
        tfds_name="mnist",
        idx_subdirs=("mnist",),
        idx_system_dirs=("/usr/share/datasets/mnist",),
        idx_help="download them from https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion_mnist": _Source(
        (28, 28, 1),
        10,
        tfds_name="fashion_mnist",
        idx_subdirs=("fashion_mnist", "fashion-mnist"),
        # Never /usr/share/datasets/mnist: the file names are the same as MNIST's.
        idx_system_dirs=("/usr/share/datasets/fashion-mnist",),
        idx_help=(
            "install the Debian package dataset-fashion-mnist (files in "
            "/usr/share/datasets/fashion-mnist) or download them from "
            "https://github.com/zalandoresearch/fashion-mnist"
        ),
    ),
    "synthetic": _Source(_SYNTHETIC_IMAGE_SHAPE, _SYNTHETIC_NUM_CLASSES),
}


def validate_dataset_name(name: str) -> str:
    """Checks that ``name`` is one of ``DATASET_NAMES`` (for config validation).

    Args:
      name: a dataset name.

    Returns:
      ``name`` unchanged.

    Raises:
      ValueError: unknown name; the message lists the accepted ones.

    Example:
      >>> validate_dataset_name("cifar10")
      'cifar10'
    """
    return _check_choice("dataset name", name, DATASET_NAMES)


def dataset_spec(
    name: str,
    *,
    image_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> tuple[tuple[int, int, int], int]:
    """The image shape and number of classes of a dataset, without loading it.

    Useful to build a model (or validate a config) before any data is read.

    Args:
      name: one of ``DATASET_NAMES``.
      image_shape: ``synthetic`` only: (H, W, C), default (8, 8, 1).
      num_classes: ``synthetic`` only: number of classes, default 10.

    Returns:
      ``((H, W, C), num_classes)``.

    Raises:
      ValueError: unknown name, or ``image_shape``/``num_classes`` given for a
        dataset other than ``synthetic``, or invalid.

    Example:
      >>> dataset_spec("cifar100")
      ((32, 32, 3), 100)
      >>> dataset_spec("synthetic", image_shape=(4, 4, 3), num_classes=2)
      ((4, 4, 3), 2)
    """
    validate_dataset_name(name)
    source = _SOURCES[name]
    if name != "synthetic":
        if image_shape is not None or num_classes is not None:
            raise ValueError(
                f"image_shape and num_classes can be chosen only for the 'synthetic' dataset; "
                f"{name!r} has image shape {source.image_shape} and {source.num_classes} classes."
            )
        return source.image_shape, source.num_classes
    shape = tuple(source.image_shape if image_shape is None else image_shape)
    if len(shape) != 3 or not all(
        isinstance(d, int | np.integer) and not isinstance(d, bool) and d >= 1 for d in shape
    ):
        raise ValueError(f"image_shape must be three positive ints (H, W, C); got {image_shape!r}.")
    classes = source.num_classes if num_classes is None else num_classes
    if isinstance(classes, bool) or not isinstance(classes, int | np.integer) or classes < 2:
        raise ValueError(f"num_classes must be an int >= 2; got {num_classes!r}.")
    return (int(shape[0]), int(shape[1]), int(shape[2])), int(classes)


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    source: str = "auto",
    num_examples: int | None = None,
    seed: int = 0,
    image_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> Dataset:
    """Loads one split of a dataset into host memory.

    Sources by name:

    - ``cifar10``, ``cifar100``, ``svhn``: tfds (``cifar10``, ``cifar100``,
      ``svhn_cropped``), read from ``data_dir`` (tfds' default,
      ``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``, when None); tfds
      downloads the data there when it is missing and the network allows.
    - ``mnist``, ``fashion_mnist``: with ``source="idx"`` the original IDX files
      (``train-images-idx3-ubyte[.gz]`` etc.) from the first folder that has
      them among ``data_dir``, ``$JAX_MEMAT_DATA_DIR`` (for each of these two:
      first its sub-folder named after the dataset, ``mnist`` or
      ``fashion_mnist``/``fashion-mnist``, then the folder itself), then
      ``/usr/share/datasets/fashion-mnist`` (Fashion-MNIST) or
      ``/usr/share/datasets/mnist`` (MNIST); ``source="tfds"`` uses tfds;
      ``source="auto"`` tries the IDX files first, then tfds.
    - ``synthetic``: generated from ``seed`` by ``make_synthetic``: class
      templates shared by both splits plus per-split noise; 512 training and
      256 test examples unless ``num_examples`` says otherwise.

    Row ``i`` of the result is the example with index ``i``; the order is the
    source's own and never depends on ``seed``.

    Args:
      name: one of ``DATASET_NAMES``.
      split: ``"train"`` or ``"test"``.
      data_dir: folder to read from (see above); passed to tfds as its data_dir.
      source: ``"auto"``, ``"tfds"`` or ``"idx"`` (``"idx"`` only for MNIST and
        Fashion-MNIST; ``synthetic`` accepts only ``"auto"``).
      num_examples: keep only the first ``num_examples`` examples (the number
        to generate for ``synthetic``); None keeps all.
      seed: non-negative int; used only by ``synthetic``.
      image_shape: ``synthetic`` only: (H, W, C), default (8, 8, 1).
      num_classes: ``synthetic`` only: number of classes, default 10.

    Returns:
      A ``Dataset`` with uint8 images [N, H, W, C] (MNIST-like: [N, 28, 28, 1])
      and int32 labels [N].

    Raises:
      ValueError: unknown name, split or source, or another invalid argument
        (checked before any file is read or TensorFlow imported), or
        ``num_examples`` larger than the split.
      DatasetNotFoundError: the data is not where it was looked for; the message
        says where it looked and how to get the data.
      ImportError: a tfds source was asked for but tensorflow_datasets is not
        installed.

    Example:
      >>> ds = load_dataset("synthetic", "train", num_examples=32, seed=0)
      >>> ds.images.shape, ds.labels.shape, ds.num_classes
      ((32, 8, 8, 1), (32,), 10)
    """
    validate_dataset_name(name)
    _check_choice("split", split, SPLITS)
    _check_choice("source", source, SOURCES)
    if num_examples is not None and (
        isinstance(num_examples, bool)
        or not isinstance(num_examples, int | np.integer)
        or num_examples < 1
    ):
        raise ValueError(f"num_examples must be None or a positive int; got {num_examples!r}.")
    seed = _random.check_seed(seed)
    shape, classes = dataset_spec(name, image_shape=image_shape, num_classes=num_classes)
    spec = _SOURCES[name]

    if name == "synthetic":
        if source != "auto":
            raise ValueError(
                f"The synthetic dataset is generated, not read: source must be 'auto'; "
                f"got {source!r}."
            )
        n = _SYNTHETIC_SIZES[split] if num_examples is None else int(num_examples)
        return make_synthetic(
            split, num_examples=n, image_shape=shape, num_classes=classes, seed=seed
        )
    if source == "idx" and not spec.idx_subdirs:
        raise ValueError(
            f"source='idx' exists only for mnist and fashion_mnist; {name!r} accepts "
            "'auto' or 'tfds'."
        )

    if source == "tfds" or not spec.idx_subdirs:
        images, labels = _load_tfds(spec.tfds_name, split, data_dir, num_examples)
    elif source == "idx":
        images, labels = _load_idx(name, split, data_dir)
    else:  # auto: local IDX files first, then tfds.
        try:
            images, labels = _load_idx(name, split, data_dir)
        except DatasetNotFoundError as idx_error:
            try:
                images, labels = _load_tfds(spec.tfds_name, split, data_dir, num_examples)
            except (DatasetNotFoundError, ImportError) as tfds_error:
                raise DatasetNotFoundError(
                    f"{name} ({split}) found neither as IDX files nor through tfds.\n"
                    f"IDX: {idx_error}\ntfds: {tfds_error}"
                ) from None

    if images.ndim == 3:
        images = images[..., None]
    if images.shape[1:] != shape:
        raise ValueError(f"{name} ({split}): images of shape {images.shape[1:]}, expected {shape}.")
    if num_examples is not None:
        if num_examples > images.shape[0]:
            raise ValueError(
                f"num_examples={num_examples} but the {split} split of {name} has only "
                f"{images.shape[0]} examples."
            )
        # Copies, so that the full split's arrays can be freed.
        images, labels = images[:num_examples].copy(), labels[:num_examples].copy()
    return Dataset(
        np.ascontiguousarray(images, dtype=np.uint8),
        np.asarray(labels, dtype=np.int32),
        classes,
        name,
    )


def _check_choice(what: str, value: str, accepted: Sequence[str]) -> str:
    if value not in accepted:
        raise ValueError(
            f"Unknown {what} {value!r}; accepted: {', '.join(repr(a) for a in accepted)}."
        )
    return value


def _idx_dirs(name: str, data_dir: str | None) -> list[str]:
    """Folders searched for the IDX files of ``name``, in order."""
    spec = _SOURCES[name]
    dirs = []
    for root in (data_dir, os.environ.get(DATA_DIR_ENV)):
        if root:
            dirs.extend(os.path.join(root, sub) for sub in spec.idx_subdirs)
            dirs.append(root)
    dirs.extend(spec.idx_system_dirs)
    return dirs


def _find_file(folder: str, stem: str) -> str | None:
    for path in (os.path.join(folder, stem + ".gz"), os.path.join(folder, stem)):
        if os.path.isfile(path):
            return path
    return None


def _load_idx(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    image_stem, label_stem = _IDX_FILES[split]
    dirs = _idx_dirs(name, data_dir)
    for folder in dirs:
        image_path = _find_file(folder, image_stem)
        label_path = _find_file(folder, label_stem)
        if image_path and label_path:
            images, labels = read_idx(image_path), read_idx(label_path)
            if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"{image_path} and {label_path} do not hold [N, H, W] images and [N] "
                    f"labels: shapes {images.shape} and {labels.shape}."
                )
            return images, labels
    raise DatasetNotFoundError(
        f"IDX files {image_stem}[.gz] and {label_stem}[.gz] of {name} ({split}) were not found "
        f"in any of: {', '.join(dirs)}. To get them, {_SOURCES[name].idx_help}; put them in a "
        f"folder and pass data_dir=<folder> or set ${DATA_DIR_ENV}=<folder>, or use "
        "source='tfds'."
    )


def _load_tfds(
    tfds_name: str, split: str, data_dir: str | None, num_examples: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Reads the first ``num_examples`` (all if None) of a tfds split, in file order."""
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            f"Loading {tfds_name!r} through tfds needs tensorflow and tensorflow-datasets "
            f"(pip install tensorflow-cpu tensorflow-datasets): {err}"
        ) from err
    # TensorFlow only reads files here; JAX owns the accelerators' memory.
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialized its devices; nothing to change.
        pass

    try:
        ds = tfds.load(
            tfds_name,
            split=split,
            data_dir=data_dir,
            batch_size=_TFDS_CHUNK,
            as_supervised=True,
            shuffle_files=False,
        )
    except Exception as err:  # Any failure to open the data means it is not available here.
        where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        message = f"{type(err).__name__}: {err}"
        if len(message) > 500:
            message = message[:500] + " ..."
        # `from None`: the cause is summarized above, tfds' deep traceback adds nothing.
        raise DatasetNotFoundError(
            f"tfds dataset {tfds_name!r} (split {split!r}) could not be loaded from {where} "
            f"({message}). To get it, on a machine with network run `tfds build {tfds_name} "
            f"--data_dir=<dir>` (or load it once with network access), copy <dir>/{tfds_name} "
            f"to {where} or pass data_dir=<dir>."
        ) from None

    image_chunks, label_chunks, count = [], [], 0
    for images, labels in tfds.as_numpy(ds):
        image_chunks.append(images)
        label_chunks.append(labels)
        count += len(labels)
        if num_examples is not None and count >= num_examples:
            break
    return np.concatenate(image_chunks), np.concatenate(label_chunks)
