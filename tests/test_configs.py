"""Every experiment config builds and validates; their arguments are checked."""

import importlib.util
import itertools
import os

import pytest

from jax_memat.experiment import ConfigError, validate_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config


@pytest.mark.parametrize("name", ["base", "quickstart", "random_labels", "te"])
def test_default_configs_validate(name):
    validate_config(load(name)(None))


def test_every_cell_of_the_te_table_validates():
    get_config = load("te")
    cells = itertools.product(
        ("cifar10", "cifar100", "svhn"),
        ("preact18", "wrn34_10"),
        ("pgd_at", "pgd_at_te", "trades", "trades_te"),
    )
    for dataset, model, objective in cells:
        c = get_config(f"{dataset},{model},{objective}")
        validate_config(c)
        assert c.te.enabled == objective.endswith("_te")
        assert c.objective.name == objective.removesuffix("_te")
        assert c.dataset.augment == (dataset != "svhn")
        if model == "wrn34_10":
            assert (c.model.name, c.model.depth, c.model.width) == ("wide_resnet", 34, 10)
        else:
            assert c.model.name == "preact_resnet18"
        assert (c.epochs, tuple(c.schedule.milestones), c.optimizer.weight_decay) == (
            200,
            (100, 150),
            5e-4,
        )
        assert (c.te.momentum, c.te.weight, c.te.ramp_start, c.te.ramp_end) == (0.9, 300.0, 90, 150)


def test_random_label_configs():
    get_config = load("random_labels")
    c = get_config("cifar10,wrn28_10,trades,1.0")
    validate_config(c)
    assert (c.model.depth, c.model.width, c.objective.name) == (28, 10, "trades")
    assert c.dataset.label_noise == 1.0 and c.optimizer.weight_decay == 0.0
    assert c.epochs == 300 and c.schedule.name == "step" and not c.dataset.augment
    c = get_config("cifar10,wrn28_4,pgd_at,0.4,random_pixels")
    validate_config(c)
    assert c.optimizer.weight_decay == 2e-4 and c.dataset.image_corruption == "random_pixels"


def test_paper_configs_follow_the_authors_code():
    """BatchNorm's unbiased running variance everywhere; the attack's start as their code.

    The authors' TRADES, TRADES+TE and PGD-AT+TE attacks do not clip the random
    start to [0, 1]; their plain PGD-AT attack does.
    """
    te = load("te")
    for objective, clip in (
        ("pgd_at", True),
        ("pgd_at_te", False),
        ("trades", False),
        ("trades_te", False),
    ):
        c = te(f"cifar10,preact18,{objective}")
        assert c.model.bn_unbiased_var is True
        assert c.attack.clip_start is clip, objective
    random_labels = load("random_labels")
    for objective, clip in (("pgd_at", True), ("trades", False)):
        c = random_labels(f"cifar10,wrn28_10,{objective},1.0")
        assert c.model.bn_unbiased_var is True
        assert c.attack.clip_start is clip, objective


def test_library_defaults_keep_flax_batch_norm_and_a_clipped_start():
    for c in (load("base")(None), load("quickstart")(None)):
        assert c.model.bn_unbiased_var is False
        assert c.attack.clip_start is True


def test_bad_config_arguments():
    with pytest.raises(ValueError, match="OBJECTIVE in"):
        load("te")("cifar10,preact18,mart")
    with pytest.raises(ValueError, match="DATASET,MODEL,OBJECTIVE,RATE"):
        load("random_labels")("cifar10,wrn28_10")
    with pytest.raises(ConfigError, match="wrnDEPTH_WIDTH"):
        load("te")("cifar10,wrn34,pgd_at")
    c = load("te")("cifar10,wrn33_10,pgd_at")
    with pytest.raises(ConfigError, match="model.depth=33"):
        validate_config(c)
