"""Up-front memory and disk estimates, so an impossible run is refused before it starts.

The estimate is made from shapes alone (``jax.eval_shape``: nothing is
allocated or compiled) and is a *lower bound* of what the run needs on each
device: the datasets (held on every device as uint8), the train state (the
parameters, the optimizer state, a gradient and an updated copy), the
temporal-ensembling table, and the activations of one training batch (every
layer's output, kept for the backward pass, and its gradient). A run is
refused only when this lower bound already exceeds what the devices have,
so a run that fits is never refused; XLA's own buffers come on top.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from jax_memat.experiment.errors import ResourceError

_GIB = 1024**3


def _fmt(n: float) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", _GIB), ("MiB", 1024**2)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run needs on each device (a lower bound), by part.

    Attributes:
      data: the train and test sets (uint8 images, int32 labels).
      state: parameters, optimizer state, batch statistics, a gradient and an
        updated copy of the parameters.
      table: per-example transform state (the TE soft-label table), this
        device's part of it when it is split over the devices.
      activations: one training batch's layer outputs and their gradients.
      num_parameters: the model's parameter count.
    """

    data: int
    state: int
    table: int
    activations: int
    num_parameters: int

    @property
    def total(self) -> int:
        return self.data + self.state + self.table + self.activations

    table_shards: int = 1

    @property
    def checkpoint_bytes(self) -> int:
        """Size of one checkpoint (state without the gradient and the copy, plus the table)."""
        return self.state // 2 + self.table * self.table_shards

    def describe(self) -> str:
        return (
            f"{_fmt(self.total)} per device: data {_fmt(self.data)}, parameters and optimizer "
            f"state {_fmt(self.state)} ({self.num_parameters:,} parameters), per-example table "
            f"{_fmt(self.table)}, activations of one batch {_fmt(self.activations)}"
        )


def estimate_memory(
    module,
    *,
    image_shape: tuple[int, int, int],
    num_classes: int,
    num_train: int,
    num_test: int,
    batch_per_device: int,
    te_table: bool,
    dtype: str = "float32",
    table_shards: int = 1,
) -> MemoryEstimate:
    """A lower bound of the memory one device needs for a run (see the module docstring).

    Args:
      module: the Flax model.
      image_shape: (H, W, C).
      num_classes: number of classes.
      num_train, num_test: examples held on the devices.
      batch_per_device: training examples per device and step.
      te_table: whether an N x K float32 table is carried.
      dtype: the compute dtype (activations' element size).
      table_shards: over how many devices the table is split (1: every
        device holds all of it; ``parallel.shard_table_mib``).

    Example:
      >>> est = estimate_memory(get_model("small_cnn", 10), image_shape=(28, 28, 1),
      ...                       num_classes=10, num_train=60000, num_test=10000,
      ...                       batch_per_device=128, te_table=False)
      >>> est.describe()
    """
    pixels = math.prod(image_shape)
    data = (num_train + num_test) * (pixels + 4)
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    variables = jax.eval_shape(
        lambda k, x: module.init(k, x, train=False),
        jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
        x,
    )
    leaves = jax.tree.leaves(variables.get("params", {}))
    num_params = int(sum(math.prod(v.shape) for v in leaves))
    stats = int(sum(math.prod(v.shape) for v in jax.tree.leaves(variables.get("batch_stats", {}))))
    state = 4 * (4 * num_params + stats)  # params, momentum, gradient, updated params (float32)
    batch = jax.ShapeDtypeStruct((batch_per_device, *image_shape), jnp.float32)
    _, captured = jax.eval_shape(
        lambda v, x: module.apply(
            v, x, True, mutable=["batch_stats", "intermediates"], capture_intermediates=True
        ),
        variables,
        batch,
    )
    elements = sum(math.prod(v.shape) for v in jax.tree.leaves(captured.get("intermediates", {})))
    element_bytes = np.dtype(jnp.bfloat16 if dtype == "bfloat16" else jnp.float32).itemsize
    activations = 2 * elements * element_bytes
    table = -(-4 * num_train * num_classes // table_shards) if te_table else 0
    return MemoryEstimate(
        int(data), int(state), int(table), int(activations), num_params, table_shards
    )


def available_memory(devices) -> tuple[int, str]:
    """Bytes one device can hold, and where the figure comes from.

    Accelerators report their limit; CPU devices share the host's available
    memory (``MemAvailable``), divided among them.
    """
    device = devices[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not implement it
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.platform.upper()} memory limit"
    host = _host_available()
    cpu_devices = sum(d.platform == "cpu" for d in devices) or 1
    return host // cpu_devices, f"host memory available, shared by {cpu_devices} CPU device(s)"


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 62  # unknown: do not refuse


def check_memory(estimate: MemoryEstimate, devices) -> None:
    """Raises ``ResourceError`` when the lower bound exceeds a device's memory."""
    available, where = available_memory(devices)
    if estimate.total > available:
        raise ResourceError(
            f"This run needs at least {estimate.describe()}; only {_fmt(available)} is "
            f"available per device ({where}). Reduce the dataset size, the model size "
            "(model.cnn_width, model.width) or the batch size; nothing was written."
        )


def check_disk(estimate: MemoryEstimate, workdir: str) -> None:
    """Raises ``ResourceError`` when the workdir's disk cannot hold the run's checkpoints.

    A run keeps up to five checkpoints at once (init, two latest, best, and
    the one being written).
    """
    path = os.path.abspath(workdir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    free = shutil.disk_usage(path).free
    need = 5 * estimate.checkpoint_bytes
    if need > free:
        raise ResourceError(
            f"The checkpoints of this run need about {_fmt(need)} (5 x {_fmt(need / 5)}); the "
            f"disk of {workdir} has {_fmt(free)} free. Free some space or use another "
            "--workdir; nothing was written."
        )
