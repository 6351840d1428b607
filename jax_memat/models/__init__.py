"""Flax classifiers and a registry by name.

The rest of the library sees a model only through ``make_apply_fn``:
``apply(variables, images, train) -> (logits, new_model_state)``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jax_memat import models
  >>> model = models.get_model("preact_resnet18", num_classes=10)
  >>> variables = models.init_model(model, jax.random.key(0), (32, 32, 3))
  >>> apply = models.make_apply_fn(model)
  >>> logits, _ = apply(variables, jnp.zeros((2, 32, 32, 3)), train=False)
"""

from jax_memat.models.registry import (
    MODEL_NAMES,
    ApplyFn,
    Variables,
    get_model,
    init_model,
    make_apply_fn,
)

__all__ = ["MODEL_NAMES", "ApplyFn", "Variables", "get_model", "init_model", "make_apply_fn"]
