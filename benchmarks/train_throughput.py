"""PGD-10 adversarial-training throughput and peak memory: jax_memat vs. plain PyTorch.

One training step is the paper's PGD-AT step on a batch of 32x32x3 images:
10 L-inf PGD steps (eps 8/255, step 2/255, uniform random start) with BatchNorm
in inference mode, then one cross-entropy update with BatchNorm in training
mode, SGD (lr 0.1, momentum 0.9, weight decay 5e-4). The JAX side is the
library's jitted, state-donating ``make_train_step`` on a data-parallel mesh over
all local devices; the PyTorch side is ``torch_baseline.pgd_at_step``, written in
the conventional eager style. Both see the same global batch of fixed random
data (NHWC for JAX, NCHW for PyTorch), 10 classes.

What is timed: ``--warmup`` steps run first (the first of them is timed on its
own: for JAX it is compilation plus one step), the device is synchronised, then
``--steps`` steps run back to back and the device is synchronised again
(``jax.block_until_ready`` on the train state; ``torch.cuda.synchronize``). No
host round-trip happens inside the timed loop on either side.

Peak memory: ``peak_bytes_in_use`` of the JAX device allocator (max over local
devices) or ``torch.cuda.max_memory_allocated`` on accelerators; the process's
peak resident set size (``getrusage``) on CPU, where the allocators keep no such
statistic. By default every (model, framework) pair runs in its own subprocess
(``--isolate``), so peaks do not mix and one framework's allocator cannot starve
the other; JAX children run with ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` so that
the JAX peak is what the step needs rather than 75% of the device.

FLOPs and MFU (``--flops``, JAX only; ``flops.py``): the step's analytic FLOPs
(convolutions and matrix products of 10 attack forward + input-gradient passes
and one training forward + backward), XLA's count of the compiled program, and
the model FLOP utilization against ``--peak-tflops`` or a known GPU's
datasheet peak: computed from the measured step time, not measured.

PyTorch variants (``--torch-variant``): ``eager`` (the conventional step),
``channels_last`` and ``compile`` (``torch.compile`` of the model), each in its
own subprocess and each with its own JAX / PyTorch ratio.

Example::

    python benchmarks/train_throughput.py --models preact_resnet18,resnet18 \\
        --batch-size 128 --steps 20 --warmup 3 --frameworks jax,torch --out results.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent

MODELS = ("preact_resnet18", "resnet18", "wide_resnet", "small_cnn")
DEFAULT_MODELS = ("preact_resnet18", "resnet18")
# get_model's extra arguments per registry name: "wide_resnet" here is WRN-34-10, the
# paper's CIFAR-10 model (Dong et al., 2022, Section 3), not get_model's default 28-10.
MODEL_KWARGS = {"wide_resnet": {"depth": 34, "width": 10}}
# Models the PyTorch baseline (torch_baseline.get_model) does not implement.
JAX_ONLY_MODELS = ("wide_resnet",)
FRAMEWORKS = ("jax", "torch")
DTYPES = ("float32", "bfloat16")
# PyTorch baselines (torch_baseline.prepare): the conventional eager step, then what a
# performance-aware user adds: channels_last memory format, and torch.compile.
TORCH_VARIANTS = ("eager", "channels_last", "compile")
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)  # H, W, C
# The quickstart's model runs on Fashion-MNIST-shaped data; the ResNets on CIFAR-shaped.
IMAGE_SHAPES = {"small_cnn": (28, 28, 1)}
EPS, STEP_SIZE, PGD_STEPS = 8 / 255, 2 / 255, 10
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
# Packages the GPU machine does not have; the JAX step must not need them.
_ABSENT_ON_GPU = ("tensorflow", "tensorflow_datasets", "ml_collections")


# --------------------------------------------------------------------------- shared


def image_shape(model_name: str) -> tuple[int, int, int]:
    """One example's (H, W, C) for a model: 28x28x1 for the small CNN, else 32x32x3."""
    return IMAGE_SHAPES.get(model_name, IMAGE_SHAPE)


def _random_batch(
    batch_size: int, seed: int, shape: tuple[int, int, int] = IMAGE_SHAPE
) -> tuple[np.ndarray, np.ndarray]:
    """The benchmark's data: uniform images in [0, 1] (NHWC) and uniform labels."""
    rng = np.random.default_rng(seed)
    images = rng.random((batch_size, *shape), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=batch_size).astype(np.int32)
    return images, labels


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _summary(
    steps: int, batch_size: int, elapsed_s: float, first_call_s: float, final_loss: float
) -> dict:
    ms_per_step = 1e3 * elapsed_s / steps
    return {
        "timed_steps": steps,
        "timed_s": elapsed_s,
        "ms_per_step": ms_per_step,
        "examples_per_s": batch_size * steps / elapsed_s,
        "first_call_s": first_call_s,
        "final_loss": final_loss,
        "final_loss_finite": math.isfinite(final_loss),
    }


# --------------------------------------------------------------------------- JAX


def _import_jax_memat() -> dict:
    """Imports the library API the benchmark uses (nothing that needs TensorFlow)."""
    # Benchmark the working tree's library, as the subprocesses do via PYTHONPATH.
    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))
    from jax_memat.attacks import AttackSpec
    from jax_memat.models import get_model, make_apply_fn
    from jax_memat.objectives import make_objective
    from jax_memat.training import (
        create_train_state,
        make_mesh,
        make_optimizer,
        make_train_step,
        shard_batch,
    )

    return {
        "AttackSpec": AttackSpec,
        "get_model": get_model,
        "make_apply_fn": make_apply_fn,
        "make_objective": make_objective,
        "create_train_state": create_train_state,
        "make_mesh": make_mesh,
        "make_optimizer": make_optimizer,
        "make_train_step": make_train_step,
        "shard_batch": shard_batch,
    }


def _jax_info() -> dict:
    import flax
    import jax
    import jaxlib
    import optax

    devices = jax.local_devices()
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "local_device_count": len(devices),
        "default_matmul_precision": str(jax.config.jax_default_matmul_precision),
        "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }


def _jax_peak_memory() -> tuple[int, str]:
    import jax

    devices = jax.local_devices()
    stats = [d.memory_stats() for d in devices]
    if all(s and "peak_bytes_in_use" in s for s in stats):
        source = "jax peak_bytes_in_use"
        if len(devices) > 1:
            source += f" (max over {len(devices)} devices)"
        return max(int(s["peak_bytes_in_use"]) for s in stats), source
    # No allocator statistics on CPU: fall back to the whole process.
    return _peak_rss_bytes(), "process peak RSS"


def _import_flops():
    if str(_HERE) not in sys.path:
        sys.path.insert(0, str(_HERE))
    import flops

    return flops


def jax_step_flops(step, state, batch, apply_fn, shape, batch_size: int, n_devices: int) -> dict:
    """Analytic and XLA FLOPs of one PGD-AT step (see flops.py for the two counts).

    Args:
      step, state, batch: the jitted train step and arguments it was timed with.
      apply_fn: the model's apply function; shape: one example's (H, W, C).
      batch_size: the global batch; n_devices: devices the step is split over.

    Returns:
      ``flops_analytic`` (the step, used for MFU), ``flops_analytic_loop_once``
      (the same with one attack iteration, what XLA's cost analysis counts, since
      it visits a loop's body once), ``flops_xla`` (the compiled program's count
      times the devices; None where the backend gives none) and their ratio.
    """
    flops = _import_flops()
    forward, first = flops.forward_flops(apply_fn, state.variables, shape)
    analytic = flops.pgd_at_step_flops(forward, first, PGD_STEPS, batch_size)
    loop_once = flops.pgd_at_step_flops(forward, first, 1, batch_size)
    per_device = flops.xla_flops(step.lower(state, batch).compile().cost_analysis())
    xla = None if per_device is None else per_device * n_devices
    return {
        "flops_forward_per_example": forward,
        "flops_first_layer_per_example": first,
        "flops_analytic": analytic,
        "flops_analytic_loop_once": loop_once,
        "flops_xla": xla,
        "flops_xla_over_analytic_loop_once": None if xla is None else xla / loop_once,
    }


def mfu_figures(result: dict, dtype: str, peak_tflops: float | None) -> dict:
    """Model FLOP utilization from a result's throughput and a peak (flag or known device).

    Computed from the measured step time and datasheet (or given) peaks, not
    measured by a profiler. For float32 on a known GPU both the FP32 and the
    TF32 tensor-core peaks are used, since XLA's default precision may use TF32.
    """
    flops = _import_flops()
    known = flops.known_peak_tflops(result.get("device_name", ""))
    steps_per_s = 1e3 / result["ms_per_step"]
    devices = result.get("devices_used", 1)
    out: dict = {"peak_tflops_source": None, "peak_tflops": None, "mfu": None}
    if peak_tflops is not None:
        out.update(peak_tflops=peak_tflops, peak_tflops_source="--peak-tflops")
    elif known is not None:
        out.update(peak_tflops=known[dtype], peak_tflops_source="NVIDIA datasheet (flops.py)")
        if dtype == "float32":
            out["peak_tflops_tf32"] = known["tf32"]
            out["mfu_tf32"] = flops.utilization(
                result.get("flops_analytic"), steps_per_s, known["tf32"], devices
            )
    out["mfu"] = flops.utilization(
        result.get("flops_analytic"), steps_per_s, out["peak_tflops"], devices
    )
    out["achieved_tflops"] = (
        None
        if result.get("flops_analytic") is None
        else result["flops_analytic"] * steps_per_s / 1e12
    )
    out["mfu_note"] = "computed from measured throughput and a peak, not measured"
    return out


class JaxStep(NamedTuple):
    """The library's jitted PGD-AT step with a state and a batch to call it on."""

    step: Any  # make_train_step's jitted function: step(state, batch) -> (state, metrics)
    state: Any  # the TrainState, replicated over the mesh
    batch: dict  # the placed global batch: image, label, index
    apply_fn: Any  # the model's apply(variables, images, train)
    shape: tuple[int, int, int]  # one example's (H, W, C)
    n_devices: int  # devices the batch is split over


def build_jax_step(model_name: str, batch_size: int, dtype: str, seed: int) -> JaxStep:
    """Builds the benchmark's PGD-AT step with the library, unmodified.

    ``get_model`` (with ``MODEL_KWARGS``) / ``make_apply_fn``, the PGD-10 attack,
    ``make_objective("pgd_at")``, SGD with momentum and weight decay,
    ``create_train_state`` and ``make_train_step`` on ``make_mesh()`` (all local
    devices), and one fixed batch of random data placed with ``shard_batch``.
    Nothing is compiled yet.

    Args:
      model_name: one of ``MODELS``.
      batch_size: the global batch, a multiple of the local device count.
      dtype: the model's compute dtype, ``"float32"`` or ``"bfloat16"``.
      seed: parameters and data.

    Returns:
      A ``JaxStep``; ``step(state, batch)`` runs one training step.

    Raises:
      ValueError: if the batch does not split over the devices.

    Example:
      >>> built = build_jax_step("small_cnn", 8, "float32", 0)
      >>> state, metrics = built.step(built.state, built.batch)
    """
    import jax

    api = _import_jax_memat()
    mesh = api["make_mesh"]()
    n_devices = mesh.devices.size
    if batch_size % n_devices:
        raise ValueError(f"batch size {batch_size} does not split over {n_devices} devices")

    tx = api["make_optimizer"]("sgd", LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    module = api["get_model"](
        model_name, num_classes=NUM_CLASSES, dtype=dtype, **MODEL_KWARGS.get(model_name, {})
    )
    apply_fn = api["make_apply_fn"](module)
    spec = api["AttackSpec"](
        name="pgd", eps=EPS, step_size=STEP_SIZE, steps=PGD_STEPS, norm="linf", random_start=True
    )
    loss_fn = api["make_objective"]("pgd_at", apply_fn, spec)
    shape = image_shape(model_name)
    state = api["create_train_state"](module, jax.random.key(seed), shape, tx, mesh)
    step = api["make_train_step"](loss_fn, tx, mesh)

    images, labels = _random_batch(batch_size, seed, shape)
    batch = api["shard_batch"](
        {"image": images, "label": labels, "index": np.arange(batch_size, dtype=np.int32)}, mesh
    )
    jax.block_until_ready((state, batch))
    return JaxStep(step, state, batch, apply_fn, shape, n_devices)


def compiled_memory(compiled) -> dict | None:
    """XLA's buffer accounting of a compiled program, per device, in bytes.

    From ``jitted.lower(...).compile().memory_analysis()``: the sizes XLA's
    buffer assignment gives the program's arguments, outputs (``alias``: the
    part of the outputs written into donated arguments), temporaries (every
    intermediate buffer live at some point, packed by liveness) and generated
    code. ``program_bytes`` = arguments + outputs - aliased + temporaries: the
    device memory the program itself needs while it runs. It does not include
    what the compiler used while compiling (e.g. XLA:GPU's convolution
    autotuning, which runs candidate algorithms on scratch buffers).

    Args:
      compiled: a ``jax.stages.Compiled``.

    Returns:
      A dict of the fields and ``program_bytes``, or None where the backend
      gives no memory analysis.

    Example:
      >>> compiled_memory(jax.jit(lambda x: 2 * x).lower(jnp.ones(4)).compile())["argument"]
      16
    """
    stats = compiled.memory_analysis()
    if isinstance(stats, list | tuple):  # older JAX: one entry per program
        stats = stats[0] if stats else None
    if stats is None:
        return None
    out = {
        name: int(getattr(stats, f"{name}_size_in_bytes"))
        for name in ("argument", "output", "alias", "temp", "generated_code")
        if hasattr(stats, f"{name}_size_in_bytes")
    }
    needed = ("argument", "output", "alias", "temp")
    if all(k in out for k in needed):
        out["program_bytes"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _device_memory_now() -> dict | None:
    """``bytes_in_use`` and ``peak_bytes_in_use`` now, max over local devices; None on CPU."""
    import jax

    stats = [d.memory_stats() for d in jax.local_devices()]
    if not all(s and "peak_bytes_in_use" in s for s in stats):
        return None
    return {
        "bytes_in_use": max(int(s.get("bytes_in_use", 0)) for s in stats),
        "peak_bytes_in_use": max(int(s["peak_bytes_in_use"]) for s in stats),
    }


def bench_jax(
    model_name: str,
    batch_size: int,
    steps: int,
    warmup: int,
    dtype: str,
    seed: int,
    count_flops: bool = True,
):
    """Times the library's PGD-AT step; returns a result dict (see module docstring).

    Besides the timing, the result holds ``compiled_memory`` (XLA's buffer
    accounting of the step, ``compiled_memory``) and, on accelerators,
    ``device_memory_at``: the allocator's ``bytes_in_use`` and
    ``peak_bytes_in_use`` after the state and batch are placed, after the step
    is compiled (before it first runs) and after the timed steps. The peak
    after compilation minus the bytes in use before it is what compiling
    itself took (e.g. convolution autotuning); see benchmarks/README.md.
    """
    import jax

    built = build_jax_step(model_name, batch_size, dtype, seed)
    step, state, batch = built.step, built.state, built.batch
    memory_at = {"placed": _device_memory_now()}

    start = time.perf_counter()
    # Compiled ahead of the first call so that the compiler's own device memory can
    # be told from the step's; the jitted function reuses this executable.
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    memory_at["compiled"] = _device_memory_now()
    state, metrics = step(state, batch)
    jax.block_until_ready(state)
    first_call_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        state, metrics = step(state, batch)
    jax.block_until_ready(state)

    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - start
    memory_at["timed"] = _device_memory_now()

    peak, source = _jax_peak_memory()
    loss = float(jax.device_get(metrics["loss"])) if "loss" in metrics else float("nan")
    result = _summary(steps, batch_size, elapsed, first_call_s, loss)
    result.update(
        compile_s=compile_s,
        peak_memory_bytes=peak,
        peak_memory_source=source,
        compiled_memory=compiled_memory(compiled),
        device_memory_at=memory_at if memory_at["placed"] is not None else None,
        devices_used=built.n_devices,
        device_name=jax.local_devices()[0].device_kind,
        framework_info=_jax_info(),
        dtype_note=(
            "compute dtype of the Flax model; params, BatchNorm stats and updates float32"
            if dtype == "bfloat16"
            else "float32 (XLA default precision)"
        ),
        absent_on_gpu_imported=sorted(m for m in _ABSENT_ON_GPU if m in sys.modules),
    )
    if count_flops:  # after the timing: re-lowers the step; XLA reuses its compiled program
        result.update(
            jax_step_flops(
                step, state, batch, built.apply_fn, built.shape, batch_size, built.n_devices
            )
        )
    return result


# --------------------------------------------------------------------------- PyTorch


def _torch_device(requested: str):
    import torch

    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "gpu":
        raise RuntimeError("--device gpu, but torch.cuda.is_available() is False")
    return torch.device("cpu")


def _torch_info(device) -> dict:
    import torch

    info = {
        "torch": torch.__version__,
        "device_type": device.type,
        "num_threads": torch.get_num_threads(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        # Reported as found: the benchmark leaves PyTorch's TF32 defaults alone.
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        info.update(
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            device_name=torch.cuda.get_device_name(device),
        )
    return info


def bench_torch(
    model_name: str,
    batch_size: int,
    steps: int,
    warmup: int,
    dtype: str,
    seed: int,
    device: str,
    variant: str = "eager",
):
    """Times ``torch_baseline.pgd_at_step``; returns a result dict (see module docstring)."""
    import torch

    sys.path.insert(0, str(_HERE))
    import torch_baseline

    dev = _torch_device(device)
    on_gpu = dev.type == "cuda"
    torch.backends.cudnn.benchmark = True  # what conventional training scripts do
    torch.manual_seed(seed)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if on_gpu else (lambda: None)

    model = torch_baseline.get_model(model_name, NUM_CLASSES).to(dev)
    images, labels = _random_batch(batch_size, seed, image_shape(model_name))
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(dev)
    model, x = torch_baseline.prepare(model, x, variant)
    opt = torch_baseline.make_sgd(model, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    y = torch.from_numpy(labels.astype(np.int64)).to(dev)
    autocast = torch.bfloat16 if dtype == "bfloat16" else None

    def step():
        return torch_baseline.pgd_at_step(
            model, opt, x, y, eps=EPS, alpha=STEP_SIZE, steps=PGD_STEPS, autocast_dtype=autocast
        )

    sync()
    start = time.perf_counter()
    loss = step()  # cudnn.benchmark autotunes here; torch.compile compiles here
    sync()
    first_call_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        loss = step()
    sync()

    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - start

    if on_gpu:
        peak = int(torch.cuda.max_memory_allocated(dev))
        source = "torch max_memory_allocated"
        reserved = int(torch.cuda.max_memory_reserved(dev))
    else:
        peak, source, reserved = _peak_rss_bytes(), "process peak RSS", None
    info = _torch_info(dev)
    result = _summary(steps, batch_size, elapsed, first_call_s, float(loss))
    result.update(
        peak_memory_bytes=peak,
        peak_memory_source=source,
        peak_memory_reserved_bytes=reserved,
        devices_used=1,
        device_name=info.get("device_name", platform.processor() or "cpu"),
        framework_info=info,
        variant_note={
            "eager": "conventional eager step, NCHW",
            "channels_last": "eager, model and batch in channels_last memory format",
            "compile": "channels_last, torch.compile(model) (default mode); attack loop and "
            "optimizer eager",
        }[variant],
        dtype_note=(
            "torch.autocast(bfloat16) forward passes; params and updates float32"
            if dtype == "bfloat16"
            else "float32 (PyTorch's default TF32 settings, see framework_info)"
        ),
    )
    return result


# --------------------------------------------------------------------------- driver


def _run_one(
    framework: str, model: str, dtype: str, args: argparse.Namespace, variant: str | None = None
) -> dict:
    """Runs one benchmark in this process; never raises (errors go in the result)."""
    if framework == "torch" and variant is None:
        variant = "eager"
    result = {"framework": framework, "model": model, "dtype": dtype, "variant": variant}
    result.update(batch_size=args.batch_size, warmup=args.warmup, isolated=args.child is not None)
    if framework == "torch" and importlib.util.find_spec("torch") is None:
        # The optional bench dependency: a machine without it still gets the JAX numbers.
        print("skipped: torch not installed", file=sys.stderr)
        return {**result, "error": "skipped: torch not installed", "skipped": True}
    try:
        if framework == "jax":
            out = bench_jax(
                model, args.batch_size, args.steps, args.warmup, dtype, args.seed, args.flops
            )
        else:
            out = bench_torch(
                model,
                args.batch_size,
                args.steps,
                args.warmup,
                dtype,
                args.seed,
                args.device,
                variant,
            )
        result.update(out)
        if framework == "jax" and args.flops:
            result.update(mfu_figures(result, dtype, args.peak_tflops))
    except Exception:  # a failed pair must not lose the others' numbers
        result["error"] = traceback.format_exc()
        print(result["error"], file=sys.stderr)
    return result


def _child_env(framework: str, device: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
    if framework == "jax":
        # Allocate on demand so peak_bytes_in_use is what the step needs.
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        if device == "cpu":
            env["JAX_PLATFORMS"] = "cpu"
        elif device == "gpu":
            env["JAX_PLATFORMS"] = "cuda"
    return env


def _run_isolated(
    framework: str, model: str, dtype: str, args: argparse.Namespace, variant: str | None = None
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            f"--child={framework}",
            f"--models={model}",
            f"--dtype={dtype}",
            f"--batch-size={args.batch_size}",
            f"--steps={args.steps}",
            f"--warmup={args.warmup}",
            f"--seed={args.seed}",
            f"--device={args.device}",
            f"--out={out}",
            "--flops" if args.flops else "--no-flops",
        ]
        if variant is not None:
            cmd.append(f"--torch-variant={variant}")
        if args.peak_tflops is not None:
            cmd.append(f"--peak-tflops={args.peak_tflops}")
        failed = {
            "framework": framework,
            "model": model,
            "dtype": dtype,
            "variant": variant,
            "isolated": True,
        }
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, env=_child_env(framework, args.device), timeout=args.child_timeout
            )
        except subprocess.TimeoutExpired:
            return {**failed, "error": f"child timed out after {args.child_timeout} s"}
        wall = time.perf_counter() - start
        if not out.exists():
            return {**failed, "error": f"child exited with {proc.returncode}, no result"}
        result = json.loads(out.read_text())
        result["child_wall_s"] = wall
        return result


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _framework_label(result: dict) -> str:
    variant = result.get("variant")
    return result["framework"] + (f" ({variant})" if variant else "")


def _mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def _per_example(result: dict, key: str) -> float | None:
    value = result.get(key)
    return None if value is None else value / result["batch_size"] / 1e9


def _mfu_text(result: dict) -> str:
    if result.get("mfu") is None:
        return "-"
    text = f"{100 * result['mfu']:.1f}%"
    if result.get("mfu_tf32") is not None:
        text += f" (TF32 peak: {100 * result['mfu_tf32']:.1f}%)"
    return text


def _memory_kind(result: dict) -> str:
    return "host RSS" if "RSS" in result["peak_memory_source"] else "device allocator"


def _ratios(results: list[dict]) -> list[dict]:
    """JAX / PyTorch throughput and memory, per (model, dtype, PyTorch variant) where both ran."""
    ok = [r for r in results if "error" not in r]
    rows = []
    for jax_r in ok:
        if jax_r["framework"] != "jax":
            continue
        for torch_r in ok:
            if torch_r["framework"] != "torch" or (torch_r["model"], torch_r["dtype"]) != (
                jax_r["model"],
                jax_r["dtype"],
            ):
                continue
            rows.append(_ratio_row(jax_r, torch_r))
    return rows


def _ratio_row(jax_r: dict, torch_r: dict) -> dict:
    return {
        "model": jax_r["model"],
        "dtype": jax_r["dtype"],
        "torch_variant": torch_r.get("variant") or "eager",
        "throughput_ratio_jax_over_torch": jax_r["examples_per_s"] / torch_r["examples_per_s"],
        "peak_memory_ratio_jax_over_torch": jax_r["peak_memory_bytes"]
        / torch_r["peak_memory_bytes"],
        "memory_sources_comparable": _memory_kind(jax_r) == _memory_kind(torch_r),
    }


def markdown(results: list[dict], ratios: list[dict]) -> str:
    """The results and ratios as Markdown tables."""
    lines = [
        "| model | framework | dtype | device | examples/s | ms/step | peak memory (MiB) "
        "| memory source | peak after compile (MiB) | XLA program (MiB) | first call (s) "
        "| GFLOP/example (analytic) | XLA / analytic, loop once | TFLOP/s | MFU |",
        "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            err = r["error"].strip().splitlines()[-1][:80]
            err = err if r.get("skipped") else f"failed: {err}"
            lines.append(
                f"| {r['model']} | {_framework_label(r)} | {r['dtype']} | {err} "
                "| - | - | - | - | - | - | - | - | - | - | - |"
            )
            continue
        mem = r["peak_memory_bytes"] / 2**20
        at_compile = ((r.get("device_memory_at") or {}).get("compiled") or {}).get(
            "peak_bytes_in_use"
        )
        program = (r.get("compiled_memory") or {}).get("program_bytes")
        lines.append(
            f"| {r['model']} | {_framework_label(r)} | {r['dtype']} | {r['device_name']} "
            f"| {r['examples_per_s']:.1f} | {r['ms_per_step']:.1f} | {mem:.0f} "
            f"| {r['peak_memory_source']} | {_fmt(_mib(at_compile), '.0f')} "
            f"| {_fmt(_mib(program), '.0f')} | {_fmt(r.get('first_call_s'), '.1f')} "
            f"| {_fmt(_per_example(r, 'flops_analytic'), '.2f')} "
            f"| {_fmt(r.get('flops_xla_over_analytic_loop_once'), '.2f')} "
            f"| {_fmt(r.get('achieved_tflops'), '.3g')} | {_mfu_text(r)} |"
        )
    if ratios:
        lines += [
            "",
            "| model | dtype | PyTorch variant | throughput JAX / PyTorch "
            "| peak memory JAX / PyTorch |",
            "|---|---|---|---:|---:|",
        ]
        for q in ratios:
            mem = f"{q['peak_memory_ratio_jax_over_torch']:.2f}"
            if not q["memory_sources_comparable"]:
                mem += " (different sources)"
            lines.append(
                f"| {q['model']} | {q['dtype']} | {q['torch_variant']} "
                f"| {q['throughput_ratio_jax_over_torch']:.2f} | {mem} |"
            )
    return "\n".join(lines)


def _host_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
    }


def _split(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{flag}: {bad or value!r}; accepted: {allowed}")
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help=f"comma-separated, of {', '.join(MODELS)} (default %(default)s); "
        "wide_resnet is WRN-34-10, JAX only",
    )
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma-separated")
    p.add_argument("--batch-size", type=int, default=128, help="global batch (all devices)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1)")
    p.add_argument(
        "--dtype",
        default="float32",
        help="comma-separated compute dtypes (float32, bfloat16); bfloat16 means the "
        "Flax model's compute dtype for JAX and torch.autocast for PyTorch",
    )
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one subprocess per (model, framework) so memory figures do not mix",
    )
    p.add_argument(
        "--flops",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="count the JAX step's FLOPs (analytic and XLA's) and report MFU; after the "
        "timing it re-lowers the step, whose compiled program is reused",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="one device's peak TFLOP/s for the run's dtype, for MFU; default: the "
        "datasheet figure of a known GPU (H100 SXM, H200), none elsewhere",
    )
    p.add_argument("--child-timeout", type=float, default=600.0, help="seconds per subprocess")
    p.add_argument(
        "--torch-variant",
        default="eager",
        help=f"comma-separated PyTorch baselines, of {', '.join(TORCH_VARIANTS)}: the "
        "conventional eager step, + channels_last memory format, + torch.compile "
        "(default %(default)s)",
    )
    p.add_argument("--child", choices=FRAMEWORKS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.models = _split(args.models, MODELS, "--models")
        args.frameworks = _split(args.frameworks, FRAMEWORKS, "--frameworks")
        args.dtypes = _split(args.dtype, DTYPES, "--dtype")
        args.torch_variants = _split(args.torch_variant, TORCH_VARIANTS, "--torch-variant")
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    no_baseline = [m for m in args.models if m in JAX_ONLY_MODELS]
    if "torch" in args.frameworks and no_baseline:
        p.error(
            f"--models: {', '.join(no_baseline)} has no PyTorch baseline; "
            "run it with --frameworks jax"
        )
    if args.steps < 1 or args.warmup < 1 or args.batch_size < 1:
        p.error("--steps, --warmup and --batch-size must be >= 1")
    if args.peak_tflops is not None and not (
        math.isfinite(args.peak_tflops) and args.peak_tflops > 0
    ):
        p.error(f"--peak-tflops must be a positive number of TFLOP/s; got {args.peak_tflops}")
    return args


def _report(args: argparse.Namespace, results: list[dict]) -> dict:
    return {
        "benchmark": "PGD-10 adversarial training step (PGD-AT), CIFAR-shaped random data",
        "settings": {
            "batch_size": args.batch_size,
            "image_shape_hwc": {m: list(image_shape(m)) for m in args.models},
            "num_classes": NUM_CLASSES,
            "attack": {"eps": EPS, "step_size": STEP_SIZE, "steps": PGD_STEPS, "norm": "linf"},
            "optimizer": {"lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY},
            "timed_steps": args.steps,
            "warmup_steps": args.warmup,
            "dtypes": args.dtypes,
            "torch_variants": args.torch_variants if "torch" in args.frameworks else [],
            "device": args.device,
            "isolate": args.isolate,
            "seed": args.seed,
        },
        "host": _host_info(),
        "results": results,
        "ratios": _ratios(results),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _write_json(path: str, obj) -> None:
    """Writes ``obj`` as JSON atomically: a temporary file beside ``path``, then a rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))
    from jax_memat.fileio import atomic_write  # standard library only: safe on any machine

    with atomic_write(path) as f:
        json.dump(obj, f, indent=2)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child is not None:  # a subprocess of the driver below: one pair, JSON out
        variant = args.torch_variants[0] if args.child == "torch" else None
        result = _run_one(args.child, args.models[0], args.dtypes[0], args, variant)
        _write_json(args.out, result)
        return result

    if not args.isolate and "jax" in args.frameworks:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    results = []
    for dtype in args.dtypes:
        for model in args.models:
            for framework in args.frameworks:
                variants = args.torch_variants if framework == "torch" else [None]
                for variant in variants:
                    label = framework + (f" ({variant})" if variant else "")
                    print(f"== {model} / {label} / {dtype}", file=sys.stderr, flush=True)
                    run = _run_isolated if args.isolate else _run_one
                    results.append(run(framework, model, dtype, args, variant))
                    # Written after every pair, so a run cut short keeps what it measured.
                    report = _report(args, results)
                    if args.out:
                        _write_json(args.out, report)
    print(markdown(results, report["ratios"]))
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
