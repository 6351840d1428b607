"""Models by name, and the pure apply function the rest of the library sees."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_memat.models.resnet import preact_resnet18, resnet18, wide_resnet
from jax_memat.models.small_cnn import small_cnn
from jax_memat.models.vgg import vgg16

# A Flax variables dict: {"params": ..., "batch_stats": ...}.
Variables = dict[str, Any]
# apply(variables, images, train) -> (logits, new_model_state); see make_apply_fn.
ApplyFn = Callable[[Mapping[str, Any], jax.Array, bool], tuple[jax.Array, Variables]]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Builders take (num_classes, dtype, ..., bn_unbiased_var); wide_resnet also takes
# depth and width, small_cnn a width.
_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "preact_resnet18": preact_resnet18,
    "resnet18": resnet18,
    "wide_resnet": wide_resnet,
    "vgg16": vgg16,
    "small_cnn": small_cnn,
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def get_model(
    name: str,
    num_classes: int,
    *,
    depth: int = 28,
    width: int = 10,
    dtype: str = "float32",
    cnn_width: int = 1,
    bn_unbiased_var: bool = False,
) -> nn.Module:
    """Builds a classifier by registry name.

    Every model takes float NHWC images in [0, 1] (no normalization layer in
    front, as in the paper) of any size down to 28x28, is called as
    ``module(images, train)`` and returns float32 logits.

    Args:
      name: one of ``MODEL_NAMES``: ``"preact_resnet18"``, ``"resnet18"``,
        ``"wide_resnet"`` (pre-activation WRN-depth-width, dropout 0),
        ``"vgg16"`` (with BatchNorm) or ``"small_cnn"`` (for CPU runs).
      num_classes: number of logits, at least 2.
      depth: WRN depth, ``(depth - 4) % 6 == 0``; only used by ``wide_resnet``.
      width: WRN widening factor; only used by ``wide_resnet``.
      dtype: compute dtype, ``"float32"`` or ``"bfloat16"``. Parameters and
        BatchNorm statistics stay float32 either way.
      cnn_width: channel multiplier of ``small_cnn`` (1: 32-64 channels and a
        128-unit hidden layer); only used by ``small_cnn``.
      bn_unbiased_var: update BatchNorm running variances with the unbiased
        batch variance (times n / (n - 1)), as PyTorch, instead of the biased
        one, as Flax. Outputs and variables are the same either way; only the
        running variances (and so inference-mode outputs) differ.

    Returns:
      An unbound Flax module.

    Raises:
      ValueError: for an unknown name or dtype, ``num_classes < 2``, a WRN
        depth/width that does not give a valid network, or a non-bool
        ``bn_unbiased_var``.

    Example:
      >>> model = get_model("wide_resnet", 10, depth=34, width=10, dtype="bfloat16")
    """
    if name not in _BUILDERS:
        raise ValueError(f"Unknown model {name!r}; accepted names: {', '.join(MODEL_NAMES)}.")
    if dtype not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; accepted dtypes: {', '.join(_DTYPES)}.")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
    if not isinstance(bn_unbiased_var, bool):
        raise ValueError(f"bn_unbiased_var must be True or False, got {bn_unbiased_var!r}.")
    if name == "wide_resnet":
        return wide_resnet(num_classes, depth, width, _DTYPES[dtype], bn_unbiased_var)
    if name == "small_cnn":
        if not isinstance(cnn_width, int) or cnn_width < 1:
            raise ValueError(f"cnn_width must be a positive integer, got {cnn_width!r}.")
        return small_cnn(num_classes, _DTYPES[dtype], cnn_width, bn_unbiased_var)
    return _BUILDERS[name](num_classes, _DTYPES[dtype], bn_unbiased_var)


def init_model(module: nn.Module, key: jax.Array, input_shape: tuple[int, int, int]) -> Variables:
    """Initialises a model's variables from a batch of one zero image.

    Args:
      module: a module from ``get_model``.
      key: PRNG key for the parameters.
      input_shape: ``(height, width, channels)`` of one image.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` as plain dicts (``batch_stats``
      only when the model has BatchNorm), with running means 0 and variances 1.

    Example:
      >>> model = get_model("small_cnn", 10)
      >>> variables = init_model(model, jax.random.key(0), (28, 28, 1))
      >>> sorted(variables)
      ['batch_stats', 'params']
    """
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape}.")
    images = jnp.zeros((1, *input_shape), jnp.float32)
    # Compiled: eager init of a deep net dispatches hundreds of tiny ops.
    variables = jax.jit(functools.partial(module.init, train=False))(key, images)
    return {name: dict(collection) for name, collection in variables.items() if collection}


def make_apply_fn(module: nn.Module) -> ApplyFn:
    """Wraps a module as ``apply(variables, images, train) -> (logits, new_model_state)``.

    This is the only view of a model the rest of the library has. ``train``
    must be a Python bool (it selects the computation, so close over it or
    mark it static under ``jax.jit``):

    * ``train=True``: BatchNorm normalizes with the batch's statistics and
      ``new_model_state`` is ``{"batch_stats": updated running averages}``
      (``{}`` for a model without BatchNorm).
    * ``train=False``: BatchNorm uses the running averages, each example's
      logits depend on that example only, and ``new_model_state`` is the
      non-``params`` part of ``variables``, unchanged.

    Args:
      module: a module from ``get_model``.

    Returns:
      The pure apply function.

    Example:
      >>> model = get_model("small_cnn", 10)
      >>> variables = init_model(model, jax.random.key(0), (28, 28, 1))
      >>> apply = make_apply_fn(model)
      >>> logits, state = apply(variables, jnp.zeros((4, 28, 28, 1)), train=True)
      >>> logits.shape, sorted(state)
      ((4, 10), ['batch_stats'])
    """

    def apply(
        variables: Mapping[str, Any], images: jax.Array, train: bool
    ) -> tuple[jax.Array, Variables]:
        if train:
            logits, updates = module.apply(variables, images, True, mutable=["batch_stats"])
            return logits, dict(updates)
        logits = module.apply(variables, images, False)
        return logits, {name: value for name, value in variables.items() if name != "params"}

    return apply
