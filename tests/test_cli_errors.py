"""The CLIs' expected failures, table-driven: message, exit code, and an untouched workdir.

Every row runs the real entry point in a subprocess and checks that it ends
with one ``error:`` message naming what is wrong and what is accepted, the
documented exit code (``jax_memat.experiment.errors``), no traceback, and a
workdir byte-identical to what it was before.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from jax_memat.experiment import train_and_evaluate
from jax_memat.experiment.workdir import WorkdirLock
from tests.test_run import REPO, snapshot, tiny_config

TINY = "--config=tests/tiny_cli_config.py"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-epoch run of the tiny config (what tests/tiny_cli_config.py:1 gives)."""
    workdir = str(tmp_path_factory.mktemp("finished") / "run")
    train_and_evaluate(tiny_config(epochs=1), workdir)
    return workdir


def _copy_of(finished, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(finished, dst)
    return dst


def _file(finished, tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder\n")
    return str(path)


def _other_config(finished, tmp_path):
    workdir = _copy_of(finished, tmp_path)
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["seed"] = 7
    with open(path, "w") as f:
        json.dump(config, f)
    return workdir


def _truncate(name):
    def prepare(finished, tmp_path):
        workdir = _copy_of(finished, tmp_path)
        path = os.path.join(workdir, name)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        return workdir

    return prepare


def _without_config(finished, tmp_path):
    workdir = _copy_of(finished, tmp_path)
    os.remove(os.path.join(workdir, "config.json"))
    return workdir


def _empty(finished, tmp_path):
    return str(tmp_path / "new")


TRAIN = "jax_memat.main"
EVAL = "jax_memat.evaluate"

# (id, module, arguments, prepare the workdir, exit code, message fragments)
CASES = [
    ("unknown-field", TRAIN, [TINY, "--config.epoch=3"], _empty, 2,
     ["unknown config field 'epoch'", 'Did you mean "epochs"']),
    ("no-such-field", TRAIN, [TINY, "--config.nosuchfield=1"], _empty, 2,
     ["unknown config field 'nosuchfield'", "default_config"]),
    ("float-for-int", TRAIN, [TINY, "--config.epochs=1.5"], _empty, 2,
     ["--config.epochs=1.5", "invalid literal for int()"]),
    ("bad-cell", TRAIN, ["--config=configs/te.py:cifar10,preact18,nope"], _empty, 2,
     ["te.py takes 'DATASET,MODEL,OBJECTIVE'", "'pgd_at', 'pgd_at_te', 'trades', 'trades_te'"]),
    ("seed-negative", TRAIN, [TINY, "--config.seed=-1"], _empty, 2,
     ["seed=-1 is out of range; accepted: an integer in [0, 4294967295]"]),
    ("seed-too-big", TRAIN, [TINY, f"--config.seed={2**40}"], _empty, 2,
     [f"seed={2**40} is out of range"]),
    ("crop-padding", TRAIN, [TINY, "--config.dataset.crop_padding=1000000"], _empty, 2,
     ["dataset.crop_padding=1000000 is larger than the images (8x8)", "[0, 8]"]),
    ("batch-vs-devices", TRAIN, [TINY, "--config.batch_size=12"], _empty, 2,
     ["batch_size=12 does not split over the 8 devices", "e.g. 8 or 16"]),
    ("eval-batch-vs-devices", TRAIN, [TINY, "--config.eval.batch_size=9"], _empty, 2,
     ["eval.batch_size=9 does not split over the 8 devices"]),
    ("model-too-wide", TRAIN, [TINY, "--config.model.cnn_width=100000"], _empty, 5,
     ["This run needs at least", "parameters", "model.cnn_width"]),
    ("dataset-too-big", TRAIN, [TINY, f"--config.dataset.num_train_examples={10**9}"], _empty, 5,
     ["This run needs at least", "data "]),
    ("workdir-is-a-file", TRAIN, [TINY], _file, 3, ["is a file, not a folder"]),
    ("other-config", TRAIN, [TINY], _other_config, 3,
     ["holds a run of a different config", "seed: saved 7, now 0"]),
    ("corrupt-config", TRAIN, [TINY], _truncate("config.json"), 3,
     ["config.json is corrupt", "cut short by a failed write"]),
    ("corrupt-labels", TRAIN, ["--config=tests/tiny_cli_config.py:2"], _truncate("labels.npz"), 3,
     ["labels.npz is corrupt", "move it away"]),
    ("corrupt-report", TRAIN, ["--config=tests/tiny_cli_config.py:1"],
     _truncate("final_report.json"), 3, ["final_report.json is corrupt"]),
    ("checkpoints-without-config", TRAIN, [TINY], _without_config, 3,
     ["but no config.json", "refusing to start a new run over them"]),
    ("eval-eps", EVAL, ["--eps=5"], _copy_of, 2,
     ["eps must be in [0, 1] under L-inf", "got 5.0"]),
    ("eval-batch-zero", EVAL, ["--batch_size=0"], _copy_of, 2,
     ["batch_size=0 is invalid; accepted: a positive multiple of 8"]),
    ("eval-steps", EVAL, ["--steps=0"], _copy_of, 2, ["steps=0 is invalid"]),
    ("eval-unknown-checkpoint", EVAL, ["--checkpoint=77"], _copy_of, 3,
     ["keeps no 77 checkpoint", "latest: steps [3]"]),
    ("eval-no-run", EVAL, [], _empty, 3, ["holds no training run (config.json is missing)"]),
    ("eval-output-under-a-file", EVAL, ["--output=tests/__init__.py/x.json"], _copy_of, 3,
     ["output folder", "tests/__init__.py is a file, not a folder"]),
    ("eval-unknown-attack", EVAL, ["--attack=fgsm"], _copy_of, 2,
     ["--attack", "fgsm"]),
    ("processes-partial", TRAIN, [TINY, "--num_processes=2"], _empty, 2,
     ["num_processes given without coordinator_address, process_id", "give all three"]),
    ("processes-id", TRAIN,
     [TINY, "--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=2"],
     _empty, 2, ["process_id=2; accepted: an integer in [0, 1] (num_processes=2)"]),
    ("processes-port", EVAL,
     ["--coordinator_address=localhost", "--num_processes=2", "--process_id=0"], _copy_of, 2,
     ["coordinator_address='localhost' has no port; accepted: host:port"]),
    ("processes-analyze", "jax_memat.analyze", ["memorization", "--num_processes=1"], _copy_of,
     2, ["are not accepted here: this command runs in one process"]),
]  # fmt: skip


@pytest.mark.parametrize(
    "module,args,prepare,code,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_expected_failure(tmp_path, finished, module, args, prepare, code, fragments):
    workdir = prepare(finished, tmp_path)
    before = snapshot(workdir) if os.path.isdir(workdir) else None
    before_file = open(workdir).read() if os.path.isfile(workdir) else None
    cmd = [sys.executable, "-m", module, f"--workdir={workdir}", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "error: " in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr[-3000:])
    if before is not None:
        assert snapshot(workdir) == before
    elif before_file is not None:
        assert open(workdir).read() == before_file
    else:
        assert not os.path.exists(workdir)
    # --debug adds the traceback of the same failure.
    if module == TRAIN and code != 2:
        debug = subprocess.run([*cmd, "--debug"], cwd=REPO, capture_output=True, text=True)
        assert debug.returncode == code and "Traceback" in debug.stderr


def test_locked_workdir(tmp_path, finished):
    workdir = _copy_of(finished, tmp_path)
    with WorkdirLock(workdir):
        before = snapshot(workdir)
        cmd = [sys.executable, "-m", TRAIN, TINY, f"--workdir={workdir}"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert f"in use by another run (pid {os.getpid()} on" in proc.stderr
    assert snapshot(workdir) == before


def test_read_only_workdir(finished):
    """As a user who cannot write there (root runs the CLI as 'nobody' for this)."""
    base = tempfile.mkdtemp()  # outside pytest's 0700 folders, so 'nobody' can reach it
    try:
        os.chmod(base, 0o755)
        workdir = os.path.join(base, "run")
        shutil.copytree(finished, workdir)
        cmd = [sys.executable, "-m", TRAIN, "--config=tests/tiny_cli_config.py:2"]
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.fail("running as root needs setpriv (util-linux) to act as another user")
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        else:
            os.chmod(workdir, 0o555)
        before = snapshot(workdir)
        env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
        env["HOME"] = base
        proc = subprocess.run(
            [*cmd, f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, env=env
        )
        os.chmod(workdir, 0o755)
        assert proc.returncode == 3, proc.stderr[-3000:]
        assert "is not writable by this user; nothing was written" in proc.stderr
        assert snapshot(workdir) == before
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("module", [TRAIN, EVAL])
def test_help_exits_zero(module):
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--workdir" in proc.stdout and "--debug" in proc.stdout
    for flag in ("--coordinator_address", "--num_processes", "--process_id"):
        assert flag in proc.stdout


def test_unexpected_error_keeps_its_traceback(tmp_path):
    """A bug is not dressed up as an expected failure: exit 1 with the traceback."""
    script = tmp_path / "bug.py"
    script.write_text(
        "from jax_memat.experiment import cli\n"
        "def main(argv):\n"
        "    raise ZeroDivisionError('a bug')\n"
        "cli.run(main)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ZeroDivisionError: a bug" in proc.stderr
