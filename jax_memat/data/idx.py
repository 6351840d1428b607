"""Reader for the IDX format of the original MNIST and Fashion-MNIST files.

An IDX file is: two zero bytes, one byte naming the element type, one byte
giving the number of dimensions d, then d big-endian uint32 sizes, then the
elements in C order, big-endian. The files are usually gzip-compressed.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

# Element type byte -> big-endian numpy dtype (from the format's description).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads an IDX file (gzip-compressed when its name ends in ``.gz``).

    Args:
      path: the file, e.g. ``train-images-idx3-ubyte.gz``.

    Returns:
      A writable array of the file's shape, in native byte order (``uint8`` for
      the images and labels of MNIST-like datasets).

    Raises:
      ValueError: the file is not a well-formed IDX file.

    Example:
      >>> import tempfile, os, struct
      >>> path = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte")
      >>> with open(path, "wb") as f:
      ...     _ = f.write(struct.pack(">BBBBI", 0, 0, 0x08, 1, 3) + bytes([7, 0, 9]))
      >>> read_idx(path).tolist()
      [7, 0, 9]
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file: it must start with two zero bytes.")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: unknown IDX element type 0x{type_code:02X}; known: "
            + ", ".join(f"0x{code:02X}" for code in _IDX_DTYPES)
            + "."
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions announced).")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header_size != expected:
        raise ValueError(
            f"{path}: IDX header announces shape {shape} of {dtype.name} ({expected} bytes) "
            f"but the file holds {len(data) - header_size} bytes of data."
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    # astype copies: the result is writable, native-endian and owns its memory.
    return array.astype(dtype.newbyteorder("="))
