"""Train state, data-parallel steps, evaluation, checkpoints and the loop.

Example (a notebook):
  >>> import jax
  >>> from jax_memat.models import get_model, make_apply_fn
  >>> from jax_memat.attacks import AttackSpec
  >>> from jax_memat.objectives import make_objective
  >>> from jax_memat.training import (make_mesh, make_optimizer, create_train_state,
  ...                                 make_train_step, shard_batch)
  >>> mesh = make_mesh()
  >>> module = get_model("small_cnn", 10)
  >>> tx = make_optimizer("sgd", 0.05, momentum=0.9, weight_decay=5e-4)
  >>> state = create_train_state(module, jax.random.key(0), (28, 28, 1), tx, mesh)
  >>> loss_fn = make_objective("pgd_at", make_apply_fn(module),
  ...                          AttackSpec("pgd", 0.1, 0.025, 10))
  >>> step = make_train_step(loss_fn, tx, mesh)
  >>> state, metrics = step(state, shard_batch(batch, mesh))
"""

from jax_memat.training.checkpoints import RunCheckpoints
from jax_memat.training.config import (
    check_workdir_config,
    default_config,
    validate_config,
)
from jax_memat.training.errors import (
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
from jax_memat.training.evaluate import evaluate, make_eval_fn
from jax_memat.training.loop import train_and_evaluate
from jax_memat.training.mesh import (
    batch_sharded,
    check_batch_size,
    make_mesh,
    replicate,
    replicated,
    shard_batch,
)
from jax_memat.training.metrics import plot_learning_curves, read_metrics
from jax_memat.training.optim import (
    OPTIMIZER_NAMES,
    SCHEDULE_NAMES,
    make_optimizer,
    make_schedule,
)
from jax_memat.training.setup import LoadedRun, RunSetup, build_run, load_run
from jax_memat.training.state import TrainState, create_train_state
from jax_memat.training.train_step import make_batch_fn, make_train_step, train_step

__all__ = [
    "OPTIMIZER_NAMES",
    "SCHEDULE_NAMES",
    "ConfigError",
    "CorruptFileError",
    "NonFiniteLossError",
    "RunCheckpoints",
    "LoadedRun",
    "ResourceError",
    "RunError",
    "RunInterrupted",
    "RunSetup",
    "TrainState",
    "WorkdirConflictError",
    "WorkdirError",
    "WorkdirLockedError",
    "batch_sharded",
    "build_run",
    "check_batch_size",
    "check_workdir_config",
    "create_train_state",
    "default_config",
    "evaluate",
    "load_run",
    "make_batch_fn",
    "make_eval_fn",
    "make_mesh",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "plot_learning_curves",
    "read_metrics",
    "replicate",
    "replicated",
    "shard_batch",
    "train_and_evaluate",
    "train_step",
    "validate_config",
]
