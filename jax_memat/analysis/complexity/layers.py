"""The weight layers of a Flax classifier, with a BatchNorm policy, for norm-based measures.

Norm-based complexity measures (Neyshabur et al. 2017, "Exploring
Generalization in Deep Learning"; Bartlett et al. 2017, "Spectrally-normalized
margin bounds for neural networks"; Jiang et al. 2020, "Fantastic
Generalization Measures and Where to Find Them") are functions of the ordered
list of linear maps W_1 ... W_d of a network. This module reads that list from
a model function and its variables:

* ``trace_layers`` runs the model once (abstractly, inference mode) under a
  Flax method interceptor and records every ``nn.Conv``, ``nn.Dense`` and
  BatchNorm call in execution order, with its input shape, and whether a
  BatchNorm reads the output of a conv/dense layer and nothing else reads
  that output (found on the jaxpr, so a residual branch that also reads the
  conv's output is seen).
* ``extract_layers`` turns a trace and a variables tree into ``WeightLayer``s
  under a BatchNorm policy.

Why a BatchNorm policy: a conv followed by BatchNorm computes the same
function whatever the scale of the conv's kernel (BatchNorm divides it out),
so the norm of that kernel alone is meaningless. In inference mode BatchNorm
is the affine map ``x -> s * x + (beta - s * mean)`` with
``s = gamma / sqrt(var + eps)`` per channel, and it is counted either way:

* ``bn="fold"`` (default): where a BatchNorm reads a conv's (or dense
  layer's) output and nothing else reads it, it is folded into that layer:
  ``W <- s * W`` (per output channel), ``b <- beta + s * (b - mean)``. The
  folded layer computes exactly what conv-then-BN computed. A BatchNorm that
  cannot be folded (pre-activation blocks: BN after a residual add or on the
  network input; a conv output that also feeds a shortcut) becomes its own
  diagonal layer, as under ``"diagonal"``.
* ``bn="diagonal"``: every BatchNorm is its own layer ``D = diag(s)`` with
  bias ``beta - s * mean``; ``||D||_2 = max |s|``, ``||D||_F^2 = sum s^2``.

Each BatchNorm's own ``epsilon`` is used (1e-5 in this repository's models).

Example:
  >>> import jax
  >>> from jax_memat import models
  >>> model = models.get_model("small_cnn", 10)
  >>> variables = models.init_model(model, jax.random.key(0), (28, 28, 1))
  >>> layers = extract_layers(models.make_apply_fn(model), variables, (28, 28, 1))
  >>> [layer.name for layer in layers.layers]
  ['conv1+bn1', 'conv2+bn2', 'fc1', 'linear']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jax_memat.models.layers import UnbiasedVarBatchNorm

BN_POLICIES: tuple[str, ...] = ("fold", "diagonal")

_BN_TYPES = (nn.BatchNorm, UnbiasedVarBatchNorm)
_MARK_OUT = "jax_memat_complexity_out:"
_MARK_BN_IN = "jax_memat_complexity_bn_in:"


@dataclasses.dataclass(frozen=True)
class TracedOp:
    """One conv, dense or BatchNorm call seen while tracing a model.

    Attributes:
      kind: ``"conv"``, ``"dense"`` or ``"bn"``.
      path: the module's path in the variables tree, e.g. ``("stage1_block0", "conv1")``.
      input_shape: shape of one example's input to the call (no batch axis).
      module: an unbound copy of the module (float32, no bias) that applies
        the same linear map given ``{"params": {"kernel": ...}}`` (conv and
        dense only; None for BatchNorm).
      epsilon: the BatchNorm's epsilon (None for conv and dense).
      feeds_bn: for conv and dense, the index in the trace of the BatchNorm
        that reads its output when nothing else does (foldable), else None.
    """

    kind: str
    path: tuple[str, ...]
    input_shape: tuple[int, ...]
    module: nn.Module | None
    epsilon: float | None
    feeds_bn: int | None

    @property
    def name(self) -> str:
        """The path joined with ``/``."""
        return "/".join(self.path)


@dataclasses.dataclass(frozen=True)
class WeightLayer:
    """One linear map W_i of the network, in float64 on the host.

    Attributes:
      name: the module path joined by ``/``; a folded BatchNorm is appended
        after ``+`` (``"conv1+bn1"``).
      path: the module's path in the variables tree.
      kind: ``"conv"`` (kernel HWIO), ``"dense"`` (kernel ``[in, out]``) or
        ``"bn"`` (a diagonal layer: ``kernel`` is the vector ``s``).
      kernel: the weights after any folding.
      bias: the bias after any folding, or None (conv/dense without bias, nothing folded).
      input_shape: one example's input shape at this layer (for the conv
        operator norm).
      module: the unbound float32 bias-free module applying the kernel (conv
        and dense; None for a diagonal BatchNorm).
      folded_bn: name of the BatchNorm folded into this layer, or None.
    """

    name: str
    path: tuple[str, ...]
    kind: str
    kernel: np.ndarray
    bias: np.ndarray | None
    input_shape: tuple[int, ...]
    module: nn.Module | None
    folded_bn: str | None


@dataclasses.dataclass(frozen=True)
class Layers:
    """The weight layers of a network and what was done with each BatchNorm.

    Attributes:
      layers: the ``WeightLayer``s in execution order.
      bn_policy: for each BatchNorm (by name), ``"folded into <layer>"`` or ``"diagonal"``.
      bn: the policy asked for (one of ``BN_POLICIES``).
      trace: the ``LayerTrace`` they were read with (reuse it for init variables).
    """

    layers: tuple[WeightLayer, ...]
    bn_policy: dict[str, str]
    bn: str
    trace: LayerTrace


@dataclasses.dataclass(frozen=True)
class LayerTrace:
    """The conv, dense and BatchNorm calls of a model, in execution order.

    Attributes:
      ops: the ``TracedOp``s.
      image_shape: the one-example input shape the model was traced at.
    """

    ops: tuple[TracedOp, ...]
    image_shape: tuple[int, ...]


def check_bn_policy(bn: str) -> None:
    """Raises ``ValueError`` unless ``bn`` is one of ``BN_POLICIES``."""
    if bn not in BN_POLICIES:
        raise ValueError(f"Unknown BatchNorm policy bn={bn!r}; accepted: {', '.join(BN_POLICIES)}.")


def check_same_structure(variables: Mapping[str, Any], init_variables: Mapping[str, Any]) -> None:
    """Raises ``ValueError`` unless both trees have the same structure and leaf shapes.

    Args:
      variables: the measured variables.
      init_variables: the variables at initialization (or any reference).

    Example:
      >>> check_same_structure({"params": {"w": np.ones(2)}}, {"params": {"w": np.zeros(2)}})
    """
    leaves, tree = jax.tree_util.tree_flatten_with_path(variables)
    init_leaves, init_tree = jax.tree_util.tree_flatten_with_path(init_variables)
    if tree != init_tree:
        paths = {jax.tree_util.keystr(p) for p, _ in leaves}
        init_paths = {jax.tree_util.keystr(p) for p, _ in init_leaves}
        missing = sorted(paths - init_paths)[:3]
        extra = sorted(init_paths - paths)[:3]
        raise ValueError(
            "init_variables must have the structure of variables (the same model); "
            f"missing from init: {missing}, only in init: {extra}."
        )
    for (path, leaf), (_, init_leaf) in zip(leaves, init_leaves, strict=True):
        if np.shape(leaf) != np.shape(init_leaf):
            raise ValueError(
                f"init_variables{jax.tree_util.keystr(path)} has shape {np.shape(init_leaf)}, "
                f"variables has {np.shape(leaf)}: not the same model."
            )


def _subjaxprs(params: Mapping[str, Any]):
    for value in params.values():
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def _marker_consumers(jaxpr) -> dict[str, list[str]]:
    """For each output marker: the markers (or ``"other"``) that read its value.

    Both markers of a conv->BN pair are emitted in the same Python trace, so
    they sit in the same (possibly nested) jaxpr; every jaxpr is searched.
    """
    found: dict[str, list[str]] = {}
    stack = [jaxpr]
    while stack:
        current = stack.pop()
        marked_out = {}
        for eqn in current.eqns:
            if eqn.primitive.name == "name" and eqn.params["name"].startswith(_MARK_OUT):
                marked_out[eqn.outvars[0]] = eqn.params["name"]
            stack.extend(_subjaxprs(eqn.params))
        if not marked_out:
            continue
        readers: dict[str, list[str]] = {name: [] for name in marked_out.values()}
        for eqn in current.eqns:
            label = eqn.params.get("name", "other") if eqn.primitive.name == "name" else "other"
            for var in eqn.invars:
                if isinstance(var, jax.extend.core.Var) and var in marked_out:
                    readers[marked_out[var]].append(label)
        for var in current.outvars:
            if isinstance(var, jax.extend.core.Var) and var in marked_out:
                readers[marked_out[var]].append("other")
        found.update(readers)
    return found


def trace_layers(
    apply_fn: Callable[..., Any], variables: Mapping[str, Any], image_shape: Sequence[int]
) -> LayerTrace:
    """Records the conv, dense and BatchNorm calls of a model in execution order.

    The model runs once in inference mode (``apply_fn(variables, x, False)``)
    on one abstract example (``jax.make_jaxpr``: nothing is computed). Every
    parameter must belong to a recorded module, every module must be called
    once, and every BatchNorm must use its running averages.

    Args:
      apply_fn: ``apply(variables, images, train) -> (logits, state)`` built on
        Flax modules (``models.make_apply_fn``); not jitted (a jitted function
        may reuse a cached trace that the interceptor never sees).
      variables: ``{"params": ..., "batch_stats": ...}``.
      image_shape: one example's shape, e.g. ``(32, 32, 3)``.

    Returns:
      The ``LayerTrace``.

    Raises:
      ValueError: if no layer was seen, a module is called twice, a
        BatchNorm is in training mode or normalizes another axis than the
        last, or some parameters belong to modules of another kind.

    Example:
      >>> from jax_memat import models
      >>> model = models.get_model("small_cnn", 10)
      >>> variables = models.init_model(model, jax.random.key(0), (28, 28, 1))
      >>> trace = trace_layers(models.make_apply_fn(model), variables, (28, 28, 1))
      >>> [(op.kind, op.name) for op in trace.ops][:2]
      [('conv', 'conv1'), ('bn', 'bn1')]
    """
    image_shape = tuple(int(d) for d in image_shape)
    records: list[dict[str, Any]] = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(
            module, (nn.Conv, nn.Dense, *_BN_TYPES)
        ):
            return next_fun(*args, **kwargs)
        index = len(records)
        x = args[0]
        record = {"path": tuple(module.path), "input_shape": tuple(x.shape[1:]), "module": module}
        records.append(record)
        if isinstance(module, _BN_TYPES):
            record["kind"] = "bn"
            running = kwargs.get("use_running_average")
            if running is None and len(args) > 1:
                running = args[1]
            if running is None:
                running = module.use_running_average
            if not running:
                raise ValueError(
                    f"BatchNorm {'/'.join(module.path)} runs in training mode with train=False; "
                    "norm measures need inference-mode BatchNorm."
                )
            if getattr(module, "axis", -1) not in (-1, x.ndim - 1):
                raise ValueError(
                    f"BatchNorm {'/'.join(module.path)} normalizes axis {module.axis}; only the "
                    "last (channel) axis is supported."
                )
            marked = checkpoint_name(x, f"{_MARK_BN_IN}{index}")
            return next_fun(marked, *args[1:], **kwargs)
        record["kind"] = "conv" if isinstance(module, nn.Conv) else "dense"
        return checkpoint_name(next_fun(*args, **kwargs), f"{_MARK_OUT}{index}")

    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    with nn.intercept_methods(interceptor):
        jaxpr = jax.make_jaxpr(lambda v, x: apply_fn(v, x, False)[0])(variables, images)
    if not records:
        raise ValueError(
            "No nn.Conv, nn.Dense or BatchNorm call was seen while tracing apply_fn: it must be "
            "an unjitted function of Flax modules (models.make_apply_fn)."
        )
    paths = [r["path"] for r in records]
    if len(set(paths)) != len(paths):
        twice = sorted({"/".join(p) for p in paths if paths.count(p) > 1})
        raise ValueError(
            f"Modules called more than once (shared weights) are unsupported: {twice}."
        )
    _check_params_covered(variables, paths)

    consumers = _marker_consumers(jaxpr.jaxpr)
    ops = []
    for index, record in enumerate(records):
        feeds_bn = None
        epsilon = None
        module = record["module"]
        if record["kind"] == "bn":
            epsilon = float(module.epsilon)
            linear = None
        else:
            readers = consumers.get(f"{_MARK_OUT}{index}", [])
            if len(readers) == 1 and readers[0].startswith(_MARK_BN_IN):
                feeds_bn = int(readers[0][len(_MARK_BN_IN) :])
            linear = module.clone(
                parent=None, name=None, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32
            )
        ops.append(
            TracedOp(
                kind=record["kind"],
                path=record["path"],
                input_shape=record["input_shape"],
                module=linear,
                epsilon=epsilon,
                feeds_bn=feeds_bn,
            )
        )
    return LayerTrace(ops=tuple(ops), image_shape=image_shape)


def _check_params_covered(variables: Mapping[str, Any], paths: list[tuple[str, ...]]) -> None:
    prefixes = set(paths)
    for path, _ in jax.tree_util.tree_flatten_with_path(variables.get("params", {}))[0]:
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        if keys[:-1] not in prefixes:
            raise ValueError(
                f"Parameter params/{'/'.join(keys)} belongs to no nn.Conv, nn.Dense or BatchNorm "
                "module; norm measures support only those layers."
            )


def _lookup(tree: Mapping[str, Any], path: tuple[str, ...]) -> Mapping[str, Any]:
    for key in path:
        tree = tree[key]
    return tree


def _bn_affine(variables: Mapping[str, Any], op: TracedOp) -> tuple[np.ndarray, np.ndarray]:
    """The inference-mode BatchNorm as ``x -> s * x + t``, in float64."""
    params = _lookup(variables["params"], op.path) if op.path else variables["params"]
    stats = _lookup(variables["batch_stats"], op.path)
    mean = np.asarray(stats["mean"], np.float64)
    var = np.asarray(stats["var"], np.float64)
    gamma = np.asarray(params["scale"], np.float64) if "scale" in params else np.ones_like(mean)
    beta = np.asarray(params["bias"], np.float64) if "bias" in params else np.zeros_like(mean)
    s = gamma / np.sqrt(var + op.epsilon)
    return s, beta - s * mean


def bn_policy(trace: LayerTrace, bn: str = "fold") -> dict[str, str]:
    """What the policy ``bn`` does with each BatchNorm of a traced model.

    Args:
      trace: from ``trace_layers``.
      bn: ``"fold"`` or ``"diagonal"``.

    Returns:
      ``{bn_name: "folded into <layer name>" or "diagonal"}`` in execution order.

    Example:
      >>> from jax_memat import models
      >>> model = models.get_model("small_cnn", 10)
      >>> init = lambda key: models.init_model(model, key, (28, 28, 1))
      >>> shapes = jax.eval_shape(init, jax.random.key(0))
      >>> trace = trace_layers(models.make_apply_fn(model), shapes, (28, 28, 1))
      >>> bn_policy(trace, "fold")
      {'bn1': 'folded into conv1', 'bn2': 'folded into conv2'}
    """
    check_bn_policy(bn)
    folded = {}
    if bn == "fold":
        folded = {op.feeds_bn: op.name for op in trace.ops if op.feeds_bn is not None}
    return {
        op.name: f"folded into {folded[i]}" if i in folded else "diagonal"
        for i, op in enumerate(trace.ops)
        if op.kind == "bn"
    }


def extract_layers(
    apply_fn: Callable[..., Any] | None,
    variables: Mapping[str, Any],
    image_shape: Sequence[int] | None = None,
    *,
    bn: str = "fold",
    trace: LayerTrace | None = None,
) -> Layers:
    """The ordered weight layers W_i (with biases) under a BatchNorm policy.

    See the module docstring for the policy. Folding uses each BatchNorm's
    running statistics and epsilon (inference mode).

    Args:
      apply_fn: the model function (see ``trace_layers``); may be None when
        ``trace`` is given.
      variables: ``{"params": ..., "batch_stats": ...}``.
      image_shape: one example's shape, for tracing (ignored with ``trace``).
      bn: ``"fold"`` or ``"diagonal"``.
      trace: a ``LayerTrace`` from an earlier call (e.g. for the initial
        variables of the same model), to skip tracing.

    Returns:
      A ``Layers``.

    Raises:
      ValueError: for an unknown ``bn`` (before tracing), or see ``trace_layers``.

    Example:
      >>> from jax_memat import models
      >>> model = models.get_model("preact_resnet18", 10)
      >>> variables = models.init_model(model, jax.random.key(0), (8, 8, 3))
      >>> layers = extract_layers(models.make_apply_fn(model), variables, (8, 8, 3))
      >>> layers.bn_policy["stage1_block0/bn1"], layers.bn_policy["stage1_block0/bn2"]
      ('diagonal', 'folded into stage1_block0/conv1')
    """
    check_bn_policy(bn)
    if trace is None:
        if apply_fn is None or image_shape is None:
            raise ValueError("extract_layers needs apply_fn and image_shape, or a trace.")
        trace = trace_layers(apply_fn, variables, image_shape)
    policy = bn_policy(trace, bn)
    layers = []
    for op in trace.ops:
        if op.kind == "bn":
            if policy[op.name] != "diagonal":
                continue
            s, t = _bn_affine(variables, op)
            layers.append(WeightLayer(op.name, op.path, "bn", s, t, op.input_shape, None, None))
            continue
        params = _lookup(variables["params"], op.path)
        kernel = np.asarray(params["kernel"], np.float64)
        bias = np.asarray(params["bias"], np.float64) if "bias" in params else None
        name = op.name
        bn_name = None
        if op.feeds_bn is not None and bn == "fold":
            bn_op = trace.ops[op.feeds_bn]
            s, t = _bn_affine(variables, bn_op)
            # conv(x; W) * s + t with W scaled along its last (output) axis.
            kernel = kernel * s
            bias = t if bias is None else t + s * bias
            bn_name = bn_op.name
            name = f"{op.name}+{bn_op.path[-1]}"
        layers.append(
            WeightLayer(name, op.path, op.kind, kernel, bias, op.input_shape, op.module, bn_name)
        )
    return Layers(layers=tuple(layers), bn_policy=policy, bn=bn, trace=trace)


def apply_layers(
    apply_fn: Callable[..., Any],
    variables: Mapping[str, Any],
    layers: Layers,
    images: np.ndarray | jax.Array,
    *,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """Runs the model in inference mode with its weight layers replaced by ``layers``.

    Each conv/dense module applies its ``WeightLayer``'s kernel and bias
    (after folding), a folded BatchNorm is the identity and a diagonal one is
    ``x -> s * x + t``; everything else (activations, pooling, residual adds)
    is the model's own. On the layers of ``extract_layers`` this computes the
    model's inference-mode logits (the check that folding is exact); on
    modified layers (e.g. squared, for the path norm) the network they define.

    Args:
      apply_fn: the model function ``layers`` was traced with (unjitted).
      variables: variables of the same structure (their values are not used
        by the replaced modules).
      layers: ``WeightLayer``s of this model (possibly modified).
      images: ``[B, ...]`` float inputs.
      dtype: the dtype the replaced layers compute in. ``jnp.float64``
        needs ``jax.enable_x64(True)`` around the call (``path_norm`` does
        this on the CPU); the model's own operations between the layers
        follow their inputs' dtype.

    Returns:
      ``[B, num_classes]`` logits of ``dtype``.

    Example:
      >>> from jax_memat import models
      >>> model = models.get_model("small_cnn", 10)
      >>> variables = models.init_model(model, jax.random.key(0), (28, 28, 1))
      >>> apply = models.make_apply_fn(model)
      >>> layers = extract_layers(apply, variables, (28, 28, 1))
      >>> apply_layers(apply, variables, layers, np.zeros((2, 28, 28, 1))).shape
      (2, 10)
    """
    linear = {}
    diagonal = {}
    for layer in layers.layers:
        bias = None if layer.bias is None else jnp.asarray(layer.bias, dtype)
        if layer.kind == "bn":
            diagonal[layer.path] = (jnp.asarray(layer.kernel, dtype), bias)
        else:
            # The clone computes in ``dtype``: the model's module may pin float32.
            module = layer.module.clone(dtype=dtype, param_dtype=dtype)
            linear[layer.path] = (module, jnp.asarray(layer.kernel, dtype), bias)
    folded = {
        op.path
        for op in layers.trace.ops
        if op.kind == "bn" and layers.bn_policy[op.name] != "diagonal"
    }

    def interceptor(next_fun, args, kwargs, context):
        path = tuple(context.module.path)
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        x = args[0]
        if path in linear:
            module, kernel, bias = linear[path]
            out = module.apply({"params": {"kernel": kernel}}, x.astype(dtype))
            return out if bias is None else out + bias
        if path in diagonal:
            scale, shift = diagonal[path]
            return x.astype(dtype) * scale + shift
        if path in folded:
            return x
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        logits, _ = apply_fn(variables, jnp.asarray(images, dtype), False)
    return logits.astype(dtype)
