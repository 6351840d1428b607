"""Per-example training objectives with their own state, and transforms of them.

An ``Objective`` is an ``(init, loss)`` pair (see ``objectives/base.py``):
``init(num_examples, num_classes) -> state`` and ``loss(params, model_state,
state, batch, info) -> (per_example_loss[B], LossAux)``. ``make_objective``
builds standard training, PGD-AT and TRADES; ``with_temporal_ensembling`` and
``with_soft_targets`` are
transform ``Objective -> Objective`` with its own slot of the state. The mean
over the batch is taken in exactly one place, the train step.

Example:
  >>> objective = with_temporal_ensembling(make_objective("pgd_at", apply_fn, attack), apply_fn)
  >>> state = objective.init(50_000, 10)  # {"temporal_ensembling": {...}, "inner": {}}
"""

from jax_memat.objectives.base import (
    INNER,
    REGULARIZER_OUTPUTS,
    LossAux,
    LossFn,
    Objective,
    Regularizer,
    StepInfo,
    add_regularizers,
    margin,
    regularizer_sum,
    stateless_init,
    transform_state,
)
from jax_memat.objectives.losses import (
    OBJECTIVE_NAMES,
    beta_problem,
    make_objective,
    validate_objective_name,
)
from jax_memat.objectives.soft_targets import (
    smoothed_targets,
    smoothing_problem,
    soft_target_penalty,
    with_soft_targets,
)
from jax_memat.objectives.temporal_ensembling import (
    init_soft_labels,
    ramp,
    te_penalty,
    te_problems,
    update_soft_labels,
    with_temporal_ensembling,
)

__all__ = [
    "INNER",
    "OBJECTIVE_NAMES",
    "REGULARIZER_OUTPUTS",
    "LossAux",
    "LossFn",
    "Objective",
    "Regularizer",
    "StepInfo",
    "add_regularizers",
    "beta_problem",
    "init_soft_labels",
    "make_objective",
    "margin",
    "ramp",
    "regularizer_sum",
    "smoothed_targets",
    "smoothing_problem",
    "soft_target_penalty",
    "stateless_init",
    "te_penalty",
    "te_problems",
    "transform_state",
    "update_soft_labels",
    "validate_objective_name",
    "with_soft_targets",
    "with_temporal_ensembling",
]
