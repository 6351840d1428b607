"""Wall time and compile time of a training run, with a cold and then a warm compilation cache.

Runs ``python -m jax_memat.main`` (the quickstart by default) in fresh
subprocesses, each with a fresh workdir: ``--repeats`` times in a row against
one empty persistent-cache folder, so the first run is *cold* (compiles
everything and fills the cache) and the ones after it are *warm* (load the
compiled programs), and optionally once with the cache off. Every child sums
JAX's own compile-time events (``jax.monitoring``): tracing to a jaxpr,
lowering to MLIR, and the backend step (XLA compilation, or reading the
persistent cache on a hit), and counts persistent-cache hits and the entries written.

Example::

    python benchmarks/compile_time.py --out benchmarks/results/compile_cache_cpu.json \\
        -- --config=configs/quickstart.py --config.epochs=1

Everything after ``--`` goes to ``jax_memat.main`` (``--workdir`` and
``--compilation_cache`` are added here).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
# The working tree's library (this process runs jax_memat.main) and the sibling
# benchmark's host description.
for _path in (str(_ROOT), str(_HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
from train_throughput import _host_info  # noqa: E402

from jax_memat.fileio import atomic_write  # noqa: E402

DEFAULT_MAIN_ARGS = ("--config=configs/quickstart.py", "--config.epochs=1")
# jax._src.dispatch's event names (stable since JAX 0.4.x; read as strings so that
# nothing private is imported).
_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "backend_compile_s",
}


def _child(out: str, main_args: list[str]) -> None:
    """Runs jax_memat.main in this process, recording compile events; writes JSON to ``out``."""
    import jax

    totals = {name: 0.0 for name in _EVENTS.values()}
    counts = {"cache_hits": 0, "cache_writes": 0, "compiles": 0}

    def on_duration(event: str, duration: float, **_kw) -> None:
        if event in _EVENTS:
            totals[_EVENTS[event]] += duration
            if _EVENTS[event] == "backend_compile_s":
                counts["compiles"] += 1

    def on_event(event: str, **_kw) -> None:
        if event.endswith("/compilation_cache/cache_hits"):
            counts["cache_hits"] += 1
        elif event.endswith("/compilation_cache/cache_misses"):
            # JAX records this event when it writes an entry, not on every failed lookup.
            counts["cache_writes"] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    sys.argv = ["jax_memat.main", *main_args]
    code = 0
    start = time.perf_counter()
    try:
        runpy.run_module("jax_memat.main", run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    result = {"exit_code": code, "in_process_s": time.perf_counter() - start, **totals, **counts}
    result["compile_total_s"] = sum(totals.values())
    with atomic_write(out) as f:
        json.dump(result, f)


def _run_child(label: str, cache: str, main_args: list[str], scratch: Path, timeout: float):
    workdir = scratch / f"workdir_{label}"
    out = scratch / f"{label}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(out), "--"]
    cmd += [*main_args, f"--workdir={workdir}", f"--compilation_cache={cache}"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=str(_ROOT), timeout=timeout, capture_output=True)
    wall = time.perf_counter() - start
    if not out.exists():
        tail = proc.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{label}: child exited {proc.returncode} without a result:\n{tail}")
    result = json.loads(out.read_text())
    # The folder is a temporary one: record what it was, not where.
    where = "off" if cache == "off" else "temporary folder, shared by the cold and warm runs"
    result.update(label=label, wall_s=wall, cache=where)
    print(
        f"{label:8s} wall {wall:6.1f} s | compile {result['compile_total_s']:6.1f} s "
        f"(trace {result['trace_s']:.1f}, lower {result['lower_s']:.1f}, backend "
        f"{result['backend_compile_s']:.1f}) | {result['compiles']} programs, "
        f"{result['cache_hits']} cache hits",
        file=sys.stderr,
        flush=True,
    )
    return result


def _versions() -> dict:
    import jax
    import jaxlib

    return {
        **_host_info(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "load_average_at_start": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    main_args = list(DEFAULT_MAIN_ARGS)
    if "--" in argv:
        cut = argv.index("--")
        argv, main_args = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=2, help="runs on one cache (1 cold, rest warm)")
    p.add_argument("--no-cache-run", action="store_true", help="also one run with the cache off")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        _child(args.child, main_args)
        return None
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    bad = [a for a in main_args if a.startswith(("--workdir", "--compilation_cache"))]
    if bad:
        p.error(f"{bad}: --workdir and --compilation_cache are set by this script")

    host = _versions()  # the load average before the runs
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        cache = scratch / "cache"
        if args.no_cache_run:
            runs.append(_run_child("no_cache", "off", main_args, scratch, args.timeout))
        for i in range(args.repeats):
            label = "cold" if i == 0 else f"warm{i}"
            runs.append(_run_child(label, str(cache), main_args, scratch, args.timeout))
    cold = next(r for r in runs if r["label"] == "cold")
    warm = [r for r in runs if r["label"].startswith("warm")]
    report = {
        "benchmark": "wall and compile time of python -m jax_memat.main, cold vs warm cache",
        "main_args": main_args,
        "host": host,
        "runs": runs,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if warm:
        report["warm_over_cold"] = {
            "wall": warm[0]["wall_s"] / cold["wall_s"],
            "compile_total": warm[0]["compile_total_s"] / cold["compile_total_s"],
        }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.out) as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
