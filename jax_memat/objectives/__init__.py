"""Per-example training objectives (standard, PGD-AT, TRADES) and loss transforms (TE).

An objective is a function ``loss_fn(params, model_state, batch, key) ->
(per_example_loss[B], aux)``; the mean over the batch is taken in exactly one
place, the train step. ``aux`` is a dict with ``"model_state"`` (the updated
BatchNorm statistics) and ``"per_example"`` (arrays with a leading batch axis,
e.g. the logits the loss was computed on), so transforms (temporal ensembling,
memorization records, per-example gradients) can wrap a loss without editing it.
"""

from jax_memat.objectives.losses import (
    OBJECTIVE_NAMES,
    REGULARIZER_OUTPUTS,
    LossFn,
    Regularizer,
    make_objective,
    validate_objective_name,
)
from jax_memat.objectives.temporal_ensembling import (
    SOFT_LABELS,
    init_soft_labels,
    ramp,
    te_penalty,
    update_soft_labels,
    with_temporal_ensembling,
)

__all__ = [
    "SOFT_LABELS",
    "OBJECTIVE_NAMES",
    "REGULARIZER_OUTPUTS",
    "LossFn",
    "Regularizer",
    "make_objective",
    "init_soft_labels",
    "ramp",
    "te_penalty",
    "update_soft_labels",
    "validate_objective_name",
    "with_temporal_ensembling",
]
