"""Scaling with the work: PGD-AT epoch time against batch and model, AutoAttack against points.

Two measurements, written as one JSON report and one PNG figure:

* **Training.** For every (model, batch size) of a grid, the library's jitted
  PGD-AT step, built and timed by ``train_throughput.bench_jax`` (PGD-10, L-inf
  8/255, SGD; random CIFAR-shaped data; ``--warmup`` untimed steps, then
  ``--steps`` timed ones): ms per step, converted to seconds per CIFAR-10 epoch
  of 50,000 examples, ``50000 // B`` steps of batch ``B`` (the training loop
  drops the last partial batch, ``jax_memat.data.pipeline.steps_per_epoch``).
* **AutoAttack.** ``autoattack_time.run`` on ``--aa-points`` random points
  (worst case by default: every point survives every attack, the upper bound
  of its cost): seconds of the second call, without compilation.

Every point runs in its own subprocess by default (``--isolate``), so one
point's memory cannot starve the next and a point that runs out of device
memory (status ``oom``), past ``--child-timeout`` (``timeout``) or fails
otherwise (``error``) is recorded as such while the grid goes on. The JSON is
rewritten after every point, so a run cut short keeps what it measured;
``--replot`` redraws the figure from such a JSON.

Example::

    python benchmarks/scaling.py --models preact_resnet18,wide_resnet \\
        --batch-sizes 64,128,256,512 --steps 10 --warmup 2 \\
        --aa-points 100,200,500,1000 --out-dir benchmarks/results --name scaling_gpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import autoattack_time  # noqa: E402  (the benchmarks beside this file)
import train_throughput as tt  # noqa: E402

CIFAR10_TRAIN_EXAMPLES = 50_000
STATUSES = ("ok", "oom", "timeout", "error")
# What XLA and the allocators say when a buffer does not fit on the device.
_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM when allocating")


def steps_per_epoch(batch_size: int, examples: int = CIFAR10_TRAIN_EXAMPLES) -> int:
    """Steps of one epoch as the training loop runs it: ``examples // batch_size``.

    The library's input pipeline drops the last partial batch
    (``jax_memat.data.pipeline.steps_per_epoch``); so does this count.

    Example:
      >>> steps_per_epoch(128)
      390
    """
    from jax_memat.data.pipeline import steps_per_epoch as pipeline_steps

    return pipeline_steps(examples, batch_size)


def failure_status(error_text: str) -> str:
    """``"oom"`` when a failure's text says the device ran out of memory, else ``"error"``.

    Example:
      >>> failure_status("XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating")
      'oom'
    """
    return "oom" if any(m in error_text for m in _OOM_MARKERS) else "error"


# --------------------------------------------------------------------------- one point


def train_point(model: str, batch_size: int, args: argparse.Namespace) -> dict:
    """Times one (model, batch size) of the grid; a failure is recorded, not raised."""
    point = {"kind": "train", "model": model, "batch_size": batch_size}
    try:
        result = tt.bench_jax(
            model, batch_size, args.steps, args.warmup, args.dtype, args.seed, count_flops=False
        )
    except Exception:  # an out-of-memory or other failure must not stop the grid
        error = traceback.format_exc()
        print(error, file=sys.stderr)
        return {**point, "status": failure_status(error), "error": error}
    steps = steps_per_epoch(batch_size)
    return {
        **point,
        **result,
        "status": "ok",
        "steps_per_epoch": steps,
        "seconds_per_epoch": result["ms_per_step"] / 1e3 * steps,
    }


def autoattack_point(num_points: int, args: argparse.Namespace) -> dict:
    """Times AutoAttack on ``num_points`` points; a failure is recorded, not raised."""
    point = {"kind": "autoattack", "num_points": num_points}
    try:
        report = autoattack_time.run(
            num_points,
            args.aa_mode,
            args.aa_chunk_size,
            args.dtype,
            args.seed,
            model=args.aa_model,
            budget=args.aa_budget,
        )
    except Exception:
        error = traceback.format_exc()
        print(error, file=sys.stderr)
        return {**point, "status": failure_status(error), "error": error}
    first, steady = report["runs"][0], report["runs"][1]
    return {
        **point,
        **report,
        "status": "ok",
        "seconds": steady["total_s"],
        "seconds_first_call": first["total_s"],
    }


def _run_spec(spec: dict, args: argparse.Namespace) -> dict:
    if spec["kind"] == "train":
        return train_point(spec["model"], spec["batch_size"], args)
    return autoattack_point(spec["num_points"], args)


def _run_isolated(spec: dict, args: argparse.Namespace, argv: list[str]) -> dict:
    """Runs one point in a fresh subprocess of this script; a timeout is recorded."""
    failed = {**spec, "isolated": True}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "point.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
        cmd += [f"--child={json.dumps(spec)}", f"--child-out={out}"]
        try:
            proc = subprocess.run(
                cmd, env=tt._child_env("jax", args.device), timeout=args.child_timeout
            )
        except subprocess.TimeoutExpired:
            return {
                **failed,
                "status": "timeout",
                "error": f"child timed out after {args.child_timeout} s",
            }
        if not out.exists():
            # Killed from outside (e.g. SIGKILL from the host's out-of-memory killer: -9).
            return {
                **failed,
                "status": "error",
                "error": f"child exited with {proc.returncode}, no result",
            }
        return {**json.loads(out.read_text()), "isolated": True}


# --------------------------------------------------------------------------- figure


def _title(report: dict) -> str:
    ok = [p for p in report["training"] + report["autoattack"] if p.get("status") == "ok"]
    s = report["settings"]
    if not ok:
        return f"PGD-AT and AutoAttack scaling ({s['dtype']}): no successful measurement"
    first = ok[0]
    device = first.get("device_name") or first.get("device", "?")
    if device == "cpu":  # JAX's device kind says nothing more on a CPU
        device = f"cpu ({report['host'].get('cpu', '?')})"
    n = first.get("devices_used") or first.get("num_devices", "?")
    info = first.get("framework_info") or {}
    jax_version = info.get("jax") or first.get("jax", "?")
    versions = f"jax {jax_version}"
    if info.get("flax"):
        versions += f", flax {info['flax']}"
    return (
        f"PGD-10 AT step and AutoAttack scaling, {s['dtype']}: {device} x {n}, {versions}, "
        f"{report['date_utc'][:10]}"
    )


def _mark_failures(ax, points: list[dict], x_key: str, color) -> None:
    """Writes the status of every failed point at its x, near the top of the panel."""
    for p in points:
        if p.get("status") != "ok":
            ax.annotate(
                p.get("status", "?"),
                (p[x_key], 0.96),
                xycoords=("data", "axes fraction"),
                ha="center",
                va="top",
                fontsize=7,
                color=color,
                rotation=90,
            )


def plot(report: dict, path: str) -> None:
    """Draws the report as a three-panel PNG at ``path`` (written atomically).

    Panels: seconds per CIFAR-10 epoch against batch size (log-log), training
    examples/s against batch size, AutoAttack seconds against points
    (log-log, with a line proportional to the points through the largest
    one). Failed points are marked with their status.

    Args:
      report: a report of ``main`` (or its JSON, loaded).
      path: the PNG to write.

    Example:
      >>> plot(json.load(open("benchmarks/results/scaling_cpu.json")), "scaling_cpu.png")
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    from jax_memat.fileio import atomic_write

    def label_x(ax, values):  # the measured x values as plain numbers, not powers
        if values:
            ax.xaxis.set_major_locator(FixedLocator(sorted(set(values))))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(ScalarFormatter())

    def finish(ax, xs, x_log_base, y_log):
        """Log axes and a legend where something was measured; else says so."""
        if ax.has_data():
            ax.set_xscale("log", base=x_log_base)
            if y_log:
                ax.set_yscale("log")
            ax.legend(fontsize=8)
        else:  # log scales need positive data; keep the failure marks in view instead
            ax.text(0.5, 0.5, "no successful measurement", ha="center", transform=ax.transAxes)
            if xs:
                ax.set_xlim(min(xs) / 2, max(xs) * 2)
        label_x(ax, xs)
        ax.grid(True, which="both", alpha=0.3)

    fig, (ax_epoch, ax_rate, ax_aa) = plt.subplots(1, 3, figsize=(16, 4.8))
    models = list(dict.fromkeys(p["model"] for p in report["training"]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, model in enumerate(models):
        color = colors[i % len(colors)]
        points = [p for p in report["training"] if p["model"] == model]
        ok = sorted((p for p in points if p["status"] == "ok"), key=lambda p: p["batch_size"])
        label = "WRN-34-10" if model == "wide_resnet" else model
        xs = [p["batch_size"] for p in ok]
        if ok:  # an empty line would still count as data for the log scales
            ax_epoch.plot(xs, [p["seconds_per_epoch"] for p in ok], "o-", color=color, label=label)
            ax_rate.plot(xs, [p["examples_per_s"] for p in ok], "o-", color=color, label=label)
        for ax in (ax_epoch, ax_rate):
            _mark_failures(ax, points, "batch_size", color)
    batch_sizes = [p["batch_size"] for p in report["training"]]
    for ax, ylabel, ylog in (
        (ax_epoch, "seconds per CIFAR-10 epoch (50,000 examples)", True),
        (ax_rate, "training examples / s", False),
    ):
        finish(ax, batch_sizes, 2, ylog)
        ax.set_xlabel("global batch size")
        ax.set_ylabel(ylabel)
    ax_epoch.set_title("PGD-AT epoch time", fontsize=10)
    ax_rate.set_title("PGD-AT throughput", fontsize=10)

    aa = sorted(report["autoattack"], key=lambda p: p["num_points"])
    ok = [p for p in aa if p["status"] == "ok"]
    if ok:
        xs = [p["num_points"] for p in ok]
        ax_aa.plot(xs, [p["seconds"] for p in ok], "o-", label="steady state")
        ax_aa.plot(xs, [p["seconds_first_call"] for p in ok], "s:", alpha=0.6, label="first call")
        last = ok[-1]
        ax_aa.plot(
            xs,
            [last["seconds"] * x / last["num_points"] for x in xs],
            "--",
            color="grey",
            label="proportional to points",
        )
    _mark_failures(ax_aa, aa, "num_points", "black")
    s = report["settings"]
    finish(ax_aa, [p["num_points"] for p in aa], 10, True)
    ax_aa.set_xlabel("points attacked")
    ax_aa.set_ylabel("seconds")
    ax_aa.set_title(
        f"AutoAttack ({s['aa_budget_label']}, {s['aa_mode']}), {s['aa_model']}", fontsize=10
    )
    fig.suptitle(_title(report), fontsize=10)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- driver


def _ints(value: str, flag: str, allow_empty: bool = False) -> list[int]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    try:
        out = [int(v) for v in items]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{flag}: {value!r}; accepted: comma-separated positive integers"
        ) from None
    if (not out and not allow_empty) or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(
            f"{flag}: {value!r}; accepted: comma-separated positive integers"
            + (" (empty: skip)" if allow_empty else "")
        )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        default="preact_resnet18,wide_resnet",
        help=f"comma-separated, of {', '.join(tt.MODELS)}; wide_resnet is WRN-34-10; "
        "empty: no training grid",
    )
    p.add_argument("--batch-sizes", default="64,128,256,512", help="comma-separated global batches")
    p.add_argument("--steps", type=int, default=10, help="timed steps per grid point")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    p.add_argument("--dtype", choices=tt.DTYPES, default="float32")
    p.add_argument(
        "--aa-points", default="100,200,500,1000", help="comma-separated; empty: no AutoAttack"
    )
    p.add_argument("--aa-model", choices=tt.MODELS, default="preact_resnet18")
    p.add_argument("--aa-mode", choices=("worst_case", "random_init"), default="worst_case")
    p.add_argument(
        "--aa-chunk-size", type=int, default=None, help="points per compiled call (library default)"
    )
    p.add_argument("--aa-version", choices=("standard", "custom"), default="standard")
    p.add_argument("--aa-attacks", default=None, help="custom version: comma-separated")
    p.add_argument("--aa-n-iter", type=int, default=None, help="custom version")
    p.add_argument("--aa-n-queries", type=int, default=None, help="custom version")
    p.add_argument("--aa-n-targets", type=int, default=None, help="custom version")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(_HERE / "results"), help="where JSON and PNG go")
    p.add_argument("--name", default="scaling", help="file names: NAME.json and NAME.png")
    p.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one subprocess per point (memory does not carry over; timeouts are enforced)",
    )
    p.add_argument("--child-timeout", type=float, default=600.0, help="seconds per point")
    p.add_argument(
        "--replot", default=None, metavar="JSON", help="only redraw the PNG of this report"
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        bad = [m for m in models if m not in tt.MODELS]
        if bad:
            raise argparse.ArgumentTypeError(f"--models: {bad}; accepted: {tt.MODELS}")
        args.models = models
        args.batch_sizes = _ints(args.batch_sizes, "--batch-sizes", allow_empty=not models)
        args.aa_points = _ints(args.aa_points, "--aa-points", allow_empty=True)
        args.aa_budget = autoattack_time.custom_budget(
            args.aa_version, args.aa_attacks, args.aa_n_iter, args.aa_n_queries, args.aa_n_targets
        )
    except (argparse.ArgumentTypeError, ValueError) as e:
        p.error(str(e))
    if args.replot is None and not (args.models or args.aa_points):
        p.error("nothing to measure: give --models (with --batch-sizes) or --aa-points")
    if args.steps < 1 or args.warmup < 1:
        p.error(f"--steps and --warmup must be >= 1; got {args.steps} and {args.warmup}")
    if args.aa_chunk_size is not None and args.aa_chunk_size < 1:
        p.error(f"--aa-chunk-size must be >= 1; got {args.aa_chunk_size}")
    if not (math.isfinite(args.child_timeout) and args.child_timeout > 0):
        p.error(f"--child-timeout must be a positive number of seconds; got {args.child_timeout}")
    if not args.name or os.sep in args.name:
        p.error(f"--name must be a file name without {os.sep!r}; got {args.name!r}")
    return args


def _report(args: argparse.Namespace, training: list[dict], autoattack: list[dict]) -> dict:
    budget = args.aa_budget
    return {
        "benchmark": "PGD-AT step time against batch size and model; AutoAttack time against "
        "points",
        "settings": {
            "models": args.models,
            "model_kwargs": {m: tt.MODEL_KWARGS.get(m, {}) for m in args.models},
            "batch_sizes": args.batch_sizes,
            "epoch_examples": CIFAR10_TRAIN_EXAMPLES,
            "timed_steps": args.steps,
            "warmup_steps": args.warmup,
            "dtype": args.dtype,
            "attack": {
                "eps": tt.EPS,
                "step_size": tt.STEP_SIZE,
                "steps": tt.PGD_STEPS,
                "norm": "linf",
            },
            "aa_points": args.aa_points,
            "aa_model": args.aa_model,
            "aa_mode": args.aa_mode,
            "aa_chunk_size": args.aa_chunk_size,
            "aa_budget": "standard"
            if budget is None
            else {k: list(v) if isinstance(v, tuple) else v for k, v in budget.items()},
            "aa_budget_label": "standard" if budget is None else "custom budget",
            "device": args.device,
            "isolate": args.isolate,
            "child_timeout_s": args.child_timeout,
            "seed": args.seed,
        },
        "host": tt._host_info(),
        "training": training,
        "autoattack": autoattack,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def markdown(report: dict) -> str:
    """The training grid and the AutoAttack points as Markdown tables."""
    lines = [
        "| model | batch | status | ms/step | examples/s | steps/epoch | s/epoch "
        "| first call (s) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for p in report["training"]:
        if p["status"] != "ok":
            lines.append(
                f"| {p['model']} | {p['batch_size']} | {p['status']} | - | - | - | - | - |"
            )
            continue
        lines.append(
            f"| {p['model']} | {p['batch_size']} | ok | {p['ms_per_step']:.1f} "
            f"| {p['examples_per_s']:.1f} | {p['steps_per_epoch']} "
            f"| {p['seconds_per_epoch']:.1f} | {p['first_call_s']:.1f} |"
        )
    lines += ["", "| AutoAttack points | status | seconds | first call (s) | s / 1000 points |"]
    lines.append("|---:|---|---:|---:|---:|")
    for p in report["autoattack"]:
        if p["status"] != "ok":
            lines.append(f"| {p['num_points']} | {p['status']} | - | - | - |")
            continue
        lines.append(
            f"| {p['num_points']} | ok | {p['seconds']:.2f} | {p['seconds_first_call']:.1f} "
            f"| {1000 * p['seconds'] / p['num_points']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.replot is not None:
        report = json.loads(Path(args.replot).read_text())
        png = os.path.splitext(args.replot)[0] + ".png"
        plot(report, png)
        print(f"wrote {png}", file=sys.stderr)
        return report
    if args.child is not None:  # a subprocess of the driver below: one point, JSON out
        point = _run_spec(json.loads(args.child), args)
        tt._write_json(args.child_out, point)
        return point

    if not args.isolate:  # in this process: allocate on demand, as the children do
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.makedirs(args.out_dir, exist_ok=True)
    json_path = os.path.join(args.out_dir, f"{args.name}.json")
    png_path = os.path.join(args.out_dir, f"{args.name}.png")
    specs = [
        {"kind": "train", "model": m, "batch_size": b}
        for m in args.models
        for b in args.batch_sizes
    ] + [{"kind": "autoattack", "num_points": n} for n in args.aa_points]
    training, autoattack = [], []
    for spec in specs:
        print(f"== {json.dumps(spec)}", file=sys.stderr, flush=True)
        point = _run_isolated(spec, args, argv) if args.isolate else _run_spec(spec, args)
        (training if spec["kind"] == "train" else autoattack).append(point)
        # Written after every point, so a run cut short keeps what it measured.
        tt._write_json(json_path, _report(args, training, autoattack))
    report = _report(args, training, autoattack)
    print(markdown(report))
    try:
        plot(report, png_path)
    except ImportError as e:  # e.g. a GPU machine without matplotlib: the JSON is kept
        print(
            f"wrote {json_path}; no plot ({e}): redraw it elsewhere with --replot {json_path}",
            file=sys.stderr,
        )
        return report
    print(f"wrote {json_path} and {png_path}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
