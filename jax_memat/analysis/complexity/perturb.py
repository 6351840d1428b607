"""Weight perturbations and the evaluation of perturbed models on a data subset.

The search- and data-based complexity measures (``sharpness``, ``flatness``)
all ask how a model's accuracy or loss changes when its weights move. This
module holds what they share:

- **Which parameters move** (``which``, one of ``PERTURB_SETS``; default
  ``DEFAULT_PERTURB = "weights"``):

  * ``"all"``: every leaf of ``variables["params"]``;
  * ``"weights"``: the convolution and dense layers' kernels and biases,
    not the normalization layers' scales and shifts (a Flax module holding a
    ``"scale"`` and no ``"kernel"``: BatchNorm, LayerNorm, GroupNorm); a
    parameter outside any such module counts as a weight;
  * ``"filter_normalized"``: the conv and dense kernels only (every parameter
    of at least two dimensions outside the normalization layers); 1-D
    parameters (biases, normalization) get a zero direction, as in the filter
    normalization of Li et al., "Visualizing the loss landscape of neural
    nets" (NeurIPS 2018, Sec. 4), whose random directions are rescaled filter
    by filter (``filter_normalize``).

  The running statistics (``variables["batch_stats"]``) never move.
- **Directions**: ``gaussian_direction`` (i.i.d. N(0, 1) on the selected
  parameters, zero elsewhere), ``filter_normalize`` and ``layer_normalize``
  (each tensor rescaled to a multiple of the weight tensor's norm), and
  ``add_to_params``.
- **The data subset** (``data_subset``): the first ``num_examples`` rows of a
  split in fixed ``[S, B]`` batches (the last padded and masked), the batch
  axis split over a ``jax.parallel`` mesh; and the evaluation of a (perturbed)
  model on it: ``subset_metrics`` (accuracy and mean cross-entropy) and
  ``subset_loss_and_grad`` (mean cross-entropy and its gradient in the
  parameters, accumulated batch by batch so memory holds one batch). Both run
  the model with BatchNorm in inference mode (``train=False``): in training
  mode BatchNorm would re-normalize each layer and absorb a perturbation of
  the weights before it. With ``inputs="adversarial"`` the attack is run
  against the model being evaluated, so it is regenerated after every weight
  perturbation.

Example:
  >>> from jax_memat.analysis.complexity import perturb
  >>> mask = perturb.perturbation_mask(variables["params"], "weights")
  >>> d = perturb.gaussian_direction(jax.random.key(0), variables["params"], mask)
  >>> moved = perturb.add_to_params(variables, jax.tree.map(lambda x: 0.01 * x, d))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_memat.attacks import AttackSpec, cross_entropy, make_attack
from jax_memat.data import eval_batches
from jax_memat.parallel import make_mesh, replicate

PERTURB_SETS = ("all", "weights", "filter_normalized")
DEFAULT_PERTURB = "weights"
INPUT_MODES = ("clean", "adversarial")

ApplyFn = Callable[[Any, jax.Array, bool], tuple[jax.Array, Any]]


def check_perturb_set(which: object) -> str:
    """Returns ``which`` if it is one of ``PERTURB_SETS``; raises ``ValueError`` otherwise."""
    if which not in PERTURB_SETS:
        raise ValueError(f"which={which!r} is not a perturbation set; accepted: {PERTURB_SETS}.")
    return which  # type: ignore[return-value]


def _is_norm_module(node: Any) -> bool:
    return isinstance(node, Mapping) and "scale" in node and "kernel" not in node


def perturbation_mask(params: Any, which: str = DEFAULT_PERTURB) -> Any:
    """Which leaves of ``params`` a perturbation of set ``which`` moves.

    Args:
      params: the ``"params"`` collection of a model's variables.
      which: one of ``PERTURB_SETS`` (see the module docstring).

    Returns:
      A pytree of Python bools with the structure of ``params``.

    Example:
      >>> params = {"conv": {"kernel": k}, "bn": {"scale": s, "bias": b}}
      >>> perturbation_mask(params, "weights")
      {'bn': {'bias': False, 'scale': False}, 'conv': {'kernel': True}}
    """
    check_perturb_set(which)

    def walk(node: Any, in_norm: bool) -> Any:
        if isinstance(node, Mapping):
            norm = in_norm or _is_norm_module(node)
            return {k: walk(v, norm) for k, v in node.items()}
        if which == "all":
            return True
        if in_norm:
            return False
        return which == "weights" or np.ndim(node) >= 2

    return walk(params, False)


def _masked(mask: Any, tree: Any, fill: Callable[[Any], Any] = jnp.zeros_like) -> Any:
    return jax.tree.map(lambda m, x: x if m else fill(x), mask, tree)


def gaussian_direction(key: jax.Array, params: Any, mask: Any) -> Any:
    """I.i.d. standard normal entries on the leaves ``mask`` selects, zeros elsewhere.

    Args:
      key: PRNG key.
      params: the parameters (shapes and dtypes).
      mask: from ``perturbation_mask``.

    Returns:
      A pytree like ``params``.

    Example:
      >>> d = gaussian_direction(jax.random.key(0), params, perturbation_mask(params))
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    noise = [
        jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
        for k, x in zip(keys, leaves, strict=True)
    ]
    return _masked(mask, jax.tree.unflatten(treedef, noise))


def tree_sq_norm(tree: Any) -> jax.Array:
    """The squared L2 norm of all leaves of ``tree`` together (float32)."""
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def masked_sq_norm(tree: Any, mask: Any) -> jax.Array:
    """The squared L2 norm of the leaves of ``tree`` that ``mask`` selects."""
    return tree_sq_norm(_masked(mask, tree))


def filter_normalize(direction: Any, params: Any, mask: Any) -> Any:
    """Rescales each filter of ``direction`` to the norm of the same filter of ``params``.

    A filter is one output unit: the slice ``[..., j]`` of a conv kernel
    ``[kh, kw, c_in, c_out]`` or a dense kernel ``[d_in, d_out]`` (Li et al.,
    2018, Sec. 4, treat a dense layer as a 1x1 convolution). Leaves of fewer
    than two dimensions and leaves outside ``mask`` get zero, so the
    perturbation ``w + a d`` moves every filter by ``a`` times its own norm
    whatever the scale of its layer (BatchNorm makes that scale arbitrary).

    Args:
      direction: a pytree like ``params`` (e.g. from ``gaussian_direction``).
      params: the weights that set each filter's norm.
      mask: from ``perturbation_mask``.

    Returns:
      The normalized direction (zero where a filter of ``direction`` is zero).

    Example:
      >>> d = filter_normalize(gaussian_direction(key, params, mask), params, mask)
    """

    def one(m: bool, d: jax.Array, w: jax.Array) -> jax.Array:
        if not m or jnp.ndim(w) < 2:
            return jnp.zeros_like(d)
        axes = tuple(range(jnp.ndim(w) - 1))
        d_norm = jnp.sqrt(jnp.sum(jnp.square(d), axis=axes, keepdims=True))
        w_norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))
        return jnp.where(d_norm > 0, d * w_norm / jnp.where(d_norm > 0, d_norm, 1.0), 0.0)

    return jax.tree.map(one, mask, direction, params)


def layer_normalize(direction: Any, params: Any, mask: Any, radius: float | jax.Array) -> Any:
    """Rescales each tensor ``d_l`` of ``direction`` to norm ``radius * ||w_l||_2``.

    Every parameter tensor (a kernel, a bias) is one "layer" of the
    layer-wise relative ball of Stutz et al., "Relating adversarially robust
    generalization to flat minima" (ICCV 2021, Sec. 4). Leaves outside ``mask``
    and zero tensors of ``direction`` stay zero.

    Args:
      direction: a pytree like ``params``.
      params: the weights.
      mask: from ``perturbation_mask``.
      radius: the relative radius ``xi`` (a float or a traced scalar).

    Returns:
      The rescaled direction.

    Example:
      >>> nu = layer_normalize(gaussian_direction(key, params, mask), params, mask, 0.5)
    """

    def one(m: bool, d: jax.Array, w: jax.Array) -> jax.Array:
        if not m:
            return jnp.zeros_like(d)
        d_norm = jnp.sqrt(jnp.sum(jnp.square(d)))
        scale = radius * jnp.sqrt(jnp.sum(jnp.square(w))) / jnp.where(d_norm > 0, d_norm, 1.0)
        return (d * scale).astype(d.dtype)

    return jax.tree.map(one, mask, direction, params)


def add_to_params(variables: Mapping[str, Any], delta: Any) -> dict[str, Any]:
    """``variables`` with ``delta`` added to its ``"params"`` (other collections unchanged).

    Example:
      >>> moved = add_to_params(variables, delta)  # moved["batch_stats"] is variables'
    """
    out = dict(variables)
    out["params"] = jax.tree.map(lambda w, d: (w + d).astype(w.dtype), variables["params"], delta)
    return out


# --------------------------------------------------------------------------- data


class DataSubset(NamedTuple):
    """A split's first ``num_examples`` rows in ``[S, B]`` batches on a mesh.

    Attributes:
      images: float32 ``[S, B, H, W, C]``, the batch axis split over the mesh.
      labels: int32 ``[S, B]``.
      mask: float32 ``[S, B]``, 1 for a real example and 0 for padding.
      num_examples: the number of real examples.
    """

    images: jax.Array
    labels: jax.Array
    mask: jax.Array
    num_examples: int


def resolve_mesh(mesh: Mesh | None) -> Mesh:
    """``mesh``, or a mesh over every device when ``None``."""
    return make_mesh() if mesh is None else mesh


def check_data(images: Any, labels: Any | None, num_examples: int | None) -> int:
    """Validates a split's arrays; returns the number of examples to use.

    Raises:
      ValueError: integer images (pass floats in [0, 1]), mismatched lengths or
        ``num_examples`` outside ``[1, len(images)]``.
    """
    shape = np.shape(images)
    if len(shape) < 2 or not np.issubdtype(np.asarray(images[:1]).dtype, np.floating):
        raise ValueError(
            f"images must be a float array [N, ...] scaled to [0, 1]; got shape {shape} and "
            f"dtype {np.asarray(images[:1]).dtype} (divide uint8 images by 255)."
        )
    total = shape[0]
    if labels is not None and np.shape(labels) != (total,):
        raise ValueError(
            f"labels must have shape ({total},) to match images; got {np.shape(labels)}."
        )
    n = total if num_examples is None else num_examples
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 < n <= total:
        raise ValueError(f"num_examples must be an int in [1, {total}]; got {num_examples!r}.")
    return int(n)


def check_batch(batch_size: object, mesh: Mesh) -> int:
    """Returns ``batch_size`` if it is a positive multiple of the mesh's device count."""
    devices = mesh.devices.size
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(f"batch_size must be an int; got {batch_size!r}.")
    if batch_size <= 0 or batch_size % devices:
        raise ValueError(
            f"batch_size ({batch_size}) must be a positive multiple of the {devices} devices "
            f"of the mesh; accepted: {devices}, {2 * devices}, {4 * devices}, ..."
        )
    return int(batch_size)


def check_inputs(inputs: object, attack: AttackSpec | None) -> None:
    """Checks an ``inputs`` mode against the attack it needs.

    Raises:
      ValueError: an unknown mode, ``"adversarial"`` without an attack, an
        attack with ``"clean"`` (it would be silently unused), or an invalid
        attack spec.
    """
    if inputs not in INPUT_MODES:
        raise ValueError(f"inputs={inputs!r}; accepted: {INPUT_MODES}.")
    if inputs == "adversarial":
        if not isinstance(attack, AttackSpec):
            raise ValueError(
                "inputs='adversarial' needs attack=AttackSpec(...), e.g. "
                "AttackSpec('pgd', eps=8 / 255, step_size=2 / 255, steps=10); got "
                f"{attack!r}."
            )
        attack.validate()
    elif attack is not None:
        raise ValueError("attack is only used with inputs='adversarial'; pass attack=None.")


def as_key(key: jax.Array) -> jax.Array:
    """A typed PRNG key from a typed or a raw (``uint32[2]``) key."""
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return key


def data_subset(
    images: Any, labels: Any, *, num_examples: int, batch_size: int, mesh: Mesh
) -> DataSubset:
    """The first ``num_examples`` rows as ``[S, B]`` batches, ``B`` split over ``mesh``.

    Args:
      images: float images ``[N, ...]`` in ``[0, 1]``.
      labels: integer labels ``[N]``.
      num_examples: rows ``[0, num_examples)`` are used (validated by ``check_data``).
      batch_size: ``B``, a multiple of the device count (``check_batch``).
      mesh: the device mesh.

    Returns:
      A ``DataSubset`` (the last batch padded with row 0, masked out).

    Example:
      >>> subset = data_subset(x, y, num_examples=1000, batch_size=256, mesh=make_mesh())
    """
    indices, mask = eval_batches(num_examples, batch_size)
    x = np.asarray(images[:num_examples], np.float32)[indices]
    y = np.asarray(labels[:num_examples]).astype(np.int32)[indices]
    split = NamedSharding(mesh, PartitionSpec(None, mesh.axis_names[0]))
    return DataSubset(
        jax.device_put(x, split),
        jax.device_put(y, split),
        jax.device_put(mask, split),
        num_examples,
    )


def place_variables(variables: Any, mesh: Mesh) -> Any:
    """``variables`` as float arrays replicated on every device of ``mesh``."""
    return replicate(jax.tree.map(jnp.asarray, variables), mesh)


def make_inputs_fn(
    apply_fn: ApplyFn, attack: AttackSpec | None
) -> Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]:
    """``inputs(variables, x, y, key)``: ``x`` itself, or the attack against ``variables``."""
    if attack is None:
        return lambda variables, x, y, key: x
    run = make_attack(attack)
    return lambda variables, x, y, key: run(apply_fn, variables, x, y, key)


def subset_metrics(
    apply_fn: ApplyFn, attack: AttackSpec | None
) -> Callable[[Any, DataSubset, jax.Array], tuple[jax.Array, jax.Array]]:
    """``metrics(variables, subset, key) -> (accuracy, mean cross-entropy)`` (traceable).

    Batch ``s`` of the subset attacks with ``fold_in(key, s)``; the model runs
    in inference mode. Not jitted here: callers jit it inside their own
    programs.

    Example:
      >>> acc, loss = jax.jit(subset_metrics(apply_fn, None))(variables, subset, key)
    """
    inputs_fn = make_inputs_fn(apply_fn, attack)

    def metrics(variables: Any, subset: DataSubset, key: jax.Array):
        def body(carry, batch):
            s, x, y, m = batch
            x = inputs_fn(variables, x, y, jax.random.fold_in(key, s))
            logits, _ = apply_fn(variables, x, False)
            correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
            loss = cross_entropy(logits.astype(jnp.float32), y)
            return (carry[0] + jnp.sum(m * correct), carry[1] + jnp.sum(m * loss)), None

        steps = jnp.arange(subset.labels.shape[0])
        zero = jnp.zeros((), jnp.float32)
        (correct, loss), _ = jax.lax.scan(
            body, (zero, zero), (steps, subset.images, subset.labels, subset.mask)
        )
        return correct / subset.num_examples, loss / subset.num_examples

    return metrics


def subset_loss_and_grad(
    apply_fn: ApplyFn, attack: AttackSpec | None
) -> Callable[[Any, DataSubset, jax.Array], tuple[jax.Array, Any]]:
    """``loss_grad(variables, subset, key) -> (mean CE, d mean CE / d params)`` (traceable).

    The gradient is accumulated batch by batch (one batch's activations in
    memory). With an attack, the adversarial inputs are regenerated against
    ``variables`` and held fixed for the gradient (the attack's output is
    behind ``stop_gradient``): by Danskin's theorem that is the gradient of
    the robust loss.

    Example:
      >>> loss, grad = jax.jit(subset_loss_and_grad(apply_fn, attack))(variables, subset, key)
    """
    inputs_fn = make_inputs_fn(apply_fn, attack)

    def loss_grad(variables: Any, subset: DataSubset, key: jax.Array):
        def batch_loss(params, x, y, m):
            logits, _ = apply_fn({**variables, "params": params}, x, False)
            return jnp.sum(m * cross_entropy(logits.astype(jnp.float32), y))

        def body(carry, batch):
            s, x, y, m = batch
            x = inputs_fn(variables, x, y, jax.random.fold_in(key, s))
            loss, grad = jax.value_and_grad(batch_loss)(variables["params"], x, y, m)
            return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], grad)), None

        steps = jnp.arange(subset.labels.shape[0])
        zeros = jax.tree.map(lambda w: jnp.zeros_like(w, jnp.float32), variables["params"])
        (loss, grad), _ = jax.lax.scan(
            body,
            (jnp.zeros((), jnp.float32), zeros),
            (steps, subset.images, subset.labels, subset.mask),
        )
        n = subset.num_examples
        return loss / n, jax.tree.map(lambda g: g / n, grad)

    return loss_grad
