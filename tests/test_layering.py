"""The library's import graph flows one way: no package imports one above it.

data, models -> attacks -> objectives -> training -> evaluation (and
analysis beside it) -> experiment -> the entry points; ``parallel`` (the mesh
and shardings), ``distributed`` (the multi-process runtime) and ``fileio``
sit below them all. Checked on the source, so an upward import fails here
before it can make a cycle.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jax_memat")
LAYERS = {
    "parallel": 0,
    "distributed": 0,
    "fileio": 0,
    "data": 1,
    "models": 1,
    "attacks": 2,
    "objectives": 3,
    "training": 4,
    "evaluation": 5,
    "analysis": 5,
    "experiment": 6,
    "main": 7,
    "evaluate": 7,
    "analyze": 7,
}


def _package(path: str) -> str:
    rel = os.path.relpath(path, ROOT)
    return rel.split(os.sep)[0].removesuffix(".py")


def _imports(path: str):
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def _modules():
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def test_every_package_has_a_layer():
    packages = {_package(p) for p in _modules()} - {"__init__"}
    assert packages <= set(LAYERS), packages - set(LAYERS)


@pytest.mark.parametrize("path", sorted(_modules()), ids=lambda p: os.path.relpath(p, ROOT))
def test_no_upward_import(path):
    own = _package(path)
    if own == "__init__":
        return
    for line, module in _imports(path):
        parts = module.split(".")
        if parts[0] != "jax_memat" or len(parts) < 2:
            continue
        target = parts[1]
        assert target == own or LAYERS[target] < LAYERS[own], (
            f"{os.path.relpath(path, ROOT)}:{line} imports {module} "
            f"({target}, layer {LAYERS[target]}) from {own} (layer {LAYERS[own]})"
        )
