"""JAX's multi-process runtime: starting it, and what the processes share.

A run on several hosts (a TPU pod slice, a GPU cluster) or several processes
on one machine is one program run by every process (JAX's multi-controller
model): each process drives its local devices, the mesh spans the devices of
all processes, and XLA's collectives (NCCL on GPUs, the TPU interconnect,
gloo over TCP on CPUs) make the global batch one batch. ``initialize`` starts
that runtime before JAX touches a device; everything else in jax_memat then
runs unchanged, with files written by process 0 only (``is_main_process``).

``initialize`` follows ``jax.distributed.initialize``: give the coordinator's
address, the number of processes and this process's id, or none of them to
let JAX detect a cluster it knows (SLURM's ``srun``, Open MPI's ``mpirun``, a
Cloud TPU VM). With none given and no cluster detected it does nothing: one
process, as before.

Helpers for the processes to agree (each a no-op in one process):
``barrier`` waits for all of them; ``all_gather_bytes`` hands every process
the bytes each one contributed (used to share a check's verdict, so that
every process stops with the same message when one check fails).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np

# Where a cluster launcher is recognised from its documented environment
# variables: SLURM's srun, Open MPI's mpirun. (JAX reads the same ones.)
_SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)
_OMPI_VARS = ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")
# A Cloud TPU VM is recognised as JAX recognises it: a PCI device of Google's
# vendor id (a /dev/vfio entry alone is also on GPU hosts that use VFIO). JAX then
# asks the VM's metadata for the slice.
_PCI_DEVICES = "/sys/bus/pci/devices"
_GOOGLE_PCI_VENDOR = "0x1ae0"


def check_arguments(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
) -> None:
    """Raises ``ValueError`` unless the three arguments make a valid launch.

    Accepted: all three (``coordinator_address`` as ``host:port``, ``num_processes
    >= 1``, ``0 <= process_id < num_processes``); none (automatic detection); or
    ``num_processes=1`` alone (one process, no detection).

    Example:
      >>> check_arguments("10.0.0.1:1234", 2, 1)
      >>> check_arguments("10.0.0.1:1234", 2, None)
      Traceback (most recent call last):
      ValueError: ...
    """
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    missing = [k for k, v in given.items() if v is None]
    one_process = missing == ["coordinator_address", "process_id"] and num_processes == 1
    if 0 < len(missing) < 3 and not one_process:
        present = [k for k in given if k not in missing]
        raise ValueError(
            f"{', '.join(present)} given without {', '.join(missing)}: give all three of "
            "coordinator_address, num_processes and process_id (the same address and count "
            "in every process, ids 0 .. num_processes - 1), or none of them to let JAX detect "
            "the cluster (SLURM, Open MPI, Cloud TPU), or num_processes=1 alone for one process."
        )
    if num_processes is not None and (
        isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1
    ):
        raise ValueError(f"num_processes={num_processes!r}; accepted: an integer >= 1.")
    if process_id is not None and (
        isinstance(process_id, bool)
        or not isinstance(process_id, int)
        or not 0 <= process_id < num_processes
    ):
        raise ValueError(
            f"process_id={process_id!r}; accepted: an integer in [0, {num_processes - 1}] "
            f"(num_processes={num_processes})."
        )
    if coordinator_address is not None:
        _check_address(coordinator_address)


def _check_address(address: str) -> None:
    accepted = "accepted: host:port, e.g. 10.0.0.1:1234, node001:29500 or [::1]:1234"
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"coordinator_address={address!r} has no port; {accepted}.")
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(
            f"coordinator_address={address!r}: write an IPv6 host in brackets; {accepted}."
        )
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"coordinator_address={address!r} has no valid host; {accepted}.")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(
            f"coordinator_address={address!r}: the port must be an integer in [1, 65535]; "
            f"{accepted}."
        )


def detect_cluster() -> str | None:
    """The multi-process launcher this process runs under, or None.

    Returns:
      ``"slurm"`` (``srun`` with more than one task), ``"openmpi"``
      (``mpirun`` with more than one process), ``"tpu"`` (a Cloud TPU VM:
      JAX reads the slice's hosts from the VM's metadata) or None.

    Example:
      >>> detect_cluster()  # on a laptop
    """
    env = os.environ
    if all(v in env for v in _SLURM_VARS) and _count(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    if all(v in env for v in _OMPI_VARS) and _count(env["OMPI_COMM_WORLD_SIZE"]) > 1:
        return "openmpi"
    if "TPU_SKIP_MDS_QUERY" not in env and _google_pci_device():
        return "tpu"
    return None


def _google_pci_device() -> bool:
    try:
        devices = os.listdir(_PCI_DEVICES)
    except OSError:
        return False
    for device in devices:
        try:
            with open(os.path.join(_PCI_DEVICES, device, "vendor")) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def _count(value: str) -> int:
    # SLURM_NTASKS is a plain integer; anything else is not a launch we know.
    return int(value) if value.strip().isdigit() else 0


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    *,
    initialization_timeout: int = 300,
) -> bool:
    """Starts JAX's multi-process runtime (``jax.distributed.initialize``) when asked or detected.

    Call it first, before anything touches a device (``jax.devices()``,
    ``jax.device_put``, any computation). On CPU the cross-process collectives
    go through gloo (JAX's ``jax_cpu_collectives_implementation``, whose
    default is already ``"gloo"`` in JAX 0.10 and 0.11; it is set explicitly
    here unless the environment chose another, e.g. ``mpi``).

    Args:
      coordinator_address: ``host:port`` of process 0, where it serves the
        coordination service; the same in every process.
      num_processes: how many processes take part.
      process_id: this process's id, ``0 .. num_processes - 1``.
      local_device_ids: restricts this process to these local devices (e.g.
        one GPU per process); default all.
      initialization_timeout: seconds to wait for every process to connect.

    Returns:
      True when the runtime runs (started here or before), False for one
      process (nothing given and no cluster detected, or ``num_processes=1``
      alone).

    Raises:
      ValueError: bad arguments (before anything starts).

    Example:
      >>> # On each of two machines (process_id 0 on the first, 1 on the second):
      >>> initialize("10.0.0.1:1234", num_processes=2, process_id=0)
      True
      >>> jax.process_count(), jax.device_count()  # all devices of both
    """
    check_arguments(coordinator_address, num_processes, process_id)
    if jax.distributed.is_initialized():
        return True
    explicit = coordinator_address is not None
    if not explicit and (num_processes == 1 or detect_cluster() is None):
        return False
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {"initialization_timeout": initialization_timeout}
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    if explicit:
        kwargs.update(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    jax.distributed.initialize(**kwargs)
    return True


def is_main_process() -> bool:
    """True in process 0, the one that writes files (always True in one process).

    Example:
      >>> if is_main_process():
      ...     write_json(path, report)
    """
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (no-op in one process).

    Every process must call the same barriers in the same order.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def all_gather_bytes(data: bytes, max_bytes: int = 1 << 16) -> list[bytes]:
    """Every process's ``data``, in process order (``[data]`` in one process).

    A collective: every process must call it, in the same order as its other
    collectives. Longer data is cut to ``max_bytes`` (the buffer every
    process sends has that fixed size).

    Example:
      >>> verdicts = all_gather_bytes(b"" if ok else message.encode())
      >>> failed = [i for i, v in enumerate(verdicts) if v]
    """
    if jax.process_count() == 1:
        return [data]
    from jax.experimental import multihost_utils

    data = data[:max_bytes]
    buffer = np.zeros(max_bytes + 4, np.uint8)
    buffer[:4] = np.frombuffer(np.uint32(len(data)).tobytes(), np.uint8)
    buffer[4 : 4 + len(data)] = np.frombuffer(data, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(buffer))
    out = []
    for row in gathered.reshape(jax.process_count(), -1):
        size = int(np.frombuffer(row[:4].tobytes(), np.uint32)[0])
        out.append(row[4 : 4 + size].tobytes())
    return out
