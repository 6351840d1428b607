"""The experiment runner: configs, the training loop, checkpoints, metrics, plots.

``train_and_evaluate(config, workdir)`` is the whole run the CLI
(``python -m jax_memat.main``) makes; ``load_run`` restores one for analysis;
``RunCheckpoints`` and ``read_metrics`` read a workdir's checkpoints and rows.

Example:
  >>> from jax_memat.experiment import default_config, train_and_evaluate
  >>> config = default_config(); config.dataset.name = "synthetic"
  >>> config.model.name = "small_cnn"; config.epochs = 2
  >>> report = train_and_evaluate(config, "workdirs/run")
"""

from jax_memat.experiment.checkpoints import RunCheckpoints
from jax_memat.experiment.config import (
    check_workdir_config,
    default_config,
    validate_config,
)
from jax_memat.experiment.errors import (
    ConfigError,
    CorruptFileError,
    NonFiniteLossError,
    ResourceError,
    RunError,
    RunInterrupted,
    WorkdirConflictError,
    WorkdirError,
    WorkdirLockedError,
)
from jax_memat.experiment.loop import train_and_evaluate
from jax_memat.experiment.metrics import plot_learning_curves, read_metrics
from jax_memat.experiment.setup import LoadedRun, RunSetup, build_run, load_run

__all__ = [
    "ConfigError",
    "CorruptFileError",
    "LoadedRun",
    "NonFiniteLossError",
    "ResourceError",
    "RunCheckpoints",
    "RunError",
    "RunInterrupted",
    "RunSetup",
    "WorkdirConflictError",
    "WorkdirError",
    "WorkdirLockedError",
    "build_run",
    "check_workdir_config",
    "default_config",
    "load_run",
    "plot_learning_curves",
    "read_metrics",
    "train_and_evaluate",
    "validate_config",
]
