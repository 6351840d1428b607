"""Two processes on JAX's multi-process runtime against one, on CPU devices (gloo collectives).

One launch of two processes (``tests/multiprocess_worker.py``), each with four
simulated CPU devices, on a free localhost port, does most of what the tests
below check, so that the start-up and compilations are paid once:

- the rows of a global batch each process feeds, and the batch's example
  indices gathered back;
- a tiny PGD-AT+TE run goes from one process to two and back: epoch 1 in one
  process (eight devices) here, epoch 2 in the two processes (the checkpoint
  of one process restored by two; the TE table split over the devices of
  both; a SIGTERM to process 1 alone in epoch 3 stops both at the same step),
  epoch 3 and the final report here again (the checkpoint of two processes
  restored by one). Parameters, TE table, metrics, report and
  per-example records equal those of the uninterrupted one-process run;
- AutoAttack (APGD-T and Square) of a small trained model: the same per
  point;
- and, in a second launch, the training CLI over two processes
  (``--coordinator_address``, ``--num_processes``, ``--process_id``) on a
  workdir this test holds the lock of: process 0 fails to take it, and both
  processes stop with its message and exit code 3.

The two processes form the same mesh of eight devices as the one-process runs
(``conftest.py``), so every per-device program is the same; only the
collectives go through gloo instead of in-process copies, and they sum in
another order: the results agree to float32 round-off (a few ulps, measured),
and the tolerances below are counted in ulps of each array's size.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jax_memat.experiment import load_run, read_metrics, train_and_evaluate
from jax_memat.experiment.metrics import TIMING_FIELDS
from jax_memat.experiment.workdir import WorkdirLock
from tests.helpers import F32_EPS, StopAtStep, stop_at_step
from tests.test_run import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multiprocess_worker.py")
# 3 steps per epoch; each run stops in the epoch after its last checkpoint.
EPOCHS, STOP_ONE, STOP_TWO = 3, 5, 8
LAUNCH_TIMEOUT_S = 240
# Relative round-off allowed after the few steps of the tiny run (1-2 ulps measured).
ULPS = 64


def run_config(epochs: int):
    """The tests' tiny PGD-AT+TE run, with per-example records and the TE table split."""
    c = tiny_config(epochs=epochs, te=True)
    c.record.train_per_example = True
    c.parallel.shard_table_mib = 0  # split the N x K table over all devices of both processes
    c.eval.num_train_examples = 32  # evaluation costs most of the tiny run's time
    c.final_eval.cw = False
    # The final report's attack as the epochs': the same program, compiled (and cached) once.
    c.final_eval.pgd_steps = c.eval.pgd_steps
    return c


def autoattack_of_mlp():
    """A short AutoAttack (APGD-T and Square) of a small trained MLP on 32 synthetic points."""
    from jax_memat.attacks.autoattack import autoattack
    from tests.helpers import mlp_apply, train_mlp

    rng = np.random.default_rng(0)
    means = rng.uniform(0.3, 0.7, (10, 6, 6, 2))
    y = rng.integers(0, 10, 288)
    x = np.clip(means[y] + 0.25 * rng.normal(size=(288, 6, 6, 2)), 0.0, 1.0).astype(np.float32)
    variables = train_mlp(x[:256], y[:256].astype(np.int32), 10, seed=1, steps=150)
    return autoattack(
        mlp_apply,
        variables,
        x[256:],
        y[256:].astype(np.int32),
        eps=0.05,
        norm="linf",
        key=jax.random.key(0),
        chunk_size=16,
        version="custom",
        # Two of the four attacks keep the compilations short; what is checked (the chunks
        # split over both processes, gathered back, the same bookkeeping) is the ensemble's.
        attacks=("apgd-t", "square"),
        n_target_classes=2,
        n_iter=8,
        n_queries=30,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(command, folder: str, name: str, expect=(0, 0)) -> list[str]:
    """Runs ``command(address, process_id)`` in two processes; returns their outputs.

    Both are killed (with their children) when one ends with another exit code
    than ``expect`` says or when ``LAUNCH_TIMEOUT_S`` passes; the test then fails
    with the end of both outputs.
    """
    env = dict(os.environ)
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
    )
    address = f"localhost:{_free_port()}"
    logs = [os.path.join(folder, f"{name}_{i}.log") for i in range(2)]
    procs = []
    for i in range(2):
        with open(logs[i], "w") as log:
            procs.append(
                subprocess.Popen(
                    command(address, i),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=REPO,
                    start_new_session=True,  # its own process group: killed with its children
                )
            )
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            wrong = [p for p, e in zip(procs, expect, strict=True) if p.poll() not in (None, e)]
            if wrong or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    texts = []
    for log in logs:
        with open(log) as f:
            texts.append(f.read())
    codes = [p.returncode for p in procs]
    if codes != list(expect):
        tails = "\n".join(f"--- process {i} ---\n{t[-4000:]}" for i, t in enumerate(texts))
        pytest.fail(
            f"{name}: the two processes ended with {codes}, expected {list(expect)} (limit "
            f"{LAUNCH_TIMEOUT_S} s):\n{tails}"
        )
    return texts


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of the module: the one-process ones here, the two-process ones in one launch."""
    root = tmp_path_factory.mktemp("multiprocess")
    path = {name: str(root / name) for name in ("full", "chain", "locked")}
    assert jax.device_count() == 8, "conftest must simulate 8 CPU devices"
    train_and_evaluate(run_config(EPOCHS), path["full"])
    with pytest.raises(StopAtStep):
        train_and_evaluate(run_config(EPOCHS), path["chain"], hooks=[stop_at_step(STOP_ONE)])
    assert [r["epoch"] for r in read_metrics(path["chain"])] == [1]
    os.makedirs(path["locked"])
    steps = [
        {"kind": "rows", "batch_size": 16, "out": str(root)},
        {
            "kind": "train",
            "workdir": path["chain"],
            "epochs": EPOCHS,
            "stop_after_step": STOP_TWO,
            "out": str(root),
        },
        {"kind": "autoattack", "out": str(root / "autoattack.npz")},
    ]
    task = str(root / "task.json")
    with open(task, "w") as f:
        json.dump({"steps": steps}, f)
    logs = _launch(lambda a, i: [sys.executable, WORKER, a, "2", str(i), task], str(root), "worker")
    # The CLI over two processes, on a workdir whose lock this test holds.
    lock = WorkdirLock(path["locked"])
    lock.acquire()
    try:
        cli = _launch(
            lambda a, i: [
                sys.executable,
                "-m",
                "jax_memat.main",
                "--config=tests/tiny_cli_config.py:1",
                f"--workdir={path['locked']}",
                f"--coordinator_address={a}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            str(root),
            "cli",
            expect=(3, 3),
        )
    finally:
        lock.release()
    assert [r["epoch"] for r in read_metrics(path["chain"])] == [1, 2]
    train_and_evaluate(run_config(EPOCHS), path["chain"])
    return {"root": str(root), "logs": logs, "cli": cli, **path}


def test_each_process_feeds_its_rows_of_the_global_batch(runs):
    found = [np.load(os.path.join(runs["root"], f"rows_{i}.npz")) for i in range(2)]
    assert [int(f["process_count"]) for f in found] == [2, 2]
    rows = [f["rows"] for f in found]
    # Disjoint halves (four devices each) that cover the global batch.
    assert len(rows[0]) == len(rows[1]) == 8
    np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(16))
    for f, r in zip(found, rows, strict=True):
        # Each process holds exactly its rows of the global indices, and gets them all back.
        np.testing.assert_array_equal(f["local"], f["indices"][r])
        np.testing.assert_array_equal(f["gathered"], f["indices"])
    np.testing.assert_array_equal(found[0]["indices"], found[1]["indices"])


def _rows(workdir):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_metrics(workdir)]


def _assert_rows_close(rows_a, rows_b, scale_ulps):
    assert [r["epoch"] for r in rows_a] == [r["epoch"] for r in rows_b] == [1, 2, 3]
    for a, b in zip(rows_a, rows_b, strict=True):
        assert set(a) == set(b)
        for k in a:
            if k.endswith("_accuracy"):  # counts of examples: exact
                assert a[k] == b[k], (a["epoch"], k)
            else:
                np.testing.assert_allclose(a[k], b[k], rtol=scale_ulps * F32_EPS, err_msg=k)


def _assert_states_close(workdir_a, workdir_b, scale_ulps):
    a, b = load_run(workdir_a, "final"), load_run(workdir_b, "final")
    assert a.meta["epoch"] == b.meta["epoch"] == EPOCHS
    table = a.state.objective_state["temporal_ensembling"]["soft_labels"]
    # The table is split over the eight devices, and TE filled it during epochs 2-3.
    assert table.sharding.spec[0] == "data"
    assert float(np.abs(np.asarray(table)).sum()) > 0
    leaves_a = jax.tree.leaves_with_path(a.state)
    for (path, x), y in zip(leaves_a, jax.tree.leaves(b.state), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if not np.issubdtype(x.dtype, np.floating):
            np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
            continue
        # Round-off of the gradient all-reduce, carried through a few steps: relative to
        # the leaf's own size.
        bound = scale_ulps * F32_EPS * max(float(np.abs(x).max()), 1e-30)
        np.testing.assert_allclose(x, y, rtol=0, atol=bound, err_msg=jax.tree_util.keystr(path))


def _assert_records_equal(workdir_a, workdir_b, scale_ulps):
    folder_a, folder_b = (os.path.join(w, "per_example") for w in (workdir_a, workdir_b))
    names = sorted(os.listdir(folder_a))
    assert names == sorted(os.listdir(folder_b))
    assert "train_steps_epoch0002.npz" in names and "test_epoch0002.npz" in names
    for name in names:
        with (
            np.load(os.path.join(folder_a, name)) as fa,
            np.load(os.path.join(folder_b, name)) as fb,
        ):
            assert sorted(fa.files) == sorted(fb.files)
            for key in fa.files:
                x, y = fa[key], fb[key]
                if np.issubdtype(x.dtype, np.floating):  # losses and margins of size ~1-10
                    bound = scale_ulps * F32_EPS * max(float(np.nanmax(np.abs(x))), 1.0)
                    np.testing.assert_allclose(x, y, rtol=0, atol=bound, err_msg=name + key)
                else:  # indices, labels, correctness: exact
                    np.testing.assert_array_equal(x, y, err_msg=f"{name}: {key}")


def test_run_through_one_two_and_one_process_equals_one_process(runs):
    # Epoch 2 was trained by the two processes (from one process's checkpoint), epochs
    # 1 and 3 here (epoch 3 from the two processes' checkpoint).
    assert "Resumed" in runs["logs"][0] and "epoch    2 |" in runs["logs"][0]
    assert "epoch    2 |" not in runs["logs"][1]  # process 1 prints nothing of its own
    _assert_rows_close(_rows(runs["chain"]), _rows(runs["full"]), ULPS)
    _assert_states_close(runs["chain"], runs["full"], ULPS)
    _assert_records_equal(runs["chain"], runs["full"], ULPS)
    with open(os.path.join(runs["full"], "final_report.json")) as f:
        full = json.load(f)
    with open(os.path.join(runs["chain"], "final_report.json")) as f:
        chain = json.load(f)
    assert chain.keys() == full.keys()
    for name in ("best", "final"):
        assert chain[name]["epoch"] == full[name]["epoch"]
        for k, v in full[name].items():
            if k.endswith("_accuracy"):
                assert chain[name][k] == v, (name, k)


def test_a_signal_to_one_process_stops_both_at_the_same_step(runs):
    told = []
    for i in range(2):
        with open(os.path.join(runs["root"], f"stopped_{i}.json")) as f:
            told.append(json.load(f))
    # Process 1 got SIGTERM after step 8 (epoch 3); both stopped there, epoch 2 kept.
    for t in told:
        assert t["exit_code"] == 128 + signal.SIGTERM
        assert t["message"].startswith("Stopped by SIGTERM during epoch 3. The last finished ")
        assert "epoch (2) is saved" in t["message"]
    assert [r["epoch"] for r in read_metrics(runs["chain"])] == [1, 2, 3]  # then resumed here


def test_autoattack_over_two_processes_equals_one_process(runs):
    here = autoattack_of_mlp()
    with np.load(os.path.join(runs["root"], "autoattack.npz")) as two:
        np.testing.assert_array_equal(two["robust"], here.robust)
        np.testing.assert_array_equal(two["x_adv"], here.x_adv)
    # The attack broke some points and not others: the comparison saw both.
    assert 0 < here.robust.sum() < here.clean_accuracy * len(here.robust)


def test_a_failed_check_in_process_zero_stops_both(runs):
    # Process 0 cannot take the lock; process 1 stops with its message and exit code.
    zero, one = (text.splitlines() for text in runs["cli"])
    errors = [[line for line in lines if line.startswith("error: ")] for lines in (zero, one)]
    assert len(errors[0]) == len(errors[1]) == 1, runs["cli"]
    assert errors[0][0].startswith("error: The workdir ")
    assert "is in use by another run (pid " in errors[0][0]
    assert errors[1][0].startswith("error: process 0 of the run stopped: The workdir ")
    assert "is in use by another run (pid " in errors[1][0]
    assert not any("Traceback" in text for text in runs["cli"])
    # Nothing was written in the locked workdir.
    assert sorted(os.listdir(runs["locked"])) == [".lock"]
