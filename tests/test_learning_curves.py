"""The learning-curve figure: its title, legend labels and accuracy limits, and the PNG."""

import json
import os

import numpy as np
import pytest

from jax_memat.experiment import default_config
from jax_memat.experiment.metrics import (
    accuracy_limits,
    curve_labels,
    describe_run,
    figure_title,
    format_eps,
    plot_learning_curves,
)


def _te_config():
    c = default_config()
    c.te.enabled = True
    return c


@pytest.mark.parametrize(
    "eps, text",
    [
        (8 / 255, "8/255"),
        (2 / 255, "2/255"),
        (0.1, "0.1"),
        (0.5, "0.5"),
        (1.0, "1"),
        (0.0314, "0.0314"),
    ],
)
def test_format_eps(eps, text):
    assert format_eps(eps) == text


def test_title_names_method_model_dataset_and_threat_model():
    config = _te_config()
    expected = "PGD-AT+TE · preact_resnet18 · cifar10 · L-inf eps 8/255"
    assert figure_title("", config) == expected
    assert figure_title("c10_te", config) == f"c10_te: {expected}"
    # The same from the dict saved as config.json.
    assert figure_title("c10_te", json.loads(config.to_json())) == f"c10_te: {expected}"
    assert figure_title("c10_te", None) == "c10_te"
    config.objective.name, config.te.enabled = "trades", False
    config.model.name, config.model.depth, config.model.width = "wide_resnet", 34, 10
    config.attack.norm, config.attack.eps = "l2", 0.5
    config.dataset.name = "svhn"
    assert figure_title("", config) == "TRADES · WRN-34-10 · svhn · L2 eps 0.5"
    assert describe_run(config)["method"] == "TRADES"


def test_labels_name_the_pgd_steps_and_what_each_loss_is():
    config = _te_config()
    config.eval.pgd_steps = 7
    labels = curve_labels(config)
    assert labels["test_pgd_accuracy"] == "test robust (PGD-7)"
    assert labels["train_pgd_accuracy"] == "train robust (PGD-7)"
    assert labels["test_pgd_loss"] == "test robust loss (PGD-7 cross-entropy)"
    assert labels["train_loss"] == (
        "train loss (PGD-AT+TE objective on the trained-on adversarial batches)"
    )
    assert labels["test_natural_loss"] == "test natural loss (cross-entropy)"
    config.dataset.label_noise = 0.2
    config.objective.name = "standard"
    labels = curve_labels(config)
    assert labels["train_natural_accuracy"] == "train natural (noisy labels)"
    assert labels["train_pgd_accuracy"] == "train robust (PGD-7, noisy labels)"
    assert labels["train_accuracy"] == "trained-on natural batches"
    # Without a config nothing is invented.
    assert curve_labels()["test_pgd_accuracy"] == "test robust (PGD)"
    assert (
        curve_labels()["train_loss"]
        == "train loss (objective on the trained-on adversarial batches)"
    )


@pytest.mark.parametrize(
    "values, limits",
    [
        ([42.0, 61.5, 50.0], (37.0, 66.5)),
        ([1.0, 99.0], (0.0, 100.0)),  # clipped to [0, 100]
        ([97.5, 98.0], (92.5, 100.0)),
        ([float("nan"), 30.0], (25.0, 35.0)),  # non-finite values ignored
        ([], (0.0, 100.0)),
    ],
)
def test_accuracy_limits_fit_the_data(values, limits):
    assert accuracy_limits(values) == pytest.approx(limits)


def _rows(epochs=12):
    """Rows shaped as the loop writes them (evaluation every 2 epochs)."""
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "train_loss": 2.0 - 0.1 * e, "train_accuracy": 0.3 + 0.02 * e}
        if e % 2 == 0:
            for split, base in (("train", 0.55), ("test", 0.5)):
                row[f"{split}_natural_accuracy"] = base + 0.01 * e
                row[f"{split}_pgd_accuracy"] = base - 0.1 + 0.005 * e
                row[f"{split}_natural_loss"] = 1.4 - 0.03 * e
                row[f"{split}_pgd_loss"] = 1.8 - 0.02 * e
        rows.append(row)
    return rows


def test_plot_writes_a_png_with_the_labels_and_limits(tmp_path, monkeypatch):
    import matplotlib.figure

    seen = {}
    save = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        acc, loss = fig.axes
        seen["title"] = fig._suptitle.get_text()
        seen["ylim"] = acc.get_ylim()
        seen["acc"] = [t.get_text() for t in acc.get_legend().get_texts()]
        seen["loss"] = [t.get_text() for t in loss.get_legend().get_texts()]
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    config = _te_config()
    path = str(tmp_path / "curves.png")
    assert plot_learning_curves(_rows(), path, "run", config) == path
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["curves.png"]  # no temporary file left behind
    assert seen["title"] == "run: PGD-AT+TE · preact_resnet18 · cifar10 · L-inf eps 8/255"
    labels = curve_labels(config)
    assert seen["acc"] == [
        labels[k]
        for k in (
            "train_natural_accuracy",
            "train_pgd_accuracy",
            "test_natural_accuracy",
            "test_pgd_accuracy",
            "train_accuracy",
        )
    ]
    assert "test robust (PGD-10)" in seen["acc"]
    assert seen["loss"] == [
        labels[k]
        for k in (
            "train_loss",
            "train_natural_loss",
            "train_pgd_loss",
            "test_natural_loss",
            "test_pgd_loss",
        )
    ]
    plotted = [100 * r[k] for r in _rows() for k in r if k.endswith("accuracy") and k != "epoch"]
    assert seen["ylim"] == pytest.approx(accuracy_limits(plotted))
    assert seen["ylim"] == pytest.approx((np.min(plotted) - 5, np.max(plotted) + 5))
