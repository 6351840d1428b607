"""Seeded numpy generators, one independent stream per purpose."""

from __future__ import annotations

import zlib

import numpy as np


def check_seed(seed: int, what: str = "seed") -> int:
    """Returns ``seed`` as an int, or raises ValueError if it is not a non-negative int."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"{what} must be a non-negative int; got {seed!r}.")
    return int(seed)


def generator(seed: int, purpose: str, *extra: int) -> np.random.Generator:
    """A generator for one purpose (label noise, pixel shuffles, ...) drawn from ``seed``.

    Mixing a tag of the purpose into the seed keeps the streams independent,
    so that, say, the label noise does not reuse the random bits of the pixel
    shuffle when both are made from the run's seed.
    """
    return np.random.default_rng([check_seed(seed), zlib.crc32(purpose.encode()), *extra])
