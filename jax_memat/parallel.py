"""Data parallelism over all devices: the mesh, and how arrays are laid out on it.

One mesh axis, ``"data"``. The train state is replicated, every batch is split
along its leading axis, and the step is a ``jax.jit`` with explicit shardings:
XLA (GSPMD) inserts the cross-device all-reduces, so gradients are averaged
over the *global* batch and BatchNorm statistics are those of the global batch
(synchronised BatchNorm). A step on 8 devices therefore computes the same
function as the step on 1 device for the same global batch, which
``tests/test_training.py`` checks.

Multi-host: call ``jax.distributed.initialize()`` first; every host computes
the same global batch indices and feeds its own slice (``shard_batch``).
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
    # Each host holds the same global array; hand JAX this host's rows.
    x = np.asarray(x)
    if sharding.spec == PartitionSpec():
        return jax.make_array_from_process_local_data(sharding, x, x.shape)
    per_host = x.shape[0] // jax.process_count()
    start = jax.process_index() * per_host
    return jax.make_array_from_process_local_data(sharding, x[start : start + per_host], x.shape)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a pytree of global-batch arrays on the mesh, split along axis 0."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: _put(x, sharding), batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree on every device of the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: _put(x, sharding), tree)
