"""The README's notebook example runs as written (on Fashion-MNIST when present)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_blocks():
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_notebook_example_runs(monkeypatch):
    from jax_memat.data import DatasetNotFoundError, load_dataset

    try:
        load_dataset("fashion_mnist", "train", num_examples=8, source="idx")
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST IDX files absent (apt-get install dataset-fashion-mnist)")
    blocks = _python_blocks()
    assert len(blocks) == 1
    namespace = {}
    exec(compile(blocks[0], README, "exec"), namespace)  # noqa: S102
    metrics, x_adv, batch = namespace["metrics"], namespace["x_adv"], namespace["batch"]
    assert int(namespace["state"].step) == 8
    assert float(metrics["loss"]) > 0
    delta = abs(x_adv - batch["image"]).max()
    assert 0 < delta <= 0.1 + 1e-6
