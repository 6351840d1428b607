"""The README's notebook example runs as written (on Fashion-MNIST when present)."""

import os
import re

import numpy as np
import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_blocks():
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_notebook_example_runs(monkeypatch, capsys):
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
    # It prints the natural and the PGD accuracy of the last batch, in %.
    out = capsys.readouterr().out
    printed = re.search(r"natural ([\d.]+)% \| PGD-10 ([\d.]+)%", out)
    assert printed, out
    apply_fn, variables = namespace["apply_fn"], namespace["state"].variables
    for images, text in zip((batch["image"], x_adv), printed.groups(), strict=True):
        logits, _ = apply_fn(variables, images, False)
        correct = np.argmax(np.asarray(logits), -1) == np.asarray(batch["label"])
        # Printed with one decimal: within half of 0.1 point of the true value.
        assert float(text) == pytest.approx(100 * correct.mean(), abs=0.05 + 1e-9)


def test_ci_runs_the_readme_test_commands():
    """.ci/run installs and tests exactly as the README's "Run the tests" block says."""
    with open(README) as f:
        text = f.read()
    block = re.search(r"Run the tests.*?```bash\n(.*?)```", text, flags=re.S).group(1)
    with open(os.path.join(os.path.dirname(README), ".ci", "run")) as f:
        ci = f.read().splitlines()
    lines = [line for line in block.splitlines() if line.strip()]
    assert lines[-1] == "python -m pytest -q"
    for line in lines:
        assert line in ci, line
