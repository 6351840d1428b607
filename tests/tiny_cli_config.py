"""The tests' tiny run as a config file: ``--config=tests/tiny_cli_config.py[:EPOCHS]``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.test_run import tiny_config  # noqa: E402


def get_config(arg: str | None = None):
    return tiny_config(epochs=int(arg or 3))
