"""Reader for the binary version of CIFAR-10 and CIFAR-100.

The datasets' page (Krizhevsky, 2009, https://www.cs.toronto.edu/~kriz/cifar.html)
distributes each dataset in three versions. The "binary version" used here
(``cifar-10-binary.tar.gz``, ``cifar-100-binary.tar.gz``) stores every example
as one fixed-size record: the label byte(s), then 3072 pixel bytes, the 1024
red values of the 32x32 image in row-major order, then the 1024 green, then the
1024 blue. A CIFAR-10 record has one label byte; a CIFAR-100 record has two,
the coarse (super-class) label then the fine label, which is the one the paper
trains on (100 classes).

The "python version" archives hold pickles, and loading a pickle can run
arbitrary code: they are refused, with a pointer to the binary version.
"""

from __future__ import annotations

import dataclasses
import os
import tarfile
import zlib

import numpy as np
from absl import logging

_SIZE = 32
_PIXEL_BYTES = 3 * _SIZE * _SIZE


@dataclasses.dataclass(frozen=True)
class CifarLayout:
    """The files of one dataset's binary version, as distributed.

    Attributes:
      title: the dataset's usual name, for messages.
      url: where the binary version is downloaded from.
      archive: the archive's file name.
      folder: the folder the archive extracts to (and the prefix of its members).
      files: split -> the record files of that split, in the order read.
      records_per_file: file -> number of records in the official file.
      label_bytes: label bytes at the start of each record.
      label_index: which of them is the label returned.
      label_limits: an exclusive upper bound for each label byte.
      other_versions: archive and folder names of the versions that are refused.
    """

    title: str
    url: str
    archive: str
    folder: str
    files: dict[str, tuple[str, ...]]
    records_per_file: dict[str, int]
    label_bytes: int
    label_index: int
    label_limits: tuple[int, ...]
    other_versions: tuple[str, ...]

    @property
    def record_bytes(self) -> int:
        """Bytes in one record: labels then pixels."""
        return self.label_bytes + _PIXEL_BYTES

    @property
    def num_classes(self) -> int:
        """Number of classes of the label returned."""
        return self.label_limits[self.label_index]


_CIFAR10_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
LAYOUTS = {
    "cifar10": CifarLayout(
        title="CIFAR-10",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        archive="cifar-10-binary.tar.gz",
        folder="cifar-10-batches-bin",
        files={"train": _CIFAR10_TRAIN, "test": ("test_batch.bin",)},
        records_per_file=dict.fromkeys((*_CIFAR10_TRAIN, "test_batch.bin"), 10_000),
        label_bytes=1,
        label_index=0,
        label_limits=(10,),
        other_versions=(
            "cifar-10-python.tar.gz",
            "cifar-10-batches-py",
            "cifar-10-matlab.tar.gz",
            "cifar-10-batches-mat",
        ),
    ),
    "cifar100": CifarLayout(
        title="CIFAR-100",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        archive="cifar-100-binary.tar.gz",
        folder="cifar-100-binary",
        files={"train": ("train.bin",), "test": ("test.bin",)},
        records_per_file={"train.bin": 50_000, "test.bin": 10_000},
        label_bytes=2,
        label_index=1,  # The fine label; byte 0 is the coarse one.
        label_limits=(20, 100),
        other_versions=(
            "cifar-100-python.tar.gz",
            "cifar-100-python",
            "cifar-100-matlab.tar.gz",
            "cifar-100-matlab",
        ),
    ),
}


def _layout(dataset: str) -> CifarLayout:
    if dataset not in LAYOUTS:
        raise ValueError(
            f"Unknown CIFAR dataset {dataset!r}; accepted: {', '.join(map(repr, LAYOUTS))}."
        )
    return LAYOUTS[dataset]


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"Unknown split {split!r}; accepted: 'train', 'test'.")


def decode_cifar_records(
    data: bytes, dataset: str, where: str = "<bytes>"
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes the records of one binary-version file.

    Args:
      data: the file's bytes.
      dataset: ``"cifar10"`` or ``"cifar100"``.
      where: the file's name, for error messages.

    Returns:
      ``(images, labels)``: uint8 [N, 32, 32, 3] (height, width, RGB) and
      int32 [N] (CIFAR-100: the fine labels), in record order.

    Raises:
      ValueError: the data is empty, not a whole number of records (a truncated
        or foreign file), or holds a label out of range.

    Example:
      >>> record = bytes([3]) + bytes(range(256)) * 12  # label 3, then R, G, B planes.
      >>> images, labels = decode_cifar_records(record, "cifar10")
      >>> images.shape, labels.tolist(), images[0, 0, 1].tolist()
      ((1, 32, 32, 3), [3], [1, 1, 1])
    """
    layout = _layout(dataset)
    size = layout.record_bytes
    if not data or len(data) % size:
        raise ValueError(
            f"{where} is truncated or is not a {layout.title} binary-version file: it holds "
            f"{len(data)} bytes, not a positive multiple of the {size}-byte record "
            f"({layout.label_bytes} label byte(s) + {_PIXEL_BYTES} pixel bytes). Download "
            f"{layout.url} again."
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, size)
    for i, limit in enumerate(layout.label_limits):
        bad = np.flatnonzero(records[:, i] >= limit)
        if bad.size:
            raise ValueError(
                f"{where}: record {bad[0]} has label byte {i} = {records[bad[0], i]}, "
                f"outside [0, {limit}); this is not a {layout.title} binary-version file."
            )
    labels = records[:, layout.label_index].astype(np.int32)
    # Each record stores the channel planes one after the other (C, H, W).
    planes = records[:, layout.label_bytes :].reshape(-1, 3, _SIZE, _SIZE)
    images = np.ascontiguousarray(planes.transpose(0, 2, 3, 1))
    return images, labels


def find_cifar_binary(folder: str, dataset: str) -> str | None:
    """Where ``folder`` holds the binary version of ``dataset``, if it does.

    Looked for, in order: the record files themselves in ``folder`` (e.g.
    ``data_batch_1.bin``), the extracted folder (``cifar-10-batches-bin/``,
    ``cifar-100-binary/``), the archive (``cifar-10-binary.tar.gz``,
    ``cifar-100-binary.tar.gz``).

    Args:
      folder: a folder.
      dataset: ``"cifar10"`` or ``"cifar100"``.

    Returns:
      The folder holding the record files or the archive's path, for
      ``read_cifar_binary``; None when ``folder`` holds none of them.

    Raises:
      ValueError: ``folder`` holds only another version of the dataset (python
        pickles or MATLAB files), which is refused.

    Example:
      >>> import tempfile
      >>> find_cifar_binary(tempfile.mkdtemp(), "cifar10") is None
      True
    """
    layout = _layout(dataset)
    record_files = {name for names in layout.files.values() for name in names}
    if any(os.path.isfile(os.path.join(folder, name)) for name in record_files):
        return folder
    extracted = os.path.join(folder, layout.folder)
    if os.path.isdir(extracted):
        return extracted
    archive = os.path.join(folder, layout.archive)
    if os.path.isfile(archive):
        return archive
    for other in layout.other_versions:
        path = os.path.join(folder, other)
        if os.path.exists(path):
            raise ValueError(
                f"{path} is not the binary version of {layout.title}: the python version "
                "holds pickles, which jax_memat does not load (loading one can run arbitrary "
                f"code), and the MATLAB version is not read either. Download the binary "
                f"version, {layout.url}, and put the archive or its extracted folder "
                f"{layout.folder}/ in {folder}."
            )
    return None


def read_cifar_binary(
    path: str | os.PathLike[str], split: str, dataset: str
) -> tuple[np.ndarray, np.ndarray]:
    """Reads one split of CIFAR-10 or CIFAR-100 from its binary version.

    Args:
      path: the archive (``cifar-10-binary.tar.gz``, ``cifar-100-binary.tar.gz``),
        read without extracting it, or a folder holding the record files
        (``data_batch_1.bin`` ... ``data_batch_5.bin``, ``test_batch.bin``;
        ``train.bin``, ``test.bin``), e.g. the extracted ``cifar-10-batches-bin/``.
      split: ``"train"`` or ``"test"``.
      dataset: ``"cifar10"`` or ``"cifar100"``.

    Returns:
      ``(images, labels)``: uint8 [N, 32, 32, 3] and int32 [N] (CIFAR-100: the
      fine labels). Row ``i`` is the ``i``-th record of the split's files, read
      in the order ``data_batch_1.bin`` ... ``data_batch_5.bin`` for the
      CIFAR-10 training set.

    Raises:
      ValueError: a file is missing from the folder or the archive, truncated
        or malformed; the message names it.

    Example:
      >>> import os, tempfile
      >>> folder = tempfile.mkdtemp()
      >>> with open(os.path.join(folder, "test.bin"), "wb") as f:
      ...     _ = f.write(bytes([4, 42]) + bytes(3072))  # coarse 4, fine 42, black image.
      >>> images, labels = read_cifar_binary(folder, "test", "cifar100")
      >>> images.shape, labels.tolist()
      ((1, 32, 32, 3), [42])
    """
    layout = _layout(dataset)
    _check_split(split)
    path = os.fspath(path)
    names = layout.files[split]
    if os.path.isdir(path):
        contents = {}
        for name in names:
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise ValueError(
                    f"{layout.title} {split}: {file} is missing; the {split} split needs "
                    f"{', '.join(names)} in {path}. Download {layout.url} again."
                )
            with open(file, "rb") as f:
                contents[name] = (file, f.read())
    else:
        contents = _read_members(path, names, layout)
    parts = [decode_cifar_records(data, dataset, where) for where, data in contents.values()]
    for name, (where, _), (_, labels) in zip(names, contents.values(), parts, strict=True):
        expected = layout.records_per_file[name]
        if len(labels) != expected:
            logging.warning(
                "%s holds %d records; the official %s holds %d.", where, len(labels), name, expected
            )
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    return images, labels


def _read_members(
    archive: str, names: tuple[str, ...], layout: CifarLayout
) -> dict[str, tuple[str, bytes]]:
    """Reads the members ``<layout.folder>/<name>`` of a .tar.gz in one pass."""
    wanted = {f"{layout.folder}/{name}": name for name in names}
    found: dict[str, tuple[str, bytes]] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:  # In archive order: the gzip stream is decompressed once.
                name = wanted.get(member.name)
                if name is None or not member.isfile():
                    continue
                f = tar.extractfile(member)
                found[name] = (f"{archive}:{member.name}", f.read())
                if len(found) == len(wanted):
                    break
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ValueError(
            f"{archive} cannot be read as a .tar.gz archive, it is truncated or malformed "
            f"({type(err).__name__}: {err}). Download {layout.url} again."
        ) from None
    missing = [member for member, name in wanted.items() if name not in found]
    if missing:
        raise ValueError(
            f"{archive} lacks {', '.join(missing)}: it is truncated or is not the "
            f"{layout.title} binary version ({layout.url})."
        )
    # In the split's file order, whatever the order inside the archive.
    return {name: found[name] for name in names}
