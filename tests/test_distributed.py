"""The multi-process plumbing in one process: arguments, detection, agreement, table layout.

The runs over two processes are in ``tests/test_multiprocess.py``; here are the
parts that need no second process: ``jax_memat.distributed``'s argument
checks and cluster detection, its collectives' one-process behaviour,
``together``, and the split temporal-ensembling table (same numbers as the
replicated one, a share of the memory).
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jax_memat import distributed
from jax_memat.experiment import default_config
from jax_memat.experiment.config import ConfigError, shard_min_bytes, validate_config
from jax_memat.experiment.errors import OtherProcessError, WorkdirLockedError, exit_code
from jax_memat.experiment.processes import together
from jax_memat.models import get_model, make_apply_fn
from jax_memat.objectives import make_objective, with_temporal_ensembling
from jax_memat.parallel import make_mesh, process_rows, shard_batch, state_shardings, to_host
from jax_memat.training import create_train_state, make_optimizer, make_train_step
from tests.test_training import _batch

CLUSTER_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK",
)


@pytest.fixture
def no_cluster(monkeypatch):
    """An environment without any launcher JAX could detect."""
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_PCI_DEVICES", "/nonexistent-pci-devices")


@pytest.mark.parametrize(
    "args",
    [
        ("10.0.0.1:1234", 2, 0),
        ("node001:29500", 4, 3),
        ("[::1]:1234", 2, 1),
        ("localhost:1", 1, 0),
        (None, None, None),
        (None, 1, None),
    ],
)
def test_accepted_launch_arguments(args):
    distributed.check_arguments(*args)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((None, 2, None), "num_processes given without coordinator_address, process_id"),
        (("h:1", None, 0), "given without num_processes: give all three"),
        ((None, 2, 1), "or none of them to let JAX detect the cluster"),
        (("h:1", 2, 2), r"process_id=2; accepted: an integer in \[0, 1\]"),
        (("h:1", 2, -1), r"process_id=-1; accepted: an integer in \[0, 1\]"),
        (("h:1", 0, 0), "num_processes=0; accepted: an integer >= 1"),
        (("h:1", True, 0), "num_processes=True; accepted: an integer >= 1"),
        (("localhost", 2, 0), "has no port; accepted: host:port"),
        (("localhost:0", 2, 0), r"the port must be an integer in \[1, 65535\]"),
        (("localhost:http", 2, 0), r"the port must be an integer in \[1, 65535\]"),
        ((":1234", 2, 0), "has no valid host"),
        (("::1:1234", 2, 0), "write an IPv6 host in brackets"),
    ],
)
def test_bad_launch_arguments_say_what_is_accepted(args, match):
    with pytest.raises(ValueError, match=match):
        distributed.check_arguments(*args)


def test_bad_arguments_are_refused_before_anything_starts(no_cluster):
    with pytest.raises(ValueError, match="has no port"):
        distributed.initialize("localhost", 2, 0)
    assert not jax.distributed.is_initialized()


def test_one_process_without_a_cluster_is_a_no_op(no_cluster):
    assert distributed.detect_cluster() is None
    assert distributed.initialize() is False
    assert distributed.initialize(num_processes=1) is False
    assert not jax.distributed.is_initialized()
    assert jax.process_count() == 1 and distributed.is_main_process()


def test_cluster_detection_from_the_launchers_variables(no_cluster, monkeypatch):
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "0"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    # JAX's SLURM detection also needs SLURM_LOCALID; without it, it is not a launch.
    assert distributed.detect_cluster() is None
    monkeypatch.setenv("SLURM_LOCALID", "0")
    slurm["SLURM_LOCALID"] = "0"
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.detect_cluster() is None  # one task: one process, nothing to start
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed.detect_cluster() == "slurm"
    # num_processes=1 alone keeps one process even inside a detected cluster.
    assert distributed.initialize(num_processes=1) is False
    for k in slurm:
        monkeypatch.delenv(k)
    ompi = {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_RANK": "0"}
    for k, v in ompi.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert distributed.detect_cluster() == "openmpi"


def test_tpu_detection_reads_the_pci_vendor(no_cluster, monkeypatch, tmp_path):
    # A VFIO device of another vendor (a GPU host) is not a TPU; Google's vendor id is.
    monkeypatch.setattr(distributed, "_PCI_DEVICES", str(tmp_path))
    # JAX sets TPU_SKIP_MDS_QUERY on hosts it finds without a TPU (this one).
    monkeypatch.delenv("TPU_SKIP_MDS_QUERY", raising=False)
    (tmp_path / "0000:00:04.0").mkdir()
    (tmp_path / "0000:00:04.0" / "vendor").write_text("0x10de\n")
    assert distributed.detect_cluster() is None
    (tmp_path / "0000:00:05.0").mkdir()
    (tmp_path / "0000:00:05.0" / "vendor").write_text("0x1ae0\n")
    assert distributed.detect_cluster() == "tpu"
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
    assert distributed.detect_cluster() is None


def test_collectives_in_one_process():
    distributed.barrier("alone")  # returns at once
    assert distributed.all_gather_bytes(b"verdict") == [b"verdict"]
    mesh = make_mesh()
    np.testing.assert_array_equal(process_rows(16, mesh), np.arange(16))
    x = np.arange(16, dtype=np.int32)
    np.testing.assert_array_equal(to_host(shard_batch(x, mesh)), x)
    with pytest.raises(ValueError, match="multiple of the number of devices"):
        process_rows(12, mesh)


def test_together_in_one_process_runs_the_check():
    assert together(lambda: 3) == 3
    assert together(lambda: 4, main_only=True) == 4

    def locked():
        raise WorkdirLockedError("in use")

    with pytest.raises(WorkdirLockedError):  # the check's own error, not a wrapper
        together(locked, main_only=True)


def test_another_process_failure_keeps_its_exit_code():
    err = OtherProcessError(0, 3, "The workdir w is in use by another run.")
    assert exit_code(err) == 3
    assert str(err) == "process 0 of the run stopped: The workdir w is in use by another run."


def test_shard_table_config_field():
    config = default_config()
    assert shard_min_bytes(config) == 64 * 2**20  # the documented default
    config.parallel.shard_table_mib = 0.5
    assert shard_min_bytes(config) == 2**19
    config.parallel.shard_table_mib = -1
    assert shard_min_bytes(config) is None
    validate_config(config)
    for bad in (-2, -0.5, float("inf")):
        config.parallel.shard_table_mib = bad
        with pytest.raises(ConfigError, match="parallel.shard_table_mib=.* accepted: a number"):
            validate_config(config)


def test_state_shardings_split_large_tables_only():
    mesh = make_mesh()
    tree = {
        "table": np.zeros((96, 10), np.float32),  # 3840 bytes, 96 rows over 8 devices
        "odd": np.zeros((97, 10), np.float32),  # does not split evenly: replicated
        "scalar": np.zeros((), np.float32),
    }
    specs = jax.tree.map(lambda s: s.spec, state_shardings(tree, mesh, 1000))
    assert specs["table"] == jax.sharding.PartitionSpec("data")
    assert specs["odd"] == specs["scalar"] == jax.sharding.PartitionSpec()
    small = jax.tree.map(lambda s: s.spec, state_shardings(tree, mesh, 4000))
    assert small["table"] == jax.sharding.PartitionSpec()
    never = jax.tree.map(lambda s: s.spec, state_shardings(tree, mesh, None))
    assert never["table"] == jax.sharding.PartitionSpec()


def _te_steps(shard_min: int | None, num_steps: int = 3):
    mesh = make_mesh()
    module = get_model("small_cnn", 4)
    apply_fn = make_apply_fn(module)
    # Standard training under TE: the table's layout is what is tested, not the attack.
    objective = with_temporal_ensembling(
        make_objective("standard", apply_fn), apply_fn, ramp_start=1, ramp_end=2
    )
    tx = make_optimizer("sgd", 0.05, momentum=0.9)
    state = create_train_state(
        module,
        jax.random.key(0),
        (8, 8, 1),
        tx,
        mesh,
        objective_state=objective.init(64, 4),
        shard_min_bytes=shard_min,
    )
    step = make_train_step(
        objective,
        tx,
        mesh,
        steps_per_epoch=2,
        state_sharding=jax.tree.map(lambda x: x.sharding, state),
    )
    for i in range(num_steps):
        batch = _batch(seed=i)
        batch["index"] = (np.arange(16) + 16 * i).astype(np.int32)
        state, _ = step(state, shard_batch(batch, mesh))
    return state


def test_split_table_gives_the_numbers_of_the_replicated_one():
    split, whole = _te_steps(0), _te_steps(None)
    table = split.objective_state["temporal_ensembling"]["soft_labels"]
    assert table.sharding.spec == jax.sharding.PartitionSpec("data")
    # Each device holds 1/8 of the table.
    assert {s.data.shape for s in table.addressable_shards} == {(8, 4)}
    assert whole.objective_state["temporal_ensembling"]["soft_labels"].sharding.is_fully_replicated
    # Rows of the examples seen were written (steps 2-3 are in TE's epochs).
    assert float(np.abs(np.asarray(table)).sum()) > 0
    # Same program up to where the table lives: the same numbers, bit for bit.
    for a, b in zip(jax.tree.leaves(split), jax.tree.leaves(whole), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_table_that_does_not_split_evenly_stays_whole_with_a_warning(tmp_path, capsys):
    from jax_memat.experiment.loop import _check_resources
    from tests.test_run import tiny_config

    config = tiny_config(te=True)
    config.parallel.shard_table_mib = 0
    config.dataset.num_train_examples = 100  # not a multiple of the 8 devices
    _check_resources(config, str(tmp_path / "run"), make_mesh())
    err = capsys.readouterr().err
    assert "its 100 rows do not split evenly over the 8 devices" in err
    config.dataset.num_train_examples = 96
    _check_resources(config, str(tmp_path / "run"), make_mesh())
    assert "do not split" not in capsys.readouterr().err
    # The warning speaks for the layout the state gets: 100 rows stay whole, 96 are split.
    for rows, spec in ((100, PartitionSpec()), (96, PartitionSpec("data"))):
        table = {"t": np.zeros((rows, 10), np.float32)}
        assert state_shardings(table, make_mesh(), 0)["t"].spec == spec


def test_memory_estimate_counts_this_devices_part_of_a_split_table():
    from jax_memat.experiment.resources import estimate_memory

    kwargs = dict(
        image_shape=(8, 8, 1), num_classes=10, num_train=800, num_test=8, batch_per_device=4
    )
    module = get_model("small_cnn", 10)
    whole = estimate_memory(module, te_table=True, **kwargs)
    split = estimate_memory(module, te_table=True, table_shards=8, **kwargs)
    assert whole.table == 4 * 800 * 10 and split.table == whole.table // 8
    assert split.total == whole.total - whole.table + split.table
    # A checkpoint holds the whole table however it is laid out.
    assert split.checkpoint_bytes == whole.checkpoint_bytes


def test_warnings_print_in_process_zero_only(monkeypatch, capsys):
    from jax_memat.experiment import workdir

    messages = []
    monkeypatch.setattr(workdir.logging, "warning", messages.append)
    workdir.warn("first")
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    workdir.warn("second")
    assert capsys.readouterr().err == "warning: first\n"
    assert messages == ["first", "second"]  # both still in each process's log
