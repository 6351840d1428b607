"""Fault injection: every fault ends with nothing lost and a clear message.

Each test damages a run the way a real fault would (a kill during a save, a
truncated checkpoint, a torn metrics line, a missing config, a second run on
the same workdir, a failed write, a signal mid-epoch, a full disk) and checks
both halves: the message says what happened and what was kept, and the run,
resumed, ends exactly where an uninterrupted run ends (or the workdir is left
byte for byte as it was).
"""

import errno
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jax_memat.experiment import (
    CorruptFileError,
    ResourceError,
    RunCheckpoints,
    WorkdirConflictError,
    WorkdirLockedError,
    load_run,
    read_metrics,
    train_and_evaluate,
)
from jax_memat.experiment.checkpoints import UnreadableCheckpointError
from jax_memat.experiment.metrics import TIMING_FIELDS
from jax_memat.experiment.workdir import WorkdirLock
from tests.helpers import StopAtStep, stop_at_step
from tests.test_run import REPO, snapshot, tiny_config

TESTS = os.path.dirname(os.path.abspath(__file__))


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 3-epoch run: what every recovered run must equal."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    report = train_and_evaluate(tiny_config(epochs=3), workdir)
    return workdir, report


def assert_same_run(workdir, reference):
    ref_dir, ref_report = reference
    assert _strip(read_metrics(workdir)) == _strip(read_metrics(ref_dir))
    run_a, run_b = load_run(ref_dir, "final"), load_run(workdir, "final")
    assert run_a.meta["epoch"] == run_b.meta["epoch"] == 3
    for a, b in zip(jax.tree.leaves(run_a.state), jax.tree.leaves(run_b.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with open(os.path.join(workdir, "final_report.json")) as f:
        import json

        assert json.load(f) == ref_report


def _killed_in_epoch_three(workdir):
    """A run stopped during epoch 3: latest keeps epochs 1 and 2 (steps 3 and 6)."""
    with pytest.raises(StopAtStep):
        train_and_evaluate(tiny_config(epochs=3), workdir, hooks=[stop_at_step(8)])
    ckpts = RunCheckpoints(workdir)
    try:
        assert ckpts.steps("latest") == [3, 6]
    finally:
        ckpts.close()


# --------------------------------------------------------------------------- checkpoints


def test_truncated_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, reference, capfd):
    workdir = str(tmp_path / "run")
    _killed_in_epoch_three(workdir)
    data = sorted(glob.glob(f"{workdir}/checkpoints/latest/6/state/**/d/*", recursive=True))
    victim = max(data, key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    capfd.readouterr()
    train_and_evaluate(tiny_config(epochs=3), workdir)
    err = capfd.readouterr().err
    # The warning names the damaged file and where the checkpoint was moved.
    assert victim in err and "truncated" in err
    assert "Moved it to" in err and "kept, not deleted" in err
    moved = glob.glob(f"{workdir}/checkpoints/corrupt/latest-6-*")
    assert len(moved) == 1  # set aside, not deleted
    assert_same_run(workdir, reference)


def test_missing_checkpoint_metadata_is_detected(tmp_path, reference, capfd):
    workdir = str(tmp_path / "run")
    _killed_in_epoch_three(workdir)
    for name in ("_METADATA", "manifest.ocdbt"):
        for p in glob.glob(f"{workdir}/checkpoints/latest/6/state/{name}"):
            os.remove(p)
    capfd.readouterr()
    train_and_evaluate(tiny_config(epochs=3), workdir)
    err = capfd.readouterr().err
    assert re.search(r"latest/6/state/(_METADATA|manifest\.ocdbt) is missing", err), err
    assert_same_run(workdir, reference)


def test_no_intact_checkpoint_names_every_damaged_one(tmp_path):
    workdir = str(tmp_path / "run")
    _killed_in_epoch_three(workdir)
    for p in glob.glob(f"{workdir}/checkpoints/*/*/state/_METADATA"):
        os.remove(p)
    with pytest.raises(CorruptFileError) as err:
        train_and_evaluate(tiny_config(epochs=3), workdir)
    text = str(err.value)
    assert "No intact checkpoint is left" in text
    for kind, step in (("latest", 6), ("latest", 3), ("init", 0)):
        assert f"{kind}/{step}/state/_METADATA is missing" in text
    # Nothing was deleted: every damaged checkpoint is kept aside.
    assert len(glob.glob(f"{workdir}/checkpoints/corrupt/*")) == 4  # two latest, best, init


@pytest.mark.parametrize("when", ["before_commit", "before_manifest"])
def test_kill_during_a_save_loses_nothing(tmp_path, reference, when):
    """SIGKILL inside the first 'latest' save (orbax's rename, or our manifest)."""
    workdir = str(tmp_path / "run")
    script = tmp_path / "killer.py"
    script.write_text(
        f"""
import os, signal, sys
sys.path.insert(0, {REPO!r})
from tests.test_run import tiny_config
if {when!r} == "before_commit":
    _rename = os.rename
    def rename(src, dst, *a, **k):
        if str(dst).endswith("checkpoints/latest/3"):
            os.kill(os.getpid(), signal.SIGKILL)
        return _rename(src, dst, *a, **k)
    os.rename = rename
else:
    import jax_memat.experiment.checkpoints as c
    _write = c.write_json
    def write_json(path, obj):
        if "latest/3/" in path:
            os.kill(os.getpid(), signal.SIGKILL)
        return _write(path, obj)
    c.write_json = write_json
from jax_memat.experiment import train_and_evaluate
train_and_evaluate(tiny_config(epochs=3), {workdir!r})
"""
    )
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [r["epoch"] for r in read_metrics(workdir)] == [1]  # row written, save cut
    train_and_evaluate(tiny_config(epochs=3), workdir)
    assert_same_run(workdir, reference)


def test_save_failure_surfaces_at_the_save_that_failed(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    original = ocp.CheckpointManager.save
    steps_run = []

    def save(self, step, *args, **kwargs):
        if step == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(ResourceError) as err:
        train_and_evaluate(
            tiny_config(epochs=3), workdir, hooks=[lambda step, *_: steps_run.append(step)]
        )
    assert "checkpoint of epoch 2" in str(err.value) and "No space left" in str(err.value)
    assert "The last finished epoch before it (1) is kept" in str(err.value)
    assert max(steps_run) == 6  # raised at that save, not an epoch later
    monkeypatch.undo()
    run = load_run(workdir, "latest")
    assert run.meta["epoch"] == 1


# --------------------------------------------------------------------------- files of the run


def test_torn_metrics_line_is_dropped_with_a_warning(tmp_path, reference, capfd):
    workdir = str(tmp_path / "run")
    _killed_in_epoch_three(workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"epoch": 3, "train_loss": 2.3')  # a write cut short
    capfd.readouterr()
    train_and_evaluate(tiny_config(epochs=3), workdir)
    assert "dropped a torn last line" in capfd.readouterr().err
    assert_same_run(workdir, reference)


def test_damaged_metrics_line_before_the_last_is_named(tmp_path):
    workdir = str(tmp_path / "run")
    _killed_in_epoch_three(workdir)
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        lines = f.readlines()
    with open(path, "w") as f:
        f.writelines(["{not json\n", *lines[1:]])
    before = snapshot(workdir)
    with pytest.raises(CorruptFileError, match=r"metrics.jsonl, line 1, is corrupt"):
        train_and_evaluate(tiny_config(epochs=3), workdir)
    assert snapshot(workdir) == before


def test_checkpoints_without_config_are_not_overwritten(tmp_path):
    workdir = str(tmp_path / "run")
    _killed_in_epoch_three(workdir)
    os.remove(os.path.join(workdir, "config.json"))
    before = snapshot(workdir)
    with pytest.raises(WorkdirConflictError) as err:
        train_and_evaluate(tiny_config(epochs=3), workdir)
    assert "no config.json" in str(err.value) and "checkpoints: " in str(err.value)
    assert snapshot(workdir) == before


def test_deleted_latest_checkpoint_is_not_restarted_over(tmp_path):
    workdir = str(tmp_path / "run")
    _killed_in_epoch_three(workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "latest"))
    before = snapshot(workdir)
    with pytest.raises(WorkdirConflictError, match="no checkpoints/latest to resume from"):
        train_and_evaluate(tiny_config(epochs=3), workdir)
    assert snapshot(workdir) == before


def test_finished_run_is_not_rewritten_and_can_be_extended(tmp_path, reference, capfd):
    workdir = str(tmp_path / "run")
    report = train_and_evaluate(tiny_config(epochs=2), workdir)
    before = snapshot(workdir)
    capfd.readouterr()
    assert train_and_evaluate(tiny_config(epochs=2), workdir) == report
    assert "has finished all 2 epochs; nothing to do" in capfd.readouterr().out
    assert snapshot(workdir) == before
    # Raising epochs extends it, to exactly the 3-epoch run.
    train_and_evaluate(tiny_config(epochs=3), workdir)
    assert_same_run(workdir, reference)


# --------------------------------------------------------------------------- the lock


def test_second_run_on_a_locked_workdir_is_refused(tmp_path):
    workdir = str(tmp_path / "run")
    with WorkdirLock(workdir):
        with pytest.raises(WorkdirLockedError) as err:
            train_and_evaluate(tiny_config(epochs=1), workdir)
    assert f"pid {os.getpid()}" in str(err.value) and "nothing was written" in str(err.value)
    assert sorted(os.listdir(workdir)) == [".lock"]


def test_stale_lock_of_a_dead_process_does_not_block(tmp_path):
    workdir = str(tmp_path / "run")
    # A process that took the lock and died: its lock file stays, its flock is gone.
    code = (
        f"from jax_memat.experiment.workdir import WorkdirLock; WorkdirLock({workdir!r}).acquire()"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
    assert os.path.exists(os.path.join(workdir, ".lock"))
    report = train_and_evaluate(tiny_config(epochs=1), workdir)
    assert report["final"]["epoch"] == 1


# --------------------------------------------------------------------------- the CLI


def _cli(workdir, *extra, shell_prefix=""):
    config = os.path.join(TESTS, "tiny_cli_config.py")
    cmd = [sys.executable, "-m", "jax_memat.main", f"--config={config}", f"--workdir={workdir}"]
    cmd = [*cmd, *extra]
    if shell_prefix:  # e.g. ulimit: set in a shell that then execs the CLI
        cmd = ["bash", "-c", f"{shell_prefix}; exec {shlex.join(cmd)}"]
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_run_keeps_the_last_finished_epoch(tmp_path, reference, signum):
    workdir = str(tmp_path / "run")
    proc = _cli(workdir)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and read_metrics(workdir):
            break
        time.sleep(0.05)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in err
    name = signal.Signals(signum).name
    m = re.search(rf"Stopped by {name} during (epoch \d+|the final report)\. (.*) saved", err)
    assert m, err[-2000:]
    saved = load_run(workdir, "latest").meta["epoch"]
    expected = (
        f"The last finished epoch ({saved}) is"
        if m.group(1).startswith("epoch")
        else f"all {saved} epochs are"
    )
    assert m.group(2) == expected
    assert [r["epoch"] for r in read_metrics(workdir)] == list(range(1, saved + 1))
    proc = _cli(workdir)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert_same_run(workdir, reference)


def test_failed_write_at_start_leaves_no_partial_file(tmp_path):
    workdir = str(tmp_path / "run")

    # Files are limited to 1 KiB (config.json is larger); SIGXFSZ is ignored (Python
    # ignores it anyway), so a write past the limit fails with EFBIG.
    proc = _cli(workdir, shell_prefix="ulimit -f 1; trap '' XFSZ")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 5, err[-2000:]
    assert "File too large" in err and "what was on disk before is intact" in err
    assert "Traceback" not in err
    # config.json (2-3 KB) could not be written: no truncated copy, no temporary file left.
    assert sorted(os.listdir(workdir)) == [".lock"]
    proc = _cli(workdir)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]


def test_run_saved_before_a_config_field_existed_resumes(tmp_path, reference):
    """A config.json without a field added later resumes with that field's default."""
    import json

    workdir = str(tmp_path / "run")
    _killed_in_epoch_three(workdir)
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        saved = json.load(f)
    del saved["attack"]["clip_start"], saved["model"]["bn_unbiased_var"]
    with open(path, "w") as f:
        json.dump(saved, f)
    train_and_evaluate(tiny_config(epochs=3), workdir)
    assert_same_run(workdir, reference)


def test_intact_checkpoint_of_another_train_state_is_never_set_aside(tmp_path):
    """An intact checkpoint that does not fit this version's state stops the run, untouched."""
    import flax

    @flax.struct.dataclass
    class State:
        step: jax.Array
        w: jax.Array

    workdir = str(tmp_path / "run")
    ckpts = RunCheckpoints(workdir)
    ckpts.save("latest", State(jax.numpy.int32(3), jax.numpy.ones(3)), {"epoch": 1})
    ckpts.save("init", State(jax.numpy.int32(0), jax.numpy.zeros(3)), {"epoch": 0})
    before = snapshot(workdir)
    other = State(jax.numpy.int32(0), jax.numpy.zeros(4))  # another shape: another version
    with pytest.raises(UnreadableCheckpointError) as err:
        ckpts.restore_newest(other)
    ckpts.close()
    assert "Its files match their manifest, so it is intact" in str(err.value)
    assert "latest/3" in str(err.value) and "left in place" in str(err.value)
    assert snapshot(workdir) == before  # not moved, and init was not tried instead
