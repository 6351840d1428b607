"""The train state, the pure data-parallel step, and the optimizer.

Example (a notebook):
  >>> import jax
  >>> from jax_memat.models import get_model, make_apply_fn
  >>> from jax_memat.attacks import AttackSpec
  >>> from jax_memat.objectives import make_objective
  >>> from jax_memat.training import (make_mesh, make_optimizer, create_train_state,
  ...                                 make_train_step, shard_batch)
  >>> mesh = make_mesh()
  >>> module = get_model("small_cnn", 10)
  >>> objective = make_objective("pgd_at", make_apply_fn(module),
  ...                            AttackSpec("pgd", 0.1, 0.025, 10))
  >>> tx = make_optimizer("sgd", 0.05, momentum=0.9, weight_decay=5e-4)
  >>> state = create_train_state(module, jax.random.key(0), (28, 28, 1), tx, mesh,
  ...                            objective=objective, num_examples=60000)
  >>> step = make_train_step(objective, tx, mesh)
  >>> state, metrics = step(state, shard_batch(batch, mesh))

The experiment runner (configs, the loop, checkpoints, the CLIs) is
``jax_memat.experiment``; evaluation is ``jax_memat.evaluation``.
"""

from jax_memat.parallel import (
    batch_sharded,
    check_batch_size,
    make_mesh,
    replicate,
    replicated,
    shard_batch,
)
from jax_memat.training.optim import (
    OPTIMIZER_NAMES,
    SCHEDULE_NAMES,
    make_optimizer,
    make_schedule,
)
from jax_memat.training.state import TrainState, create_train_state
from jax_memat.training.train_step import make_train_step, train_step

__all__ = [
    "OPTIMIZER_NAMES",
    "SCHEDULE_NAMES",
    "TrainState",
    "batch_sharded",
    "check_batch_size",
    "create_train_state",
    "make_mesh",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "replicate",
    "replicated",
    "shard_batch",
    "train_step",
]
