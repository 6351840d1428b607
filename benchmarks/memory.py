"""Where the PGD-AT step's device memory goes: XLA's buffer accounting against an analytic count.

The GPU benchmark (train_throughput.py) reads the allocator's ``peak_bytes_in_use``,
which holds everything the process ever had on the device at once, the
compiler's own work included. This script asks the compiled program instead:
``step.lower(state, batch).compile().memory_analysis()`` gives the bytes XLA's
buffer assignment reserves for the program's arguments, outputs (the donated
state is written in place: ``alias``) and temporaries, per device. It runs on
any backend, without running the step: on a CPU it describes the XLA:CPU
program, on a GPU the XLA:GPU one.

Beside it, an analytic count per device:

* the train state (parameters, SGD momentum, BatchNorm statistics), the
  gradients (the size of the parameters, float32) and the batch;
* the residuals JAX's reverse-mode differentiation saves for the backward pass
  of the training forward (BatchNorm in training mode, weights' gradients) and
  of one attack iteration (inference mode, the input's gradient), read from the
  jaxpr of ``jax.vjp``: what the backward pass needs before XLA fuses
  elementwise operations and recomputes cheap ones, so an upper bound of what
  the compiled program keeps.

It also counts the compiled program's convolutions by element type: XLA:CPU
has no bfloat16 convolution and runs them in float32 (converting around
them), so the CPU's bfloat16 program is no guide to a GPU's.

Example::

    python benchmarks/memory.py --model preact_resnet18 --batch-size 128 \\
        --dtype float32,bfloat16 --out benchmarks/results/memory_cpu.json
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import train_throughput as tt  # noqa: E402  (the benchmark's builders, beside this file)

MIB = 2**20
# An HLO instruction's (first) result type and opcode: "%c = f32[16,4,4,512]{3,2,1,0}
# convolution(...", or "%c = (f32[...]{...}, u8[...]{0}) custom-call(..." for a cuDNN call.
_HLO_OP = re.compile(r"=\s*\(?(\w+)\[[^\]]*\]\S*(?:,[^)]*\))?\s+([\w-]+)\(")
_CUSTOM_CALL_TARGET = re.compile(r'custom_call_target="([^"]*)"')


def tree_bytes(tree) -> int:
    """Bytes of a pytree's arrays (a replicated array counts once: one device's copy).

    Example:
      >>> tree_bytes({"a": jnp.zeros(4), "b": jnp.zeros(2, jnp.bfloat16)})
      20
    """
    import jax

    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def residual_bytes(fn, x) -> int:
    """Bytes of what ``jax.vjp(fn, x)`` saves for the backward pass, inputs left out.

    The residuals are the leaves of the VJP function; those that are the
    differentiated input itself (already in memory) and literals are not
    counted. Arrays ``fn`` closes over that the backward pass needs are
    counted (for an attack iteration, the network's kernels; for the training
    pass, the batch), so the figure can overlap the state and the batch it is
    added to, by their size at most. Read from a jaxpr: nothing runs.

    Args:
      fn: a function of one pytree ``x``.
      x: the pytree differentiated with respect to (arrays or ShapeDtypeStructs).

    Returns:
      The residuals' total size in bytes.

    Example:
      >>> residual_bytes(lambda w: jnp.sum(jnp.sin(w)), jnp.zeros(100))  # cos(w), float32
      400
    """
    import jax
    from jax.extend.core import Var

    def residuals(x):
        _, vjp_fn = jax.vjp(fn, x)
        return jax.tree.leaves(vjp_fn)

    closed = jax.make_jaxpr(residuals)(x)
    inputs = {id(v) for v in closed.jaxpr.invars}
    return sum(
        int(aval.size) * aval.dtype.itemsize
        for v, aval in zip(closed.jaxpr.outvars, closed.out_avals, strict=True)
        if isinstance(v, Var) and id(v) not in inputs
    )


def convolutions_by_dtype(hlo_text: str) -> dict[str, int]:
    """Counts a compiled program's convolutions by result element type.

    XLA:CPU keeps ``convolution`` instructions; XLA:GPU turns them into
    custom calls to cuDNN (``__cudnn$conv...``), counted too.

    Example:
      >>> convolutions_by_dtype("%c = f32[1,4,4,8]{3,2,1,0} convolution(%a, %b), window=...")
      {'f32': 1}
      >>> convolutions_by_dtype(
      ...     '%d = (bf16[1,4,4,8]{3,2,1,0}, u8[0]{0}) custom-call(%a, %b), '
      ...     'custom_call_target="__cudnn$convForward"')
      {'bf16': 1}
    """
    counts: collections.Counter = collections.Counter()
    for line in hlo_text.splitlines():
        match = _HLO_OP.search(line)
        if match is None:
            continue
        dtype, opcode = match.groups()
        target = _CUSTOM_CALL_TARGET.search(line) if opcode == "custom-call" else None
        if opcode == "convolution" or (target is not None and "conv" in target.group(1).lower()):
            counts[dtype] += 1
    return dict(sorted(counts.items()))


def analytic_bytes(built: tt.JaxStep, batch_size: int) -> dict:
    """The analytic per-device count (module docstring) for a built step.

    Args:
      built: from ``train_throughput.build_jax_step``.
      batch_size: the global batch (split over ``built.n_devices``).

    Returns:
      Bytes per device: ``params``, ``opt_state``, ``model_state``, ``state``
      (the whole train state), ``grads``, ``batch``, ``train_residuals``,
      ``attack_residuals`` and ``estimate`` = state + batch + grads + the larger
      of the two residuals (the attack's are freed before the training pass).

    Example:
      >>> analytic_bytes(tt.build_jax_step("small_cnn", 8, "float32", 0), 8)["params"] > 0
      True
    """
    import jax
    import jax.numpy as jnp

    state, apply_fn = built.state, built.apply_fn
    per_device = batch_size // built.n_devices
    images = jax.ShapeDtypeStruct((per_device, *built.shape), jnp.float32)
    labels = jnp.zeros((per_device,), jnp.int32)
    variables = state.variables

    def cross_entropy(logits):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1))

    def train_loss(params):  # the update's pass: BatchNorm in training mode
        return cross_entropy(apply_fn({**variables, "params": params}, x_train, True)[0])

    def attack_loss(x):  # one PGD iteration: inference mode, gradient of the input
        return cross_entropy(apply_fn(variables, x, False)[0])

    x_train = jnp.zeros(images.shape, images.dtype)
    out = {
        "params": tree_bytes(state.params),
        "opt_state": tree_bytes(state.opt_state),
        "model_state": tree_bytes(state.model_state),
        "state": tree_bytes(state),
        "grads": sum(int(p.size) * 4 for p in jax.tree.leaves(state.params)),  # float32
        "batch": tree_bytes(built.batch) // built.n_devices,
        "train_residuals": residual_bytes(train_loss, state.params),
        "attack_residuals": residual_bytes(attack_loss, images),
    }
    out["estimate"] = (
        out["state"]
        + out["batch"]
        + out["grads"]
        + max(out["train_residuals"], out["attack_residuals"])
    )
    return out


def analyse(model: str, batch_size: int, dtype: str, seed: int = 0) -> dict:
    """Compiles the benchmark's step and returns XLA's and the analytic memory figures.

    Args:
      model: one of ``train_throughput.MODELS``.
      batch_size: the global batch, a multiple of the local device count.
      dtype: the model's compute dtype.
      seed: parameters and data.

    Returns:
      ``compiled_memory`` (``train_throughput.compiled_memory``), ``analytic``
      (``analytic_bytes``), ``convolutions_by_dtype``, ``compile_s`` and the
      device.

    Example:
      >>> analyse("small_cnn", 8, "float32")["compiled_memory"]["temp"] > 0
      True
    """
    import jax

    built = tt.build_jax_step(model, batch_size, dtype, seed)
    start = time.perf_counter()
    compiled = built.step.lower(built.state, built.batch).compile()
    compile_s = time.perf_counter() - start
    return {
        "model": model,
        "dtype": dtype,
        "batch_size": batch_size,
        "devices_used": built.n_devices,
        "per_device_batch": batch_size // built.n_devices,
        "device_name": jax.local_devices()[0].device_kind,
        "compile_s": compile_s,
        "compiled_memory": tt.compiled_memory(compiled),
        "analytic": analytic_bytes(built, batch_size),
        "convolutions_by_dtype": convolutions_by_dtype(compiled.as_text()),
    }


def _ratio(results: dict, getter) -> float | None:
    try:
        return getter(results["float32"]) / getter(results["bfloat16"])
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def ratios(results: list[dict]) -> dict:
    """float32 / bfloat16 ratios of the main figures, where both dtypes were analysed."""
    by_dtype = {r["dtype"]: r for r in results}
    return {
        "temp": _ratio(by_dtype, lambda r: r["compiled_memory"]["temp"]),
        "program_bytes": _ratio(by_dtype, lambda r: r["compiled_memory"]["program_bytes"]),
        "analytic_estimate": _ratio(by_dtype, lambda r: r["analytic"]["estimate"]),
        "train_residuals": _ratio(by_dtype, lambda r: r["analytic"]["train_residuals"]),
    }


def markdown(results: list[dict]) -> str:
    """The figures as a Markdown table (MiB per device)."""
    lines = [
        "| model | dtype | batch/device | arguments | outputs | aliased | temporaries "
        "| program | state | grads | train residuals | attack residuals | analytic estimate "
        "| convolutions |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        c, a = r["compiled_memory"] or {}, r["analytic"]

        def mib(d, k):
            return "-" if d.get(k) is None else f"{d[k] / MIB:.1f}"

        convs = ", ".join(f"{n} {t}" for t, n in r["convolutions_by_dtype"].items()) or "-"
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['per_device_batch']} | {mib(c, 'argument')} "
            f"| {mib(c, 'output')} | {mib(c, 'alias')} | {mib(c, 'temp')} "
            f"| {mib(c, 'program_bytes')} | {mib(a, 'state')} | {mib(a, 'grads')} "
            f"| {mib(a, 'train_residuals')} | {mib(a, 'attack_residuals')} "
            f"| {mib(a, 'estimate')} | {convs} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=tt.MODELS, default="preact_resnet18")
    p.add_argument("--batch-size", type=int, default=128, help="global batch (all devices)")
    p.add_argument("--dtype", default="float32,bfloat16", help="comma-separated compute dtypes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    try:
        args.dtypes = tt._split(args.dtype, tt.DTYPES, "--dtype")
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1; got {args.batch_size}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = []
    for dtype in args.dtypes:
        print(f"== {args.model} / {dtype} / batch {args.batch_size}", file=sys.stderr, flush=True)
        results.append(analyse(args.model, args.batch_size, dtype, args.seed))
    report = {
        "benchmark": "XLA memory analysis of the PGD-AT step against an analytic count",
        "settings": {"model": args.model, "batch_size": args.batch_size, "dtypes": args.dtypes},
        "host": tt._host_info(),
        "framework_info": tt._jax_info(),
        "results": results,
        "ratios_float32_over_bfloat16": ratios(results),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(markdown(results))
    if args.out:
        tt._write_json(args.out, report)
        print(f"wrote {args.out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
