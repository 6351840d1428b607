"""One set of weights in both frameworks: jax_memat's Flax variables as a PyTorch state_dict.

The benchmarks that compare attacks (``eval_throughput.py``) must attack the
*same* network in JAX and in PyTorch, so the robust accuracies of the two can
be compared and neither side times a different function. The Flax models of
``jax_memat.models`` and the PyTorch models of ``torch_baseline.py`` compute the
same thing (same layers, explicit padding ``k // 2``, BatchNorm epsilon 1e-5,
the small CNN's max pool padded like ``ceil_mode=True``); only the parameter
names and memory layouts differ:

* convolution kernels: Flax ``[kh, kw, in, out]`` (HWIO), PyTorch
  ``[out, in, kh, kw]`` (OIHW);
* dense kernels: Flax ``[in, out]``, PyTorch ``weight`` ``[out, in]``;
* BatchNorm: Flax ``params/scale``, ``params/bias``, ``batch_stats/mean``,
  ``batch_stats/var``; PyTorch ``weight``, ``bias``, ``running_mean``,
  ``running_var`` (and ``num_batches_tracked``, which inference ignores);
* the small CNN's first dense layer reads a flattened ``4 x 4 x C`` map: Flax
  flattens NHWC, i.e. in (h, w, c) order, PyTorch NCHW, in (c, h, w) order, so
  the kernel's input rows are permuted.

``torch_state_arrays`` needs only NumPy; ``load_into_torch`` needs torch.

Example::

    import jax
    from jax_memat.models import get_model, init_model
    import torch_baseline, weight_transfer

    variables = init_model(get_model("resnet18", 10), jax.random.key(0), (32, 32, 3))
    net = torch_baseline.get_model("resnet18")
    weight_transfer.load_into_torch(net, "resnet18", variables)
    net.eval()  # now computes the Flax model's inference-mode logits
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["MODELS", "load_into_torch", "torch_state_arrays"]

MODELS = ("preact_resnet18", "resnet18", "small_cnn")
# Spatial size of the map the small CNN flattens: 28x28 and 32x32 inputs both end
# in 4x4 (jax_memat.models.small_cnn).
_SMALL_CNN_FLAT_HW = (4, 4)


def _block_prefix(name: str) -> str | None:
    """``"stage2_block1"`` -> ``"layer2.1"`` (PyTorch's ``nn.Sequential`` indices)."""
    if not name.startswith("stage") or "_block" not in name:
        return None
    stage, block = name[len("stage") :].split("_block")
    return f"layer{int(stage)}.{int(block)}"


def _torch_module_name(model_name: str, path: tuple[str, ...]) -> str:
    """The PyTorch module a Flax module path (names from the root) maps to."""
    parts = []
    for i, name in enumerate(path):
        block = _block_prefix(name) if i == 0 else None
        if block is not None:
            parts.append(block)
        elif model_name == "resnet18" and path == ("bn1",):
            parts.append("bn")  # the stem's BatchNorm; torch_baseline names it bn
        elif model_name == "resnet18" and name == "shortcut_conv":
            parts.append("shortcut.0")
        elif model_name == "resnet18" and name == "shortcut_bn":
            parts.append("shortcut.1")
        else:
            parts.append(name)
    return ".".join(parts)


def _modules(tree: Mapping[str, Any], path: tuple[str, ...] = ()):
    """Yields ``(path, leaves)`` for every Flax module holding arrays directly."""
    leaves = {k: v for k, v in tree.items() if not isinstance(v, Mapping)}
    if leaves:
        yield path, leaves
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _modules(v, (*path, k))


def torch_state_arrays(model_name: str, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax variables of a jax_memat model as the arrays of ``torch_baseline``'s state_dict.

    Args:
      model_name: ``"preact_resnet18"``, ``"resnet18"`` or ``"small_cnn"``.
      variables: ``{"params": ..., "batch_stats": ...}`` of that model (from
        ``jax_memat.models.init_model`` or a checkpoint), float32, host or device.

    Returns:
      ``{state_dict key: float32 array in PyTorch's layout}``, plus
      ``num_batches_tracked`` (int64 zeros) for every BatchNorm, so the dict
      loads with ``strict=True``.

    Raises:
      ValueError: for an unknown model name, variables without ``params``, or an
        entry of ``variables`` that no PyTorch parameter takes (a different
        model's variables).

    Example::

        arrays = torch_state_arrays("small_cnn", variables)
        arrays["conv1.weight"].shape  # (32, 1, 3, 3)
    """
    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; accepted: {', '.join(MODELS)}")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables must be a dict with 'params' (and 'batch_stats' for BatchNorm)")
    unknown = sorted(set(variables) - {"params", "batch_stats"})
    if unknown:
        raise ValueError(f"variables has collections {unknown}; accepted: params, batch_stats")
    stats = dict(_modules(variables.get("batch_stats", {})))
    out: dict[str, np.ndarray] = {}
    for path, leaves in _modules(variables["params"]):
        name = _torch_module_name(model_name, path)
        leaves = {k: np.asarray(v, np.float32) for k, v in leaves.items()}
        if set(leaves) == {"scale", "bias"}:  # BatchNorm
            running = stats.pop(path, None)
            if running is None or set(running) != {"mean", "var"}:
                raise ValueError(f"BatchNorm {'/'.join(path)} has no batch_stats mean and var")
            out[f"{name}.weight"] = leaves["scale"]
            out[f"{name}.bias"] = leaves["bias"]
            out[f"{name}.running_mean"] = np.asarray(running["mean"], np.float32)
            out[f"{name}.running_var"] = np.asarray(running["var"], np.float32)
            out[f"{name}.num_batches_tracked"] = np.zeros((), np.int64)
        elif set(leaves) <= {"kernel", "bias"} and "kernel" in leaves:
            kernel = leaves["kernel"]
            if kernel.ndim == 4:  # HWIO -> OIHW
                out[f"{name}.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
            elif kernel.ndim == 2:
                if model_name == "small_cnn" and path == ("fc1",):
                    kernel = _nhwc_rows_to_nchw(kernel, _SMALL_CNN_FLAT_HW)
                out[f"{name}.weight"] = np.ascontiguousarray(kernel.T)
            else:
                raise ValueError(f"{'/'.join(path)}/kernel has {kernel.ndim} axes; expected 2 or 4")
            if "bias" in leaves:
                out[f"{name}.bias"] = leaves["bias"]
        else:
            raise ValueError(f"{'/'.join(path)} holds {sorted(leaves)}, no known layer")
    if stats:
        raise ValueError(f"batch_stats without parameters: {sorted('/'.join(p) for p in stats)}")
    return out


def _nhwc_rows_to_nchw(kernel: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Reorders a dense kernel's input rows from (h, w, c) flattening to (c, h, w)."""
    rows, cols = kernel.shape
    h, w = hw
    if rows % (h * w):
        raise ValueError(f"a dense layer after a {h}x{w} map needs a multiple of {h * w} inputs")
    channels = rows // (h * w)
    return kernel.reshape(h, w, channels, cols).transpose(2, 0, 1, 3).reshape(rows, cols)


def load_into_torch(torch_model, model_name: str, variables: Mapping[str, Any]):
    """Loads jax_memat variables into a ``torch_baseline`` model, checking every entry.

    Args:
      torch_model: ``torch_baseline.get_model(model_name, num_classes)``, on any device.
      model_name: its registry name (the same in both frameworks).
      variables: the Flax model's ``{"params", "batch_stats"}``.

    Returns:
      ``torch_model``, its parameters and BatchNorm statistics replaced; put it
      in ``eval()`` mode to compute the Flax model's ``train=False`` logits.

    Raises:
      ValueError: if a key is missing on either side or a shape differs (the
        two models are not the same architecture), before anything is loaded.

    Example::

        net = load_into_torch(torch_baseline.get_model("small_cnn"), "small_cnn", variables)
    """
    import torch

    arrays = torch_state_arrays(model_name, variables)
    target = torch_model.state_dict()
    missing, extra = sorted(set(target) - set(arrays)), sorted(set(arrays) - set(target))
    if missing or extra:
        raise ValueError(
            f"{model_name}: PyTorch entries without a Flax value {missing}, Flax values "
            f"without a PyTorch entry {extra}"
        )
    wrong = [
        f"{k}: torch {tuple(target[k].shape)} vs flax {v.shape}"
        for k, v in arrays.items()
        if tuple(target[k].shape) != v.shape
    ]
    if wrong:
        raise ValueError(f"{model_name}: shapes differ: {'; '.join(wrong)}")
    state = {
        # A copy: arrays fetched from JAX are read-only, which torch.from_numpy warns about.
        k: torch.from_numpy(np.array(v)).to(device=target[k].device, dtype=target[k].dtype)
        for k, v in arrays.items()
    }
    torch_model.load_state_dict(state, strict=True)
    return torch_model
