"""The train state: one immutable pytree that is all a run needs to resume."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jax_memat.models import init_model
from jax_memat.parallel import place, replicated, state_shardings


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training.

    Attributes:
      step: number of optimizer steps taken (int32 scalar).
      params: model parameters.
      model_state: non-trainable collections (``{"batch_stats": ...}``).
      opt_state: optimizer state.
      rng: raw ``uint32`` key data (``jax.random.key_data``), so checkpoints hold
        plain arrays; step keys are ``fold_in(rng, step)``.
      objective_state: the objective's own state (``Objective.init``), e.g.
        the temporal-ensembling table; ``{}`` for objectives without state.
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    rng: jax.Array
    objective_state: Any = flax.struct.field(default_factory=dict)

    @property
    def variables(self) -> dict:
        """``{"params": ..., **model_state}``, what ``apply`` takes."""
        return {"params": self.params, **self.model_state}


def create_train_state(
    module: nn.Module,
    key: jax.Array,
    image_shape: tuple[int, int, int],
    tx: optax.GradientTransformation,
    mesh: Mesh | None = None,
    objective_state: Any = None,
    shard_min_bytes: int | None = None,
) -> TrainState:
    """Initializes a model and optimizer state, replicated over ``mesh``.

    Args:
      module: a Flax module from ``jax_memat.models.get_model``.
      key: a typed or raw PRNG key; split into the init key and the run key.
      image_shape: ``(H, W, C)`` of the inputs.
      tx: the optax optimizer.
      mesh: where to place the state (replicated); ``None`` leaves it on the
        default device.
      objective_state: the objective's initial state,
        ``objective.init(num_examples, num_classes)`` (``{}`` when None).
      shard_min_bytes: the objective state's arrays of at least this many
        bytes (the temporal-ensembling table) are split over ``mesh`` along
        their first axis instead of replicated (``jax_memat.parallel.state_shardings``);
        None (the default) replicates everything.

    Example:
      >>> state = create_train_state(get_model("small_cnn", 10), jax.random.key(0),
      ...                            (28, 28, 1), make_optimizer("sgd", 0.1), make_mesh())
    """
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    init_key, run_key = jax.random.split(key)
    variables = init_model(module, init_key, tuple(image_shape))
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=tx.init(params),
        rng=jax.random.key_data(run_key),
        objective_state={} if objective_state is None else objective_state,
    )
    if mesh is None:
        return state
    # state_shardings(..., None) replicates every leaf: one placement path.
    shardings = jax.tree.map(lambda _: replicated(mesh), state)
    shardings = shardings.replace(
        objective_state=state_shardings(state.objective_state, mesh, shard_min_bytes)
    )
    return place(state, shardings)
