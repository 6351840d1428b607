"""Where the time of the PGD-AT train step goes: XLA's own per-operation profile.

  python benchmarks/profile_step.py --model preact_resnet18 --batch-size 32
  python benchmarks/profile_step.py --model small_cnn --batch-size 128 --out profile.json

Builds the step exactly as ``train_throughput.py`` does (the library's jitted
``make_train_step``, PGD-10, SGD), runs it once to compile, then once more under
``jax.profiler.trace`` with XLA:CPU's per-operation trace events on
(``--xla_cpu_enable_xprof_traceme``, set here before JAX starts). Each
operation of the compiled program is attributed to

* where it runs: ``attack`` (inside the attack's loop: it ran once per PGD
  iteration) or ``update`` (the rest of the step: the training forward and
  backward pass, the optimizer);
* what it is: ``convolution`` (a fusion or thunk that contains a
  convolution, YNNPACK's or XLA's own), ``dot``, ``sort``, ``copy/transpose``,
  ``reduce-window``, or ``elementwise`` (every other fusion);
* which direction: ``forward`` or ``backward`` (an operation JAX created by
  differentiating, ``transpose(jvp(...))`` in its name, or a convolution
  without a name: XLA:CPU rewrites weight-gradient convolutions into its
  canonical form and drops their names).

The sum of the operations is less than the wall time of the step: the rest is
the runtime (thread-pool hand-offs between operations, the loop's bookkeeping).
Both are printed. CPU only: on a GPU use the JAX/XProf profiler directly.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
for _path in (str(_ROOT), str(_HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

_TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"
_WRAPPERS = ("ThunkExecutor", "SlinkyThreadPool", "$", "PjitFunction")


def _instruction_table(hlo_text: str) -> dict[str, dict]:
    """Per instruction of the compiled module: its kind, op_name and the computation it calls."""
    computations: dict[str, list[str]] = {}
    differentiated: set[str] = set()  # computations with an instruction autodiff made
    named: set[str] = set()  # computations with any instruction that kept its op_name
    current = None
    table: dict[str, dict] = {}
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            current = header.group(1)
            computations[current] = []
            continue
        m = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\(", line)
        if not m or current is None:
            continue
        name, opcode = m.groups()
        computations[current].append(opcode)
        op_name = re.search(r'op_name="([^"]*)"', line)
        if op_name and "transpose(jvp" in op_name.group(1):
            differentiated.add(current)
        if op_name:
            named.add(current)
        calls = re.search(r"calls=%([\w.\-]+)", line)
        table[name] = {
            "opcode": opcode,
            "op_name": op_name.group(1) if op_name else "",
            "calls": calls.group(1) if calls else None,
        }
    for info in table.values():
        info["called_opcodes"] = computations.get(info["calls"], []) if info["calls"] else []
        # A fusion's own metadata is often its root's or none: look inside too.
        info["backward"] = "transpose(jvp" in info["op_name"] or info["calls"] in differentiated
        # XLA:CPU rewrites a weight-gradient convolution into a canonical one
        # and the rewritten instruction carries no name; JAX's own forward
        # convolutions keep theirs.
        info["unnamed"] = not info["op_name"] and info["calls"] not in named
    return table


def _kind(name: str, info: dict | None) -> str:
    opcodes = [] if info is None else [info["opcode"], *info["called_opcodes"]]
    if "convolution" in opcodes or name.startswith("conv"):
        return "convolution"
    if "dot" in opcodes:
        return "dot"
    if "sort" in opcodes:
        return "sort"
    if "reduce-window" in opcodes or "select-and-scatter" in opcodes:
        return "reduce-window"
    if info is not None and set(opcodes) <= {"copy", "transpose", "bitcast", "fusion", "reverse"}:
        if {"copy", "transpose", "reverse"} & set(opcodes):
            return "copy/transpose"
    return "elementwise"


def profile(model: str, batch_size: int, attack_steps: int) -> dict:
    """Compiles and profiles one step; returns the per-category breakdown (see module doc)."""
    import jax
    import numpy as np
    import train_throughput as tt

    api = tt._import_jax_memat()
    mesh = api["make_mesh"]()
    tx = api["make_optimizer"]("sgd", tt.LR, momentum=tt.MOMENTUM, weight_decay=tt.WEIGHT_DECAY)
    module = api["get_model"](model, num_classes=tt.NUM_CLASSES)
    apply_fn = api["make_apply_fn"](module)
    spec = api["AttackSpec"](
        name="pgd",
        eps=tt.EPS,
        step_size=tt.STEP_SIZE,
        steps=attack_steps,
        norm="linf",
        random_start=True,
    )
    objective = api["make_objective"]("pgd_at", apply_fn, spec)
    shape = tt.image_shape(model)
    state = api["create_train_state"](module, jax.random.key(0), shape, tx, mesh)
    step = api["make_train_step"](objective, tx, mesh)
    images, labels = tt._random_batch(batch_size, 0, shape)
    batch = api["shard_batch"](
        {"image": images, "label": labels, "index": np.arange(batch_size, dtype=np.int32)}, mesh
    )
    start = time.perf_counter()
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    first_call_s = time.perf_counter() - start
    table = _instruction_table(step.lower(state, batch).compile().as_text())

    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            start = time.perf_counter()
            state, _ = step(state, batch)
            jax.block_until_ready(state)
            step_s = time.perf_counter() - start
        files = glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True)
        if not files:
            raise RuntimeError("the profiler wrote no trace; is this JAX built with its profiler?")
        with gzip.open(files[0]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace

    time_us: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and not event.get("name", "").startswith(_WRAPPERS):
            time_us[event["name"]] += event.get("dur", 0)
            calls[event["name"]] += 1
    breakdown: collections.Counter = collections.Counter()
    top = []
    for name, us in time_us.items():
        info = table.get(name)
        if info is None and not name.startswith(("ynn", "xnn", "conv", "wrapped", "fusion")):
            continue  # Python-side events of the profiler itself
        where = "attack" if calls[name] >= attack_steps and attack_steps > 1 else "update"
        kind = _kind(name, info)
        backward = info is not None and (
            info["backward"] or (kind == "convolution" and info["unnamed"])
        )
        direction = "backward" if backward else "forward"
        breakdown[(where, kind, direction)] += us
        top.append((us, name, where, kind, direction, calls[name]))
    top.sort(reverse=True)
    ops_s = sum(breakdown.values()) / 1e6
    return {
        "model": model,
        "batch_size": batch_size,
        "attack_steps": attack_steps,
        "first_call_s": first_call_s,
        "step_s": step_s,
        "operations_s": ops_s,
        "runtime_overhead_s": step_s - ops_s,
        "breakdown": [
            {"where": w, "kind": k, "direction": d, "seconds": us / 1e6}
            for (w, k, d), us in breakdown.most_common()
        ],
        "top_operations": [
            {"name": n, "where": w, "kind": k, "direction": d, "calls": c, "seconds": us / 1e6}
            for us, n, w, k, d, c in top[:15]
        ],
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "host": tt._host_info(),
        "load_average_at_end": list(os.getloadavg()),
    }


def _markdown(report: dict) -> str:
    lines = [
        f"{report['model']}, batch {report['batch_size']}, PGD-{report['attack_steps']}: "
        f"step {report['step_s']:.2f} s, operations {report['operations_s']:.2f} s, "
        f"runtime {report['runtime_overhead_s']:.2f} s (first call {report['first_call_s']:.1f} s)",
        "",
        "| where | kind | direction | seconds | share of the step |",
        "|---|---|---|---:|---:|",
    ]
    for row in report["breakdown"]:
        share = row["seconds"] / report["step_s"]
        lines.append(
            f"| {row['where']} | {row['kind']} | {row['direction']} | "
            f"{row['seconds']:.3f} | {share:.1%} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="preact_resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--out", default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.attack_steps < 2:
        parser.error("--batch-size must be >= 1 and --attack-steps >= 2 (to tell the loop apart)")
    from jax_memat.models import MODEL_NAMES

    if args.model not in MODEL_NAMES:
        parser.error(f"--model {args.model!r}: accepted: {', '.join(MODEL_NAMES)}")
    flags = os.environ.get("XLA_FLAGS", "")
    if _TRACE_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_TRACE_FLAG}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    report = profile(args.model, args.batch_size, args.attack_steps)
    print(_markdown(report))
    if args.out:
        from jax_memat.fileio import atomic_write

        with atomic_write(args.out) as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
