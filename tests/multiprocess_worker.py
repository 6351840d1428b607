"""One process of the tests' multi-process runs (``tests/test_multiprocess.py``).

Run as ``python tests/multiprocess_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID TASK_JSON``
in every process, each with its own simulated CPU devices (``XLA_FLAGS``).
The task file lists what to do, in order (every process does all of it, as a
multi-process program must):

- ``rows``: this process's rows of a global batch, and the global batch's
  indices as the train step sees them, to ``<out>/rows_<process>.npz``;
- ``train``: ``train_and_evaluate`` of the tests' tiny config in a workdir,
  optionally stopped by a SIGTERM that process 1 sends itself after a given
  step (both processes must stop, with exit code 143, at the same step; what
  each was told goes to ``<out>/stopped_<process>.json``);
- ``autoattack``: a short AutoAttack of a small trained MLP; process 0
  writes the per-point result to an ``.npz``.
"""

import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(coordinator: str, num_processes: int, process_id: int, task_path: str) -> None:
    from jax_memat import distributed

    assert distributed.initialize(coordinator, num_processes, process_id)
    import jax
    import numpy as np

    with open(task_path) as f:
        task = json.load(f)
    for item in task["steps"]:
        kind = item["kind"]
        start = time.perf_counter()
        if kind == "rows":
            _rows(item, process_id)
        elif kind == "train":
            _train(item)
        elif kind == "autoattack":
            _autoattack(item)
        else:
            raise ValueError(f"unknown task {kind!r}")
        print(f"process {process_id}: {kind} took {time.perf_counter() - start:.1f} s", flush=True)
    distributed.barrier("worker_done")
    print(f"process {process_id}: done ({jax.device_count()} devices)", flush=True)
    del np


def _rows(item: dict, process_id: int) -> None:
    import jax
    import numpy as np

    from jax_memat.parallel import make_mesh, process_rows, shard_batch, to_host

    mesh = make_mesh()
    n = item["batch_size"]
    rows = process_rows(n, mesh)
    # A global batch of example indices (as the loop draws them): placed over both
    # processes, then brought back whole.
    indices = np.random.default_rng(0).permutation(4 * n)[:n].astype(np.int32)
    placed = shard_batch(indices, mesh)
    local = np.concatenate(
        [np.asarray(s.data) for s in sorted(placed.addressable_shards, key=lambda s: s.index)]
    )
    np.savez(
        os.path.join(item["out"], f"rows_{process_id}.npz"),
        rows=rows,
        local=local,
        gathered=to_host(placed),
        indices=indices,
        process_count=jax.process_count(),
    )


def _train(item: dict) -> None:
    import signal

    import jax

    from jax_memat.experiment import train_and_evaluate
    from jax_memat.experiment.errors import RunInterrupted
    from tests.test_multiprocess import run_config

    stop_after = item.get("stop_after_step")

    def stop(step, state, metrics, per_example):
        # Only process 1 gets the signal, as when one host of a job is told to stop.
        if stop_after is not None and step == stop_after and jax.process_index() == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        train_and_evaluate(
            run_config(item["epochs"]), item["workdir"], hooks=[stop], handle_signals=True
        )
    except RunInterrupted as err:
        if stop_after is None:
            raise
        told = {"exit_code": err.exit_code, "message": str(err), "step": stop_after}
        name = f"stopped_{jax.process_index()}.json"
        with open(os.path.join(item["out"], name), "w") as f:
            json.dump(told, f)
        return
    if stop_after is not None:
        raise AssertionError(f"the run in {item['workdir']} did not stop after a SIGTERM")


def _autoattack(item: dict) -> None:
    import jax
    import numpy as np

    from jax_memat.distributed import is_main_process
    from tests.test_multiprocess import autoattack_of_mlp

    result = autoattack_of_mlp()
    if is_main_process():
        np.savez(item["out"], robust=result.robust, x_adv=result.x_adv)
    del jax


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
