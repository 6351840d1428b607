"""FLOPs of the PGD-AT step and model FLOP utilization (MFU).

Two counts of one training step's floating-point operations:

* **analytic** (the model's FLOPs): the multiply-adds of the network's
  convolutions and dense layers, read from the jaxpr of one inference-mode
  forward pass (2 FLOPs per multiply-add), then scaled by the passes the
  PGD-AT step makes. With F the forward FLOPs and F1 those of the first layer
  (the one that reads the image):

  - each of the ``k`` attack steps: a forward and the gradient with respect
    to the *input* only, i.e. every layer's data gradient (one transposed
    convolution / matrix product each, F in all): 2F;
  - the training step: a forward, the weight gradients (F) and the data
    gradients of every layer but the first (F - F1): 3F - F1.

  So ``(2k + 3) F - F1`` per step; 23F - F1 for PGD-10. Elementwise work
  (BatchNorm, ReLU, the attack's sign step and projection, the optimizer) is
  left out, as in the usual MFU convention (Chowdhery et al., "PaLM", 2022,
  Appendix B: model FLOPs, without rematerialisation).
* **XLA**: ``flops`` of the compiled step's cost analysis
  (``jitted.lower(...).compile().cost_analysis()``), everything XLA counts,
  elementwise work included, for the program one device runs.

MFU = analytic FLOPs per step x steps per second / peak FLOP/s of the devices
used. Peaks are datasheet figures for dense (not sparse) math; the benchmark
computes MFU from measured throughput and these peaks, it does not measure it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

# Dense peak TFLOP/s per GPU from NVIDIA's datasheets (the sparsity figures halved):
# "NVIDIA H100 Tensor Core GPU" datasheet, H100 SXM column: FP32 67, TF32 Tensor
# Core 989 (sparse) -> 494.7, BF16 Tensor Core 1,979 (sparse) -> 989.4; the
# "NVIDIA H200 Tensor Core GPU" datasheet gives the same compute figures.
# "float32" is the non-tensor-core FP32 rate; XLA's default precision on these
# GPUs runs float32 convolutions on TF32 tensor cores, so float32 results are
# also reported against "tf32".
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.4, "tf32": 494.7, "float32": 66.9},
    "H100 SXM": {"bfloat16": 989.4, "tf32": 494.7, "float32": 66.9},
}
# device_kind strings (jax.Device.device_kind) -> a row of PEAK_TFLOPS. The PCIe
# and NVL H100 have lower clocks and other peaks: not guessed here.
_KIND_PATTERNS = (("H200", "H200"), ("H100 80GB HBM3", "H100 SXM"), ("H100 SXM", "H100 SXM"))


def known_peak_tflops(device_kind: str) -> dict[str, float] | None:
    """The datasheet peaks for a device, by ``jax.Device.device_kind``, or None if not known.

    Args:
      device_kind: e.g. ``"NVIDIA H200"`` or ``"NVIDIA H100 80GB HBM3"``.

    Returns:
      ``{"bfloat16": ..., "tf32": ..., "float32": ...}`` in TFLOP/s, or None.

    Example:
      >>> known_peak_tflops("NVIDIA H200")["bfloat16"]
      989.4
      >>> known_peak_tflops("cpu") is None
      True
    """
    for pattern, row in _KIND_PATTERNS:
        if pattern in device_kind:
            return dict(PEAK_TFLOPS[row])
    return None


def xla_flops(cost_analysis: Any) -> float | None:
    """``flops`` from a compiled executable's ``cost_analysis()``, whatever its form.

    JAX versions return a dict, a list of dicts (one per program; older
    releases), or None (a backend without cost analysis).

    Args:
      cost_analysis: what ``jax.stages.Compiled.cost_analysis()`` returned.

    Returns:
      The FLOPs (summed over the programs of a list), or None if absent.

    Example:
      >>> xla_flops([{"flops": 2.0}, {"flops": 3.0}]), xla_flops({"flops": 4.0}), xla_flops(None)
      (5.0, 4.0, None)
    """
    if cost_analysis is None:
        return None
    entries = [cost_analysis] if isinstance(cost_analysis, Mapping) else list(cost_analysis)
    values = [e.get("flops") for e in entries if isinstance(e, Mapping)]
    values = [float(v) for v in values if v is not None and float(v) >= 0]
    return sum(values) if values else None


def _subjaxprs(value: Any):
    from jax.extend import core

    if isinstance(value, core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, core.Jaxpr):
        yield value
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _subjaxprs(v)


def _eqn_flops(eqn) -> float:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
        out = eqn.outvars[0].aval.shape
        rhs = eqn.invars[1].aval.shape
        spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
        in_features = rhs[spec[1]]
        window = int(np.prod([rhs[d] for d in spec[2:]]))
        # Every output element: in_features (per group) x window multiply-adds.
        return 2.0 * float(np.prod(out)) * in_features * window
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        contracted = int(np.prod([lhs[d] for d in lhs_contract])) if lhs_contract else 1
        return 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * contracted
    return 0.0


def matmul_flops(jaxpr) -> list[float]:
    """The FLOPs of every convolution and matrix product of a jaxpr, in program order.

    Nested jaxprs (``jit``, ``custom_jvp``, ...) are walked; loops are not
    expected in a forward pass and are counted once.

    Args:
      jaxpr: a ``Jaxpr`` or ``ClosedJaxpr`` (``jax.make_jaxpr(f)(...)``).

    Returns:
      One entry per convolution / ``dot_general``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> matmul_flops(jax.make_jaxpr(jnp.dot)(jnp.ones((2, 3)), jnp.ones((3, 4))))
      [48.0]
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    found = []
    for eqn in jaxpr.eqns:
        flops = _eqn_flops(eqn)
        if flops:
            found.append(flops)
        for value in eqn.params.values():
            for sub in _subjaxprs(value):
                found.extend(matmul_flops(sub))
    return found


def forward_flops(
    apply_fn: Callable, variables: Mapping[str, Any], image_shape: tuple[int, ...]
) -> tuple[float, float]:
    """Analytic FLOPs of one inference-mode forward pass of one example.

    Args:
      apply_fn: ``apply(variables, images, train) -> (logits, state)`` (``make_apply_fn``).
      variables: the model's variables (shapes are what matter).
      image_shape: one example's shape, e.g. ``(32, 32, 3)``.

    Returns:
      ``(F, F1)``: the forward FLOPs and those of its first layer.

    Example:
      >>> f, f1 = forward_flops(apply_fn, state.variables, (28, 28, 1))  # doctest: +SKIP
    """
    import jax
    import jax.numpy as jnp

    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda v, x: apply_fn(v, x, False)[0])(variables, images)
    counts = matmul_flops(jaxpr)
    if not counts:
        raise ValueError("no convolution or matrix product found in the model's forward pass")
    return float(sum(counts)), float(counts[0])


def pgd_at_step_flops(forward: float, first_layer: float, attack_steps: int, batch: int) -> float:
    """Analytic FLOPs of one PGD-AT step: ``batch x ((2k + 3) F - F1)`` (module docstring).

    Args:
      forward: F, one example's forward FLOPs.
      first_layer: F1, the first layer's share of F.
      attack_steps: k, PGD iterations.
      batch: examples per step.

    Returns:
      FLOPs per step.

    Example:
      >>> pgd_at_step_flops(10.0, 1.0, 10, 2)
      458.0
    """
    if attack_steps < 0 or batch < 1 or not 0 <= first_layer <= forward:
        raise ValueError(
            f"need attack_steps >= 0, batch >= 1 and 0 <= first_layer <= forward; got "
            f"{attack_steps}, {batch}, {first_layer}, {forward}"
        )
    return batch * ((2 * attack_steps + 3) * forward - first_layer)


def utilization(
    flops_per_step: float | None, steps_per_s: float, peak_tflops: float | None, devices: int
) -> float | None:
    """FLOP utilization: ``flops_per_step x steps_per_s / (peak x devices)``, or None.

    Args:
      flops_per_step: FLOPs of one step over all devices (None: unknown).
      steps_per_s: measured steps per second.
      peak_tflops: one device's peak in TFLOP/s (None: unknown).
      devices: devices the step ran on.

    Returns:
      A fraction (0.35 is 35%), or None when a figure is missing.

    Example:
      >>> utilization(1e12, 100.0, 1000.0, 1)
      0.1
    """
    if flops_per_step is None or peak_tflops is None or peak_tflops <= 0:
        return None
    return flops_per_step * steps_per_s / (peak_tflops * 1e12 * devices)
