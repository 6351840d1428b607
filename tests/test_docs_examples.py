"""The notebook examples of docs/ run as written."""

import os
import re

import pytest

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def _python_blocks(name):
    with open(os.path.join(DOCS, name)) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


@pytest.mark.parametrize(
    "name, output",
    [
        ("memorization.md", "workdirs/notebook/analysis/gradients.png"),
        ("complexity.md", "workdirs/complexity/complexity.png"),
    ],
)
def test_notebook_example_runs(name, output, tmp_path, monkeypatch):
    blocks = _python_blocks(name)
    assert blocks, f"docs/{name} has no python block"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for block in blocks:  # in order, as a notebook's cells
        exec(compile(block, f"docs/{name}", "exec"), namespace)
    assert os.path.isfile(tmp_path / output)
