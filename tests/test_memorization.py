"""Memorization records, what is derived from them, and retraining without hard examples."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from jax_memat.analysis import (
    NEVER_LEARNED,
    HardExampleList,
    MemorizationRecords,
    best_epoch,
    corruption_overlap,
    forgetting_events,
    hard_examples,
    learning_time,
    load_records,
    lr_decay_epochs,
    memorization,
    plot_loss_distributions,
    read_hard_examples,
    write_hard_examples,
)
from jax_memat.evaluation import evaluate, make_eval_fn
from jax_memat.experiment import ConfigError, load_run, train_and_evaluate
from jax_memat.experiment import workdir as workdir_module
from jax_memat.experiment.config import evaluation_attacks, validate_config
from jax_memat.experiment.setup import load_data
from jax_memat.parallel import replicate
from tests.helpers import F32_EPS
from tests.test_run import tiny_config

# --------------------------------------------------------------------------- derived, by hand

EPOCHS = [2, 4, 6, 8]  # recorded every second epoch
# One column per example, one row per recorded epoch.
CORRECT = np.array(
    [
        [1, 0, 1, 0, 0, 1],
        [1, 0, 0, 1, 0, 1],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 1],
    ],
    bool,
)


def test_learning_time_by_hand():
    # Example 0 always correct -> the first epoch; 1 correct from epoch 6 on; 2 ends
    # incorrect; 3 and 5 are last wrong at epoch 6, so learned at 8; 4 never correct.
    np.testing.assert_array_equal(
        learning_time(CORRECT, EPOCHS), [2, 6, NEVER_LEARNED, 8, NEVER_LEARNED, 8]
    )


def test_forgetting_events_by_hand():
    # 2: 1 -> 0 (epoch 4), 0 -> 1, 1 -> 0 (epoch 8) = 2; 3: 0 1 0 1 = 1; 5: 1 1 0 1 = 1.
    np.testing.assert_array_equal(forgetting_events(CORRECT), [0, 0, 2, 1, 0, 1])


def test_missing_records_are_skipped():
    # -1: not recorded that epoch (train_steps rows an epoch did not train on).
    correct = np.array(
        [
            [1, 0, -1, -1, 1],
            [-1, 1, -1, 1, 0],
            [0, -1, -1, 1, -1],
            [1, -1, -1, -1, -1],
        ],
        np.int8,
    )
    # 0: last wrong at epoch 6, next record epoch 8; 1: correct since 4, nothing after;
    # 2: no record; 3: correct at 4 and 6; 4: ends wrong at its last record (4).
    np.testing.assert_array_equal(
        learning_time(correct, EPOCHS), [8, 4, NEVER_LEARNED, 4, NEVER_LEARNED]
    )
    # 0: 1 -> (gap) -> 0 is one event; 4: 1 -> 0.
    np.testing.assert_array_equal(forgetting_events(correct), [1, 0, 0, 0, 1])


def test_derived_bad_input():
    with pytest.raises(ValueError, match="one per row of correct"):
        learning_time(CORRECT, [1, 2, 3])
    with pytest.raises(ValueError, match=r"integers in \{1, 0, -1\}"):
        forgetting_events(np.full((2, 2), 2, np.int8))
    with pytest.raises(ValueError, match="epochs, examples"):
        forgetting_events(np.ones(3, bool))


def _records(loss, corrupted, *, epochs=(1, 2, 3), best=2, index=None, extra=None):
    """Hand-made eval records: the loss given at every epoch (scaled by the epoch)."""
    loss = np.asarray(loss, np.float32)
    n = loss.size
    index = np.arange(n) if index is None else np.asarray(index)
    values = {"pgd_loss": np.stack([loss * e for e in epochs])}
    values.update(extra or {})
    return MemorizationRecords(
        source="eval",
        split="train",
        epochs=np.array(epochs),
        index=index,
        values=values,
        label=np.zeros(n, np.int64),
        clean_label=np.zeros(n, np.int64),
        corrupted=np.asarray(corrupted, bool),
        original_index=index * 2 + 1,  # as if every other example had been left out
        num_source_examples=2 * n + 1,
        dataset="synthetic",
        best_epoch=best,
        lr_decay_epochs=(2,),
    )


LOSS = [0.1, 3.0, 0.2, 2.0, 3.0, 0.3, 0.1, 1.0, 0.5, 0.4]
CORRUPTED = [0, 1, 0, 1, 0, 0, 0, 1, 0, 0]


def test_hard_examples_and_overlap_by_hand():
    records = _records(LOSS, CORRUPTED)
    hard = hard_examples(records, fraction=0.3)  # round(0.3 * 10) = 3, at the best epoch 2
    # Highest loss first; 1 and 4 tie (3.0), the lower row first; then 3 (2.0).
    np.testing.assert_array_equal(hard.index, [1, 4, 3])
    np.testing.assert_array_equal(hard.original_index, [3, 9, 7])
    np.testing.assert_allclose(hard.values, [6.0, 6.0, 4.0])
    assert hard.epoch == 2 and hard.quantity == "pgd_loss"
    # 1 and 3 are corrupted: 2 of the 3 hard, 2 of the 3 corrupted, 3 of 10 overall.
    assert hard.summary == {
        "count": 3,
        "num_examples": 10,
        "num_corrupted": 3,
        "num_hard_corrupted": 2,
        "fraction_corrupted_hard": pytest.approx(2 / 3),
        "fraction_corrupted_overall": pytest.approx(0.3),
        "precision": pytest.approx(2 / 3),
        "recall": pytest.approx(2 / 3),
    }
    assert hard.meta["num_examples"] == 21 and hard.meta["dataset"] == "synthetic"
    # count= and an explicit epoch; 7 (1.0) is the fourth hardest.
    assert list(hard_examples(records, epoch=3, count=4).index) == [1, 4, 3, 7]


def test_hard_examples_lower_margin_is_harder_and_nan_is_skipped():
    margin = np.array([[0.5, -2.0, np.nan, 1.0, -0.1]], np.float32)
    records = _records([1, 1, 1, 1, 1], [0, 0, 1, 0, 0], epochs=(1,), best=1)
    records.values["pgd_margin"] = margin
    hard = hard_examples(records, quantity="pgd_margin", count=2)
    np.testing.assert_array_equal(hard.index, [1, 4])
    # The NaN row (not recorded) is neither hard nor counted.
    assert hard.summary["num_examples"] == 4 and hard.summary["num_corrupted"] == 0
    assert hard.summary["recall"] is None
    with pytest.raises(ValueError, match="exceeds the 4 examples"):
        hard_examples(records, quantity="pgd_margin", count=5)


def test_hard_examples_bad_input():
    records = _records(LOSS, CORRUPTED)
    with pytest.raises(ValueError, match="not both"):
        hard_examples(records, fraction=0.1, count=2)
    with pytest.raises(ValueError, match=r"fraction=1.5; accepted: a number in \(0, 1\]"):
        hard_examples(records, fraction=1.5)
    with pytest.raises(ValueError, match="epoch 5 is not recorded.*recorded: 1, 2, 3"):
        hard_examples(records, epoch=5)
    with pytest.raises(KeyError, match="'cw_loss' is not recorded.*pgd_loss"):
        hard_examples(records, quantity="cw_loss")
    with pytest.raises(ValueError, match="no evaluated epoch"):
        hard_examples(_records(LOSS, CORRUPTED, best=None))


def test_corruption_overlap_checks_shapes():
    with pytest.raises(ValueError, match="1-D of one length"):
        corruption_overlap(np.ones(3, bool), np.ones(4, bool))


def test_best_epoch_and_lr_decays_from_rows():
    rows = [
        {"epoch": 1, "learning_rate": 0.1, "test_pgd_accuracy": 0.3, "test_natural_accuracy": 0.5},
        {"epoch": 2, "learning_rate": 0.1},  # not evaluated
        {"epoch": 3, "learning_rate": 0.01, "test_pgd_accuracy": 0.4, "test_natural_accuracy": 0.6},
        {"epoch": 4, "learning_rate": 0.01, "test_pgd_accuracy": 0.4, "test_natural_accuracy": 0.7},
        {
            "epoch": 5,
            "learning_rate": 0.001,
            "test_pgd_accuracy": 0.4,
            "test_natural_accuracy": 0.7,
        },
    ]
    assert best_epoch(rows) == 4  # ties on PGD broken by natural, then the earliest
    assert lr_decay_epochs(rows) == (2, 4)
    assert best_epoch(rows[1:2]) is None


# --------------------------------------------------------------------------- the list file


def test_hard_example_list_round_trip(tmp_path):
    path = str(tmp_path / "hard.json")
    meta = {"dataset": "cifar10", "num_examples": 50_000, "epoch": 101}
    assert write_hard_examples(path, np.array([17, 3, 40_000]), meta) == path
    listed = read_hard_examples(path)
    np.testing.assert_array_equal(listed.indices, [17, 3, 40_000])  # the order is kept
    assert listed.meta == meta and listed.path == path
    listed.check_for("cifar10", 50_000)
    assert os.listdir(tmp_path) == ["hard.json"]  # no temporary file left


def test_write_hard_examples_refuses_bad_input_and_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "hard.json")
    write_hard_examples(path, [1, 2])
    with pytest.raises(ValueError, match="index 2 is listed more than once"):
        write_hard_examples(path, [2, 2])
    with pytest.raises(ValueError, match="index -1 is negative"):
        write_hard_examples(path, [-1])
    with pytest.raises(ValueError, match="not JSON-compatible"):
        write_hard_examples(path, [3], {"epoch": float("nan")})
    with pytest.raises(ValueError, match="meta.num_examples=0"):
        write_hard_examples(path, [3], {"num_examples": 0})
    np.testing.assert_array_equal(read_hard_examples(path).indices, [1, 2])
    assert os.listdir(tmp_path) == ["hard.json"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2", "not a readable JSON file"),
        ('{"indices": [1]}', "is not a hard-example list"),
        ('{"format": "jax_memat.hard_examples", "version": 9, "indices": []}', "version 9"),
        ('{"format": "jax_memat.hard_examples", "version": 1, "indices": [1.5]}', "integers"),
        ('{"format": "jax_memat.hard_examples", "version": 1, "indices": [4, 4]}', "more than"),
        ('{"format": "jax_memat.hard_examples", "version": 1, "indices": [], "meta": 3}', "meta"),
    ],
)
def test_read_hard_examples_says_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "hard.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_hard_examples(str(path))


def test_hard_example_list_checked_against_the_run():
    listed = HardExampleList(np.array([0, 9]), {"dataset": "svhn", "num_examples": 10})
    listed.check_for("svhn", 10)
    with pytest.raises(ValueError, match="made on dataset 'svhn'.*uses 'cifar10'"):
        listed.check_for("cifar10", 10)
    with pytest.raises(ValueError, match="training set of 10 examples.*loads 12"):
        listed.check_for("svhn", 12)
    with pytest.raises(ValueError, match="index 9 is out of range for the 5"):
        HardExampleList(np.array([0, 9]), {}).check_for("svhn", 5)
    with pytest.raises(ValueError, match="no training example would be left"):
        HardExampleList(np.array([0, 1]), {}).check_for("svhn", 2)


# --------------------------------------------------------------------------- hand-made workdir


def _fake_workdir(root, epochs=(2, 4, 6), n=5):
    os.makedirs(root / "per_example")
    rng = np.random.default_rng(0)
    for e in epochs:
        np.savez(
            root / "per_example" / f"train_epoch{e:04d}.npz",
            index=np.arange(n, dtype=np.int32),
            natural_loss=rng.random(n).astype(np.float32),
            natural_correct=rng.random(n) > 0.5,
            pgd_loss=rng.random(n).astype(np.float32),
            pgd_correct=rng.random(n) > 0.5,
        )
    labels = np.arange(8, dtype=np.int32) % 3
    clean = labels.copy()
    clean[[1, 4]] = (clean[[1, 4]] + 1) % 3
    np.savez(root / "labels.npz", labels=labels, clean_labels=clean, changed=labels != clean)
    rows = [
        {
            "epoch": e,
            "learning_rate": 0.1 if e < 4 else 0.01,
            "test_pgd_accuracy": e / 10,
            "test_natural_accuracy": 0.5,
        }
        for e in epochs
    ]
    with open(root / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write('{"epoch": 7, "learn')  # a torn last line: the run was killed mid-write
    (root / "config.json").write_text(json.dumps({"dataset": {"name": "synthetic"}}))
    return str(root)


def test_load_records_reads_recorded_epochs_only(tmp_path):
    workdir = _fake_workdir(tmp_path)
    records = load_records(workdir)
    np.testing.assert_array_equal(records.epochs, [2, 4, 6])
    assert records["pgd_loss"].shape == (3, 5)
    with np.load(tmp_path / "per_example" / "train_epoch0004.npz") as f:
        np.testing.assert_array_equal(records["pgd_loss"][1], f["pgd_loss"])
        np.testing.assert_array_equal(records["natural_correct"][1], f["natural_correct"])
    np.testing.assert_array_equal(records.corrupted, [0, 1, 0, 0, 1])
    np.testing.assert_array_equal(records.original_index, np.arange(5))
    assert records.num_source_examples == 8 and records.dataset == "synthetic"
    # The torn row of epoch 7 is left out; the best is the last full row.
    assert records.best_epoch == 6 and records.lr_decay_epochs == (2,)
    subset = load_records(workdir, epochs=[4], quantities=["pgd_loss"])
    assert subset.quantities == ("pgd_loss",) and list(subset.epochs) == [4]
    with pytest.raises(ValueError, match=r"epochs \[3\] are not recorded.*recorded: 2, 4, 6"):
        load_records(workdir, epochs=[3])
    with pytest.raises(ValueError, match=r"quantities \['pgd_margin'\] are not recorded"):
        load_records(workdir, quantities=["pgd_margin"])


def test_load_records_says_what_is_missing(tmp_path):
    workdir = _fake_workdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="record.train_per_example=True"):
        load_records(workdir, "train_steps")
    with pytest.raises(FileNotFoundError, match=r"test_epochNNNN.npz.*eval.save_per_example=True"):
        load_records(workdir, "eval", "test")
    with pytest.raises(ValueError, match="training split only"):
        load_records(workdir, "train_steps", "test")
    with pytest.raises(ValueError, match="source='steps' is not accepted"):
        load_records(workdir, "steps")


def test_load_records_refuses_files_that_disagree(tmp_path):
    workdir = _fake_workdir(tmp_path)
    np.savez(tmp_path / "per_example" / "train_epoch0008.npz", index=np.arange(3), pgd_loss=[1, 2])
    with pytest.raises(ValueError, match="train_epoch0008.npz records other example rows"):
        load_records(workdir)
    (tmp_path / "per_example" / "train_epoch0008.npz").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError, match="train_epoch0008.npz is damaged"):
        load_records(workdir)


def test_layout_constants_match_the_runner():
    assert memorization.CONFIG_FILE == workdir_module.CONFIG_FILE
    assert memorization.METRICS_FILE == workdir_module.METRICS_FILE
    assert memorization.LABELS_FILE == workdir_module.LABELS_FILE
    assert memorization.PER_EXAMPLE_DIR == workdir_module.PER_EXAMPLE_DIR


# --------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny PGD-AT run under 20% label noise, with every per-example record."""
    workdir = str(tmp_path_factory.mktemp("memorization") / "run")
    config = tiny_config(epochs=3)
    config.record.train_per_example = True
    config.eval.num_train_examples = 80  # a prefix of the 96 rows
    report = train_and_evaluate(config, workdir)
    return workdir, config, report


def test_records_of_a_run_equal_its_files(run):
    workdir, config, report = run
    records = load_records(workdir, "eval", "train")
    assert records["pgd_loss"].shape == (3, 80)
    np.testing.assert_array_equal(records.index, np.arange(80))
    for i, epoch in enumerate(records.epochs):
        with np.load(os.path.join(workdir, "per_example", f"train_epoch{epoch:04d}.npz")) as f:
            assert set(f.files) == set(records.quantities) | {"index"}
            for name in records.quantities:
                np.testing.assert_array_equal(records[name][i], f[name])
    with np.load(os.path.join(workdir, "labels.npz")) as labels:
        np.testing.assert_array_equal(records.corrupted, labels["changed"][:80])
        np.testing.assert_array_equal(records.label, labels["labels"][:80])
        np.testing.assert_array_equal(records.clean_label, labels["clean_labels"][:80])
    assert records.corrupted.any()
    assert records.best_epoch == report["best"]["epoch"]
    assert records.lr_decay_epochs == (2,)  # schedule.milestones = (2,)
    # A margin is positive exactly when the example is classified as its label.
    for kind in ("natural", "pgd"):
        np.testing.assert_array_equal(records[f"{kind}_margin"] > 0, records[f"{kind}_correct"])

    steps = load_records(workdir, "train_steps")
    assert steps["loss"].shape == (3, 96) and steps.quantities == ("correct", "loss", "margin")
    trained = steps["correct"] >= 0
    assert (trained.sum(axis=1) == 96).all()  # 3 full batches of 32 per epoch
    np.testing.assert_array_equal(np.isnan(steps["loss"]), ~trained)

    test = load_records(workdir, "eval", "test")
    assert test["pgd_loss"].shape == (3, 40) and not test.corrupted.any()


def test_recorded_values_equal_a_direct_evaluation(run):
    workdir, config, _ = run
    loaded = load_run(workdir, "latest")
    assert int(loaded.meta["epoch"]) == 3
    eval_fn = make_eval_fn(
        loaded.setup.apply_fn, evaluation_attacks(config, config.eval.pgd_steps), loaded.mesh
    )
    images, labels = replicate((loaded.train.images, loaded.train.labels), loaded.mesh)
    # The loop's key for epoch 3's training split.
    key = jax.random.fold_in(jax.random.fold_in(loaded.setup.keys["eval"], 3), False)
    direct, _ = evaluate(
        eval_fn,
        loaded.state.variables,
        images,
        labels,
        batch_size=config.eval.batch_size,
        key=key,
        mesh=loaded.mesh,
        num_examples=80,
    )
    records = load_records(workdir, "eval", "train", epochs=[3])
    for name in records.quantities:
        recorded = records[name][0]
        if name.endswith("_correct"):
            np.testing.assert_array_equal(recorded, direct[name])
        else:  # the same program on the same inputs; a few roundings of slack
            scale = float(np.abs(direct[name]).max())
            np.testing.assert_allclose(recorded, direct[name], rtol=0, atol=64 * F32_EPS * scale)
    # The margins against the logits computed here with numpy.
    logits, _ = loaded.setup.apply_fn(
        jax.device_get(loaded.state.variables),
        loaded.train.images[:80].astype(np.float32) / np.float32(255),
        False,
    )
    logits = np.asarray(logits, np.float64)
    y = loaded.train.labels[:80]
    others = logits.copy()
    others[np.arange(80), y] = -np.inf
    margin = logits[np.arange(80), y] - others.max(axis=1)
    scale = float(np.abs(logits).max())
    np.testing.assert_allclose(
        records["natural_margin"][0], margin, rtol=0, atol=256 * F32_EPS * scale
    )


def test_loss_distribution_figure(run, tmp_path):
    workdir, _, _ = run
    records = load_records(workdir)
    path = str(tmp_path / "loss.png")
    assert plot_loss_distributions(records, path, title="tiny") == path
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["loss.png"]
    plot_loss_distributions(load_records(workdir, "train_steps"), path, hard=[0, 5])
    with pytest.raises(ValueError, match="not a continuous value"):
        plot_loss_distributions(records, path, quantity="pgd_correct")


# --------------------------------------------------------------------------- retraining without


def test_run_without_hard_examples(run, tmp_path):
    workdir, config, _ = run
    hard = hard_examples(load_records(workdir), count=6)
    listed = str(tmp_path / "hard.json")
    write_hard_examples(listed, hard.original_index, hard.meta)

    retrain = tiny_config(epochs=1)
    retrain.record.train_per_example = True
    retrain.dataset.exclude_examples = listed
    new = str(tmp_path / "without")
    train_and_evaluate(retrain, new)

    excluded = np.sort(hard.original_index)
    kept = np.setdiff1d(np.arange(96), excluded)
    with (
        np.load(os.path.join(new, "labels.npz")) as saved,
        np.load(os.path.join(workdir, "labels.npz")) as original,
    ):
        np.testing.assert_array_equal(saved["excluded_index"], excluded)
        np.testing.assert_array_equal(saved["original_index"], kept)
        # The kept examples keep the noisy labels they had in the first run.
        for key in ("labels", "clean_labels", "changed"):
            np.testing.assert_array_equal(saved[key], original[key][kept])
    steps = load_records(new, "train_steps")
    assert steps.num_examples == 90 and steps.num_source_examples == 96
    np.testing.assert_array_equal(steps.original_index, kept)
    assert (steps["correct"] >= 0).sum() == 64  # 90 // 32 full batches of 32

    # load_run restores the same 90 rows from labels.npz, without the list file.
    os.remove(listed)
    loaded = load_run(new, "latest")
    full, _, _ = load_data(tiny_config(epochs=1))
    assert loaded.train.num_examples == 90
    np.testing.assert_array_equal(loaded.train.images, full.images[kept])


def _bad_lists(tmp_path):
    ok = {"dataset": "synthetic", "num_examples": 96}
    cases = {
        "missing": (str(tmp_path / "absent.json"), "does not exist"),
        "not json": (str(tmp_path / "garbage.json"), "not a readable JSON file"),
        "other dataset": (
            write_hard_examples(str(tmp_path / "svhn.json"), [1], {"dataset": "svhn"}),
            "made on dataset 'svhn'",
        ),
        "other size": (
            write_hard_examples(str(tmp_path / "size.json"), [1], {"num_examples": 50}),
            "training set of 50 examples",
        ),
        "out of range": (
            write_hard_examples(str(tmp_path / "range.json"), [96], ok),
            "index 96 is out of range for the 96",
        ),
        "too many": (
            write_hard_examples(str(tmp_path / "many.json"), list(range(70)), ok),
            "leaves 26, fewer than batch_size=32",
        ),
    }
    (tmp_path / "garbage.json").write_text("{")
    return cases


def test_bad_exclusion_list_stops_before_anything_is_written(tmp_path):
    for name, (path, message) in _bad_lists(tmp_path).items():
        config = tiny_config(epochs=1)
        config.dataset.exclude_examples = path
        workdir = tmp_path / f"run_{name.replace(' ', '_')}"
        with pytest.raises(ConfigError, match=f"dataset.exclude_examples: .*{message}"):
            train_and_evaluate(config, str(workdir))
        assert not workdir.exists(), name
    # A ConfigDict keeps the field a string; a config read from JSON may not.
    fields = tiny_config(epochs=1).to_dict()
    fields["dataset"]["exclude_examples"] = 3
    with pytest.raises(ConfigError, match="dataset.exclude_examples=3: use the path"):
        validate_config(ml_collections.ConfigDict(fields))
