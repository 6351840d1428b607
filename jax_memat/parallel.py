"""Data parallelism over all devices: the mesh, and how arrays are laid out on it.

One mesh axis, ``"data"``. The train state is replicated, every batch is split
along its leading axis, and the step is a ``jax.jit`` with explicit shardings:
XLA (GSPMD) inserts the cross-device all-reduces, so gradients are averaged
over the *global* batch and BatchNorm statistics are those of the global batch
(synchronised BatchNorm). A step on 8 devices therefore computes the same
function as the step on 1 device for the same global batch, which
``tests/test_training.py`` checks.

Several processes (``jax_memat.distributed.initialize``): the mesh spans the
devices of every process. Every process computes the same global arrays
(batch indices, labels, the dataset) and hands JAX only the rows its own
devices hold (``shard_batch``, ``process_rows``); ``to_host`` brings a split
array back whole to every process. Indices are therefore global everywhere:
the temporal-ensembling table and the per-example records see the same
example numbers as in one process.

Tables that grow with the dataset (the temporal-ensembling table) can be split
over the mesh along their first axis instead of replicated
(``state_shardings``), so that each device holds ``1 / devices`` of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis (``"data"``) mesh over ``devices`` (default: all devices).

    Example:
      >>> mesh = make_mesh()             # every device
      >>> mesh1 = make_mesh(jax.devices()[:1])
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device.")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over the mesh's (only) axis."""
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises ``ValueError`` unless the global batch splits evenly over the mesh."""
    n = mesh.devices.size
    if batch_size <= 0 or batch_size % n:
        raise ValueError(
            f"The global batch size ({batch_size}) must be a positive multiple of the "
            f"number of devices ({n}); accepted: {n}, {2 * n}, {4 * n}, ..."
        )


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # already global: JAX moves it
    # Every process holds the same global array: each local device gets exactly
    # the block the sharding assigns it, whatever the order of the mesh's devices.
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def process_rows(num_rows: int, mesh: Mesh) -> np.ndarray:
    """The rows of a batch-split array of ``num_rows`` rows that this process's devices hold.

    In one process: all rows. With several, the processes' rows are disjoint
    and together cover ``0 .. num_rows - 1``; each process feeds these rows of
    the global batch (``shard_batch`` takes them from the global array).

    Args:
      num_rows: the global batch size (a multiple of the mesh's device count).
      mesh: the mesh.

    Returns:
      Sorted int64 row numbers.

    Example:
      >>> process_rows(16, make_mesh())  # process 1 of 2, 4 devices each
      array([ 8,  9, 10, 11, 12, 13, 14, 15])
    """
    check_batch_size(num_rows, mesh)
    blocks = batch_sharded(mesh).addressable_devices_indices_map((num_rows,)).values()
    rows = {r for (block,) in blocks for r in range(*block.indices(num_rows))}
    return np.asarray(sorted(rows), np.int64)


def to_host(tree: Any) -> Any:
    """A pytree of (possibly split, possibly multi-process) arrays as NumPy arrays, whole.

    Arrays split over the devices of several processes are gathered to every
    process (a collective: every process must call it, in the same order);
    others are fetched as ``jax.device_get`` would. In one process this is
    ``jax.device_get`` of the whole tree, whose copies overlap.

    Example:
      >>> per_example = to_host(step_outputs)  # every example of the global batch
    """

    if jax.process_count() == 1:
        return jax.device_get(tree)

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree.map(get, tree)


def state_shardings(tree: Any, mesh: Mesh, shard_min_bytes: int | None) -> Any:
    """Where each leaf of a state goes: split along axis 0 if large, else replicated.

    A leaf is split over the mesh when it holds at least ``shard_min_bytes``
    bytes and its first axis divides evenly over the devices (the
    temporal-ensembling table, N x K); every other leaf is replicated.

    Args:
      tree: a pytree of arrays (or ``jax.ShapeDtypeStruct``).
      mesh: the mesh.
      shard_min_bytes: the size from which a leaf is split; None never splits.

    Returns:
      A pytree of ``NamedSharding`` of the same structure.

    Example:
      >>> table = {"soft_labels": np.zeros((50_000, 10), np.float32)}  # 2 MB
      >>> state_shardings(table, make_mesh(), 1 << 20)["soft_labels"].spec
      PartitionSpec('data',)
    """
    rep, split = replicated(mesh), batch_sharded(mesh)
    n = mesh.devices.size

    def choose(x):
        shape = np.shape(x)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
        large = shard_min_bytes is not None and nbytes >= shard_min_bytes
        return split if large and len(shape) >= 1 and shape[0] % n == 0 else rep

    return jax.tree.map(choose, tree)


def place(tree: Any, shardings: Any) -> Any:
    """Places a pytree of global arrays with a matching pytree of shardings."""
    return jax.tree.map(_put, tree, shardings)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a pytree of global-batch arrays on the mesh, split along axis 0."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: _put(x, sharding), batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree on every device of the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: _put(x, sharding), tree)
