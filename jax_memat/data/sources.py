"""Loading datasets from their official files, from tfds, or generating them.

TensorFlow and tensorflow_datasets are imported only inside ``_load_tfds``:
the library runs without them (``pip install jax_memat`` without the ``tfds``
extra) for the official files and the synthetic dataset, and TensorFlow is
kept off the accelerators when it is imported.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from absl import logging

from jax_memat.data import _random, cifar, svhn
from jax_memat.data.dataset import Dataset, DatasetNotFoundError
from jax_memat.data.idx import read_idx
from jax_memat.data.synthetic import make_synthetic

DATASET_NAMES = ("cifar10", "cifar100", "svhn", "mnist", "fashion_mnist", "synthetic")
SPLITS = ("train", "test")
# "files": the official distribution files (CIFAR binary version, SVHN .mat,
# MNIST-like IDX); "idx" is its former name, kept for MNIST and Fashion-MNIST.
SOURCES = ("auto", "files", "tfds", "idx")
# Environment variable naming a folder with the official files (or with one
# sub-folder per dataset).
DATA_DIR_ENV = "JAX_MEMAT_DATA_DIR"
# What to install for the tfds sources (the `tfds` extra of pyproject.toml).
TFDS_INSTALL = "pip install 'jax_memat[tfds]'"

_SYNTHETIC_IMAGE_SHAPE = (8, 8, 1)
_SYNTHETIC_NUM_CLASSES = 10
_SYNTHETIC_SIZES = {"train": 512, "test": 256}
# Examples per split (synthetic: its default size), known before anything is read,
# so that a config asking for more, or a run too large for memory, is refused first.
SPLIT_SIZES = {
    "cifar10": {"train": 50_000, "test": 10_000},
    "cifar100": {"train": 50_000, "test": 10_000},
    "svhn": {"train": 73_257, "test": 26_032},
    "mnist": {"train": 60_000, "test": 10_000},
    "fashion_mnist": {"train": 60_000, "test": 10_000},
    "synthetic": _SYNTHETIC_SIZES,
}
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
    # Official files: their format ("idx", "cifar", "svhn"; "" for none), the
    # sub-folder names tried under data_dir / $JAX_MEMAT_DATA_DIR, system
    # folders tried last, and where to get the files.
    file_format: str = ""
    subdirs: tuple[str, ...] = ()
    system_dirs: tuple[str, ...] = ()
    files_help: str = ""


_SOURCES = {
    "cifar10": _Source(
        (32, 32, 3),
        10,
        tfds_name="cifar10",
        file_format="cifar",
        subdirs=("cifar10", "cifar-10"),
        files_help=f"download the binary version, {cifar.LAYOUTS['cifar10'].url}",
    ),
    "cifar100": _Source(
        (32, 32, 3),
        100,
        tfds_name="cifar100",
        file_format="cifar",
        subdirs=("cifar100", "cifar-100"),
        files_help=f"download the binary version, {cifar.LAYOUTS['cifar100'].url}",
    ),
    "svhn": _Source(
        (32, 32, 3),
        10,
        tfds_name="svhn_cropped",
        file_format="svhn",
        subdirs=("svhn", "svhn_cropped"),
        files_help=(
            f"download {svhn.URL}train_32x32.mat and {svhn.URL}test_32x32.mat "
            "(the cropped digits, format 2)"
        ),
    ),
    "mnist": _Source(
        (28, 28, 1),
        10,
        tfds_name="mnist",
        file_format="idx",
        subdirs=("mnist",),
        system_dirs=("/usr/share/datasets/mnist",),
        files_help="download them from https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion_mnist": _Source(
        (28, 28, 1),
        10,
        tfds_name="fashion_mnist",
        file_format="idx",
        subdirs=("fashion_mnist", "fashion-mnist"),
        # Never /usr/share/datasets/mnist: the file names are the same as MNIST's.
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        files_help=(
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
    data_dir: str | os.PathLike[str] | None = None,
    source: str = "auto",
    num_examples: int | None = None,
    seed: int = 0,
    image_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> Dataset:
    """Loads one split of a dataset into host memory.

    Sources (``source``):

    - ``"files"``: the official distribution files, read without TensorFlow:
      CIFAR-10/100's binary version (``cifar-10-binary.tar.gz`` /
      ``cifar-100-binary.tar.gz``, or the extracted ``cifar-10-batches-bin/`` /
      ``cifar-100-binary/``), SVHN's ``train_32x32.mat`` / ``test_32x32.mat``,
      MNIST-like IDX files (``train-images-idx3-ubyte[.gz]`` etc.). They are
      looked for in ``data_dir`` if given (its sub-folder named after the
      dataset, e.g. ``cifar10/``, then the folder itself), and nowhere else;
      otherwise in ``$JAX_MEMAT_DATA_DIR`` (the same way), then, for
      Fashion-MNIST and MNIST, in ``/usr/share/datasets/fashion-mnist`` or
      ``/usr/share/datasets/mnist``. The python (pickle) version of CIFAR is
      refused. ``"idx"`` is the former name of ``"files"``, for MNIST and
      Fashion-MNIST only.
    - ``"tfds"``: tensorflow-datasets (``cifar10``, ``cifar100``,
      ``svhn_cropped``, ``mnist``, ``fashion_mnist``) in ``data_dir`` (tfds'
      default, ``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``, when None); tfds
      downloads and prepares the data there when it is missing and the network
      allows. Needs the ``tfds`` extra (``pip install 'jax_memat[tfds]'``).
    - ``"auto"``: the official files first, then tfds.
    - ``synthetic`` is generated from ``seed`` by ``make_synthetic`` (class
      templates shared by both splits plus per-split noise; 512 training and
      256 test examples unless ``num_examples`` says otherwise) and accepts
      only ``"auto"``.

    Row ``i`` of the result is the example with index ``i``; the order is the
    source's own and never depends on ``seed``. From the official files it is
    the files' order (CIFAR-10's training set: ``data_batch_1.bin`` to
    ``data_batch_5.bin``); tfds stores examples in another fixed order (a
    permutation of the files' order by hashed example key), so the two sources
    give the same examples in different rows. ``Dataset.source`` says which
    was read, and it is logged.

    Args:
      name: one of ``DATASET_NAMES``.
      split: ``"train"`` or ``"test"``.
      data_dir: folder to read from (see above); passed to tfds as its data_dir.
        It must exist; None or ``""`` for the default locations.
      source: one of ``SOURCES``: ``"auto"``, ``"files"``, ``"tfds"``, ``"idx"``.
      num_examples: keep only the first ``num_examples`` examples (the number
        to generate for ``synthetic``); None keeps all.
      seed: non-negative int; used only by ``synthetic``.
      image_shape: ``synthetic`` only: (H, W, C), default (8, 8, 1).
      num_classes: ``synthetic`` only: number of classes, default 10.

    Returns:
      A ``Dataset`` with uint8 images [N, H, W, C] (CIFAR, SVHN: [N, 32, 32, 3],
      RGB; MNIST-like: [N, 28, 28, 1]), int32 labels [N] (SVHN: the digit, 0
      for the files' label 10) and ``source`` describing where it was read.

    Raises:
      ValueError: unknown name, split or source, or another invalid argument
        (checked before any file is read or TensorFlow imported);
        ``num_examples`` larger than the split; a local file that is truncated
        or malformed (the message names it), or CIFAR's pickle version.
      DatasetNotFoundError: ``data_dir`` or ``$JAX_MEMAT_DATA_DIR`` does not
        exist, or the data is not where it was looked for; the message says
        what was looked for, where, and how to get the data.
      ImportError: a tfds source was asked for but the ``tfds`` extra is not
        installed; the message says what to install.

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
    if data_dir is not None and not isinstance(data_dir, str | os.PathLike):
        raise ValueError(f"data_dir must be None or a path; got {data_dir!r}.")
    data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir else None

    if name == "synthetic":
        if source != "auto":
            raise ValueError(
                f"The synthetic dataset is generated, not read: source must be 'auto'; "
                f"got {source!r}."
            )
        n = _SYNTHETIC_SIZES[split] if num_examples is None else int(num_examples)
        dataset = make_synthetic(
            split, num_examples=n, image_shape=shape, num_classes=classes, seed=seed
        )
        logging.info("Dataset: %s", dataset.source)
        return dataset
    if source == "idx" and spec.file_format != "idx":
        raise ValueError(
            f"source='idx' exists only for mnist and fashion_mnist; {name!r} accepts "
            "'auto', 'files' or 'tfds'."
        )

    # Every folder named by the user must exist: never read from elsewhere instead.
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DatasetNotFoundError(
            f"data_dir {data_dir} does not exist or is not a folder. Create it and put the "
            f"{name} files there (see docs/datasets.md), or pass no data_dir to use the "
            "default locations."
        )
    env_dir = None if data_dir else os.environ.get(DATA_DIR_ENV) or None
    if env_dir is not None and source != "tfds" and not os.path.isdir(env_dir):
        raise DatasetNotFoundError(
            f"${DATA_DIR_ENV}={env_dir} does not exist or is not a folder. Create it and put "
            f"the {name} files there, or unset ${DATA_DIR_ENV}."
        )

    if source == "tfds":
        images, labels, origin = _load_tfds(spec.tfds_name, split, data_dir, num_examples)
    elif source in ("files", "idx"):
        images, labels, origin = _load_files(name, split, data_dir)
    else:  # auto: the official files first, then tfds.
        try:
            images, labels, origin = _load_files(name, split, data_dir)
        except DatasetNotFoundError as files_error:
            try:
                images, labels, origin = _load_tfds(spec.tfds_name, split, data_dir, num_examples)
            except (DatasetNotFoundError, ImportError) as tfds_error:
                raise DatasetNotFoundError(
                    f"{name} ({split}) found neither as its official files nor through tfds.\n"
                    f"Files: {files_error}\ntfds: {tfds_error}"
                ) from None

    if images.ndim == 3:
        images = images[..., None]
    if images.shape[1:] != shape:
        raise ValueError(
            f"{name} ({split}) from {origin}: images of shape {images.shape[1:]}, expected {shape}."
        )
    total = images.shape[0]
    if num_examples is not None:
        if num_examples > total:
            raise ValueError(
                f"num_examples={num_examples} but the {split} split of {name} ({origin}) has "
                f"only {total} examples."
            )
        # Copies, so that the full split's arrays can be freed.
        images, labels = images[:num_examples].copy(), labels[:num_examples].copy()
    count = f"{total} examples" if num_examples is None else f"the first {num_examples} examples"
    dataset = Dataset(
        np.ascontiguousarray(images, dtype=np.uint8),
        np.asarray(labels, dtype=np.int32),
        classes,
        name,
        f"{name} {split}: {count} {origin}",
    )
    logging.info("Dataset: %s", dataset.source)
    return dataset


def _check_choice(what: str, value: str, accepted: Sequence[str]) -> str:
    if value not in accepted:
        raise ValueError(
            f"Unknown {what} {value!r}; accepted: {', '.join(repr(a) for a in accepted)}."
        )
    return value


def _local_dirs(name: str, data_dir: str | None) -> list[str]:
    """Folders searched for the official files of ``name``, in order.

    An explicit ``data_dir`` is the only place searched (with its dataset
    sub-folders); without it, ``$JAX_MEMAT_DATA_DIR`` then the system folders.
    """
    spec = _SOURCES[name]
    root = data_dir or os.environ.get(DATA_DIR_ENV) or None
    dirs = []
    if root:
        dirs.extend(os.path.join(root, sub) for sub in spec.subdirs)
        dirs.append(root)
    if not data_dir:
        dirs.extend(spec.system_dirs)
    return dirs


def _find_file(folder: str, stem: str) -> str | None:
    for path in (os.path.join(folder, stem + ".gz"), os.path.join(folder, stem)):
        if os.path.isfile(path):
            return path
    return None


def _load_files(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """Reads ``split`` of ``name`` from the first searched folder holding its files.

    Returns images, labels and where they came from (for ``Dataset.source``).
    """
    dirs = _local_dirs(name, data_dir)
    for folder in dirs:
        if os.path.isdir(folder):
            found = _read_from_folder(name, split, folder)
            if found is not None:
                return found
    raise DatasetNotFoundError(
        f"{_looked_for(name, split)} of {name} ({split}) not found in any of: "
        f"{', '.join(dirs) or '(no folder: neither data_dir nor $' + DATA_DIR_ENV + ' is set)'}. "
        f"To get them, {_SOURCES[name].files_help}; put them in a folder (or its sub-folder "
        f"{_SOURCES[name].subdirs[0]}/) and pass data_dir=<folder> or set "
        f"${DATA_DIR_ENV}=<folder>, or use source='tfds'."
    )


def _read_from_folder(
    name: str, split: str, folder: str
) -> tuple[np.ndarray, np.ndarray, str] | None:
    """Reads ``split`` of ``name`` if ``folder`` holds its official files, else None."""
    file_format = _SOURCES[name].file_format
    if file_format == "idx":
        return _read_idx_pair(name, split, folder)
    if file_format == "cifar":
        location = cifar.find_cifar_binary(folder, name)
        if location is None:
            return None
        images, labels = cifar.read_cifar_binary(location, split, name)
        title = cifar.LAYOUTS[name].title
        return images, labels, f"from {location} ({title} binary version, rows in file order)"
    path = svhn.find_svhn_mat(folder, split)
    if path is None:
        return None
    images, labels = svhn.read_svhn_mat(path)
    return images, labels, f"from {path} (SVHN cropped digits .mat, rows in file order)"


def _looked_for(name: str, split: str) -> str:
    """The files of ``split`` of ``name``, in words, for error messages."""
    file_format = _SOURCES[name].file_format
    if file_format == "idx":
        image_stem, label_stem = _IDX_FILES[split]
        return f"IDX files {image_stem}[.gz] and {label_stem}[.gz]"
    if file_format == "cifar":
        layout = cifar.LAYOUTS[name]
        return (
            f"The {layout.title} binary version ({layout.archive}, its extracted folder "
            f"{layout.folder}/, or the files {', '.join(layout.files[split])})"
        )
    return f"The file {svhn.FILES[split]}"


def _read_idx_pair(name: str, split: str, folder: str) -> tuple[np.ndarray, np.ndarray, str] | None:
    image_stem, label_stem = _IDX_FILES[split]
    image_path = _find_file(folder, image_stem)
    label_path = _find_file(folder, label_stem)
    if not (image_path and label_path):
        return None
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{image_path} and {label_path} do not hold [N, H, W] images and [N] "
            f"labels: shapes {images.shape} and {labels.shape}."
        )
    return images, labels, f"from {folder} (IDX files, rows in file order)"


def _load_tfds(
    tfds_name: str, split: str, data_dir: str | None, num_examples: int | None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Reads the first ``num_examples`` (all if None) of a tfds split, in tfds' order.

    Returns images, labels and where they came from (for ``Dataset.source``).
    """
    try:
        # tensorflow-datasets 4.9 imports it while downloading and preparing a
        # dataset without declaring it: checked here so that its absence is an
        # install problem, reported as one, rather than a failed download.
        import importlib_resources  # noqa: F401
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            f"Loading {tfds_name!r} through tfds needs the tfds extra: {TFDS_INSTALL} "
            f"(missing: {err.name or err})."
        ) from err
    # TensorFlow only reads files here; JAX owns the accelerators' memory.
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialized its devices; nothing to change.
        pass

    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    try:
        ds, info = tfds.load(
            tfds_name,
            split=split,
            data_dir=data_dir,
            batch_size=_TFDS_CHUNK,
            as_supervised=True,
            shuffle_files=False,
            with_info=True,
        )
    except ImportError as err:  # A module tfds needs is missing: an install problem.
        raise ImportError(
            f"tensorflow-datasets could not load {tfds_name!r}: {type(err).__name__}: {err}. "
            f"Install the tfds extra: {TFDS_INSTALL}."
        ) from err
    except Exception as err:  # Any other failure to open the data means it is not available.
        message = f"{type(err).__name__}: {err}"
        if len(message) > 500:
            message = message[:500] + " ..."
        # `from None`: the cause is summarized above, tfds' deep traceback adds nothing.
        raise DatasetNotFoundError(
            f"tfds dataset {tfds_name!r} (split {split!r}) could not be loaded from {where} "
            f"({message}). To get it, on a machine with network access run `python -c "
            f'"import tensorflow_datasets as tfds; '
            f"tfds.builder('{tfds_name}', data_dir='<dir>').download_and_prepare()\"` "
            "(the `tfds build` command of tensorflow-datasets 4.9 also needs apache-beam), "
            f"then copy <dir>/{tfds_name} to {where} or pass data_dir=<dir>."
        ) from None

    image_chunks, label_chunks, count = [], [], 0
    for images, labels in tfds.as_numpy(ds):
        image_chunks.append(images)
        label_chunks.append(labels)
        count += len(labels)
        if num_examples is not None and count >= num_examples:
            break
    origin = f"through tfds {tfds_name!r} from {info.data_dir} (rows in tfds' order)"
    return np.concatenate(image_chunks), np.concatenate(label_chunks), origin
