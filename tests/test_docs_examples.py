"""The notebook examples of docs/ run as written."""

import os
import re

import pytest

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def _python_blocks(name):
    with open(os.path.join(DOCS, name)) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


@pytest.mark.parametrize("name", ["memorization.md"])
def test_notebook_example_runs(name, tmp_path, monkeypatch):
    (block,) = _python_blocks(name)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, f"docs/{name}", "exec"), {"__name__": "__docs__"})
    assert os.path.isfile(tmp_path / "workdirs" / "notebook" / "analysis" / "gradients.png")
