"""Reader for the cropped-digits files of SVHN (Netzer et al., 2011).

The dataset's page (http://ufldl.stanford.edu/housenumbers/) distributes the
cropped digits ("format 2") as MATLAB v5 files, ``train_32x32.mat`` and
``test_32x32.mat``, each holding two variables: ``X``, the images as a
32x32x3xN uint8 array (height, width, RGB, example), and ``y``, the labels as
an Nx1 array of digits 1..10, where 10 stands for the digit 0. As tfds'
``svhn_cropped`` does, label 10 becomes 0, so the labels are the digits.

The files are read with ``scipy.io.loadmat``, which decodes the MATLAB format
and never unpickles anything.
"""

from __future__ import annotations

import os

import numpy as np
from absl import logging

URL = "http://ufldl.stanford.edu/housenumbers/"
FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
# Examples in the official files (the page's "73257 digits for training,
# 26032 digits for testing").
OFFICIAL_SIZES = {"train": 73_257, "test": 26_032}


def find_svhn_mat(folder: str, split: str) -> str | None:
    """The path of ``split``'s .mat file in ``folder``, or None if absent.

    Args:
      folder: a folder.
      split: ``"train"`` or ``"test"``.

    Returns:
      ``<folder>/train_32x32.mat`` or ``<folder>/test_32x32.mat`` when it is a
      file, else None.

    Example:
      >>> import tempfile
      >>> find_svhn_mat(tempfile.mkdtemp(), "test") is None
      True
    """
    _check_split(split)
    path = os.path.join(folder, FILES[split])
    return path if os.path.isfile(path) else None


def read_svhn_mat(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Reads an SVHN cropped-digits file (``train_32x32.mat``, ``test_32x32.mat``).

    Args:
      path: the .mat file.

    Returns:
      ``(images, labels)``: uint8 [N, 32, 32, 3] and int32 [N] in [0, 10), the
      digit shown (the file's label 10 becomes 0). Row ``i`` is the file's
      example ``i`` (``X[:, :, :, i]``, ``y[i]``).

    Raises:
      ValueError: the file cannot be decoded (truncated, not a MATLAB v5 file)
        or does not hold ``X`` and ``y`` of the expected shapes, types and
        values; the message names the file.

    Example:
      >>> import os, tempfile, numpy as np, scipy.io
      >>> path = os.path.join(tempfile.mkdtemp(), "test_32x32.mat")
      >>> x = np.zeros((32, 32, 3, 2), np.uint8)
      >>> scipy.io.savemat(path, {"X": x, "y": np.array([[10], [7]], np.uint8)})
      >>> images, labels = read_svhn_mat(path)
      >>> images.shape, labels.tolist()
      ((2, 32, 32, 3), [0, 7])
    """
    import scipy.io  # Imported here: only SVHN's files need it.

    path = os.fspath(path)
    help_text = f"Download {os.path.basename(path)} again from {URL}."
    try:
        contents = scipy.io.loadmat(path, variable_names=("X", "y"))
    except Exception as err:  # scipy raises many types on a bad file.
        message = f"{type(err).__name__}: {err}"
        raise ValueError(
            f"{path} cannot be read as an SVHN MATLAB v5 file; it is truncated or malformed "
            f"({message[:300]}). {help_text}"
        ) from None
    if "X" not in contents or "y" not in contents:
        raise ValueError(
            f"{path} does not hold the variables X and y of the SVHN cropped digits "
            f"(found: {', '.join(k for k in contents if not k.startswith('__')) or 'none'}). "
            f"{help_text}"
        )
    x, y = contents["X"], contents["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise ValueError(
            f"{path}: X must be a uint8 array of shape 32x32x3xN; got {x.dtype} of shape "
            f"{x.shape}. {help_text}"
        )
    n = x.shape[3]
    if y.size != n or (y.ndim == 2 and y.shape[1] != 1) or y.ndim > 2:
        raise ValueError(
            f"{path}: y must be an {n}x1 array (one label per image); got shape {y.shape}. "
            f"{help_text}"
        )
    labels = y.reshape(n)
    if not np.issubdtype(labels.dtype, np.number) or np.iscomplexobj(labels):
        raise ValueError(f"{path}: y must hold numbers; got {labels.dtype}. {help_text}")
    valid = (labels >= 1) & (labels <= 10) & (labels == np.round(labels))
    if not valid.all():
        bad = int(np.flatnonzero(~valid)[0])
        raise ValueError(
            f"{path}: y[{bad}] = {labels[bad].item()!r}; SVHN labels are the integers 1..10 "
            f"(10 for the digit 0). {help_text}"
        )
    split = next((s for s, name in FILES.items() if name == os.path.basename(path)), None)
    if split is not None and n != OFFICIAL_SIZES[split]:
        logging.warning(
            "%s holds %d examples; the official file holds %d.", path, n, OFFICIAL_SIZES[split]
        )
    images = np.ascontiguousarray(np.moveaxis(x, 3, 0))
    return images, (labels.astype(np.int32) % 10).astype(np.int32)


def _check_split(split: str) -> None:
    if split not in FILES:
        raise ValueError(f"Unknown split {split!r}; accepted: 'train', 'test'.")
