"""PGD-20 evaluation and AutoAttack throughput: jax_memat vs. the reference PyTorch code.

One set of weights, one run, one machine. For each model the network is
initialised once with jax_memat and the same weights are loaded into the
PyTorch model of ``torch_baseline.py`` (``weight_transfer.py``); both sides see
the same points (uniform uint8 images divided by 255, NHWC for JAX and NCHW
for PyTorch) and the same labels. Two measurements:

* **PGD-20 evaluation** (``--parts pgd``), examples/s: the library's evaluation
  as the training loop runs it every epoch (``jax_memat.evaluation``:
  ``make_eval_fn`` with PGD-20, L-inf eps 8/255, steps of 2/255, uniform random
  start; jitted and data parallel over all local devices; ``evaluate`` over the
  device-resident uint8 set in fixed-shape batches) against
  ``torch_baseline.robust_eval``, the evaluation loop of PGD-AT code
  (``model.eval()``, a clean forward, ``pgd_linf`` with the same settings, a
  forward on the adversarial batch). Same batch size on both sides.
* **AutoAttack, standard version** (``--parts autoattack``), seconds per 1000
  points: ``jax_memat.attacks.autoattack.autoattack`` against the authors'
  package (Croce & Hein, ICML 2020; github.com/fra31/auto-attack),
  ``AutoAttack(model, norm="Linf", eps=8/255, version="standard")`` and
  ``run_standard_evaluation(x, y, bs=...)``, with the JAX chunk size equal to
  the reference's ``bs``. Per-attack seconds of both, robust accuracy of both.

Where torch, or the ``autoattack`` package, is not installed, that side is
recorded as skipped with the reason and the JAX side still runs.

What the attacks see (``--pgd-mode``, ``--aa-mode``): ``plain`` attacks the
network as initialised, with the labels set to its clean predictions (so every
point starts correctly classified); ``worst_case`` (AutoAttack's default)
attacks ``1e-3 * logits + 100 * e_0`` with every label 0, the same map on both
sides (``torch_baseline.ScaledLogits``): no point can be broken, so every
attack runs its whole budget on every point at the full cost of the network's
passes, the upper bound of AutoAttack's cost (as ``autoattack_time.py``). (The
cross-entropy's gradient underflows to zero there, so APGD-CE does not move;
it still computes every pass.) In ``plain`` mode each attack runs only on the
points the earlier ones left, so AutoAttack's cost depends on the network.

Timing: each side runs the whole measurement ``1 + --repeats`` times (PGD) or
``1 + --aa-repeats`` times (AutoAttack) with the same seeds; the first run is
reported as *first call* (for JAX: tracing and XLA compilation included) and
the median of the others as *steady state*. Each run ends with its results on
the host. Ratios are JAX / PyTorch throughput (points per second, so above 1
means JAX is faster), from the steady-state figures of this one run. Every run
also records its process CPU time, and the report the load average before and
after: on a shared machine, other jobs inflate wall times.

Example::

    python benchmarks/eval_throughput.py --models small_cnn --device cpu \\
        --pgd-points 256 --batch-size 64 --aa-points 16 --aa-batch-size 16 --out results.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import os
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
for _p in (str(_ROOT), str(_HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import train_throughput as _tt  # noqa: E402 (host and framework info, JSON writing)

MODELS = ("preact_resnet18", "resnet18", "small_cnn")
FRAMEWORKS = ("jax", "torch")
PARTS = ("pgd", "autoattack")
MODES = ("plain", "worst_case")
NUM_CLASSES = 10
EPS, STEP_SIZE, PGD_STEPS = 8 / 255, 2 / 255, 20
# The standard version's budgets (Croce & Hein, 2020): APGD and FAB iterations, Square queries.
AA_ITERS, AA_QUERIES, AA_TARGETS = 100, 5000, 9
# worst_case: every point survives every attack (see the module docstring).
WORST_CASE_SCALE, WORST_CASE_MARGIN = 1e-3, 100.0
AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
AUTOATTACK_INSTALL = "pip install git+https://github.com/fra31/auto-attack"
# The reference's attack objects, by the name its standard version runs them under.
_REFERENCE_ATTACKS = {
    "apgd-ce": "apgd",
    "apgd-t": "apgd_targeted",
    "fab-t": "fab",
    "square": "square",
}
# How the reference logs its accuracies (verbose mode): "initial accuracy: 97.00%" and
# "robust accuracy after APGD-CE: 51.00% (total time 12.3 s)".
_LOGGED_ACCURACY = re.compile(r"(initial|robust) accuracy(?: after ([A-Z0-9-]+))?: ([0-9.]+)%")


# --------------------------------------------------------------------------- data and weights


def make_points(model_name: str, n: int, seed: int) -> np.ndarray:
    """The benchmark's images: uniform uint8 NHWC (as datasets are held on the devices).

    Args:
      model_name: decides the shape (28x28x1 for ``small_cnn``, else 32x32x3).
      n: number of images.
      seed: NumPy seed.

    Returns:
      ``[n, H, W, C]`` uint8; both frameworks see ``images / 255`` in float32.

    Example::

        make_points("small_cnn", 4, 0).shape  # (4, 28, 28, 1)
    """
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, *_tt.image_shape(model_name)), dtype=np.uint8)


def attacked_apply_fn(apply_fn, mode: str, num_classes: int = NUM_CLASSES):
    """The JAX model function the attacks see in ``mode`` (``plain`` or ``worst_case``).

    Args:
      apply_fn: ``(variables, images, train) -> (logits, state)``.
      mode: ``"plain"`` (``apply_fn`` itself) or ``"worst_case"``
        (``1e-3 * logits + 100 * e_0``).
      num_classes: number of logits.

    Returns:
      A model function of the same signature. Build it once per model and
      reuse it: compiled attacks are cached per function object.

    Example::

        attacked = attacked_apply_fn(make_apply_fn(module), "worst_case")
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; accepted: {', '.join(MODES)}")
    if mode == "plain":
        return apply_fn
    import jax.numpy as jnp

    margin = jnp.zeros(num_classes, jnp.float32).at[0].set(WORST_CASE_MARGIN)

    def worst_case(variables, images, train):
        logits, state = apply_fn(variables, images, train)
        return WORST_CASE_SCALE * logits + margin, state

    return worst_case


def _torch_attacked(net, mode: str):
    """The PyTorch counterpart of ``attacked_apply_fn``."""
    import torch
    import torch_baseline

    if mode == "plain":
        return net
    offset = torch.zeros(NUM_CLASSES)
    offset[0] = WORST_CASE_MARGIN
    return torch_baseline.ScaledLogits(net, WORST_CASE_SCALE, offset).to(
        next(net.parameters()).device
    )


# --------------------------------------------------------------------------- info


def autoattack_info(commit_flag: str | None = None) -> dict:
    """Whether the reference ``autoattack`` package is importable, and which release.

    The commit is read from pip's record of a ``git+https`` install
    (``direct_url.json``); ``commit_flag`` (``--autoattack-commit``) states it
    where pip did not record one (an install from a local copy).

    Example::

        autoattack_info()["installed"]
    """
    info: dict = {"installed": False, "version": None, "commit": None, "commit_source": None}
    try:
        import autoattack  # noqa: F401
    except ImportError as e:
        info["reason"] = f"autoattack not importable ({e}); install it with: {AUTOATTACK_INSTALL}"
        return info
    info["installed"] = True
    try:
        dist = importlib.metadata.distribution("autoattack")
        info["version"] = dist.version
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
    except (importlib.metadata.PackageNotFoundError, ValueError):
        direct = {}
    commit = (direct.get("vcs_info") or {}).get("commit_id")
    url = direct.get("url", "")
    if commit:
        info.update(commit=commit, commit_source="pip metadata (direct_url.json)")
    if url.startswith(("https://", "git+")):
        info["installed_from"] = url
    elif url:
        info["installed_from"] = "a local copy (pip recorded no commit)"
    if commit_flag and not commit:
        info.update(commit=commit_flag, commit_source="--autoattack-commit")
    return info


def _torch_available() -> str | None:
    """None if torch imports, else why not."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return "skipped: torch not installed"
    return None


# --------------------------------------------------------------------------- JAX side


class _JaxModel:
    """One model's shared pieces on the JAX side (built once, reused by every run)."""

    def __init__(self, model_name: str, seed: int):
        import jax

        from jax_memat.models import get_model, init_model, make_apply_fn
        from jax_memat.parallel import make_mesh, replicate

        self.mesh = make_mesh()
        self.module = get_model(model_name, NUM_CLASSES)
        self.host_variables = jax.device_get(
            init_model(self.module, jax.random.key(seed), _tt.image_shape(model_name))
        )
        self.variables = replicate(self.host_variables, self.mesh)
        self.apply_fn = make_apply_fn(self.module)
        self.attacked = {m: attacked_apply_fn(self.apply_fn, m) for m in MODES}
        self._logits = jax.jit(lambda v, x: self.apply_fn(v, x, False)[0])

    def logits(self, images_u8: np.ndarray, batch_size: int) -> np.ndarray:
        """Inference-mode logits of the plain network, in batches."""
        import jax

        out = []
        for start in range(0, len(images_u8), batch_size):
            x = images_u8[start : start + batch_size].astype(np.float32) / 255.0
            out.append(jax.device_get(self._logits(self.variables, x)))
        return np.concatenate(out)


def _jax_pgd(jm: _JaxModel, images_u8, labels, args: argparse.Namespace) -> dict:
    """Times the library's PGD evaluation; per-example results of the last run."""
    import jax

    from jax_memat.attacks import AttackSpec
    from jax_memat.evaluation import evaluate, make_eval_fn
    from jax_memat.parallel import replicate

    spec = AttackSpec("pgd", EPS, STEP_SIZE, args.pgd_steps, norm="linf", random_start=True)
    eval_fn = make_eval_fn(jm.attacked[args.pgd_mode], {"pgd": spec}, jm.mesh)
    data, targets = replicate((images_u8, labels), jm.mesh)
    jax.block_until_ready((data, targets))

    runs = []
    for _ in range(1 + args.repeats):
        with _Timer() as timer:
            per_example, summary = evaluate(
                eval_fn,
                jm.variables,
                data,
                targets,
                batch_size=args.batch_size,
                key=jax.random.key(args.seed),
                mesh=jm.mesh,
            )  # returns with every result on the host
        runs.append(timer.times())
    out = _pgd_summary(len(labels), runs)
    out.update(
        clean_accuracy=summary["natural_accuracy"],
        robust_accuracy=summary["pgd_accuracy"],
        devices_used=int(jm.mesh.devices.size),
        device_name=jax.local_devices()[0].device_kind,
        framework_info=_tt._jax_info(),
        what="jax_memat.evaluation.make_eval_fn + evaluate (jitted, data parallel)",
    )
    out["_robust"] = np.asarray(per_example["pgd_correct"], bool)
    return out


def _jax_autoattack(jm: _JaxModel, images_u8, labels, args: argparse.Namespace) -> dict:
    """Times ``jax_memat.attacks.autoattack.autoattack`` (the standard attacks)."""
    import jax

    from jax_memat.attacks.autoattack import autoattack

    images = images_u8.astype(np.float32) / 255.0
    budget = {}
    if (args.aa_iters, args.aa_queries) != (AA_ITERS, AA_QUERIES):
        # version="custom" only to pass reduced budgets; the same four attacks in order.
        budget = {"version": "custom", "attacks": AUTOATTACK_ATTACKS}
        budget.update(n_iter=args.aa_iters, n_queries=args.aa_queries)
    runs, robust = [], None
    for _ in range(1 + args.aa_repeats):
        with _Timer() as timer:
            result = autoattack(
                jm.attacked[args.aa_mode],
                jm.variables,
                images,
                labels,
                eps=EPS,
                norm="linf",
                key=jax.random.key(args.seed),
                mesh=jm.mesh,
                chunk_size=args.aa_batch_size,
                **budget,
            )
        runs.append(
            {
                **timer.times(),
                "seconds_per_attack": dict(result.seconds),
                "accuracy_after_each_attack": dict(result.accuracy),
                "checks": dict(result.checks),
            }
        )
        robust = result.robust
    out = _aa_summary(len(labels), runs)
    out.update(
        clean_accuracy=result.clean_accuracy,
        robust_accuracy=float(np.mean(robust)),
        devices_used=int(jm.mesh.devices.size),
        device_name=jax.local_devices()[0].device_kind,
        framework_info=_tt._jax_info(),
        what="jax_memat.attacks.autoattack.autoattack (chunk_size = the batch size)",
        per_attack_note="each attack's seconds include re-evaluating and checking its outputs",
    )
    out["_robust"] = np.asarray(robust, bool)
    return out


# --------------------------------------------------------------------------- PyTorch side


def _torch_setup(model_name: str, host_variables, device: str):
    import torch
    import torch_baseline
    import weight_transfer

    dev = _tt._torch_device(device)
    torch.backends.cudnn.benchmark = True  # what conventional evaluation scripts do
    net = torch_baseline.get_model(model_name, NUM_CLASSES).to(dev)
    weight_transfer.load_into_torch(net, model_name, host_variables)
    net.eval()
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    return net, dev, sync


def _torch_tensors(images_u8: np.ndarray, labels: np.ndarray, dev):
    import torch

    nchw = np.ascontiguousarray(images_u8.transpose(0, 3, 1, 2))
    x = (torch.from_numpy(nchw).to(torch.float32) / 255.0).to(dev)
    y = torch.from_numpy(labels.astype(np.int64)).to(dev)
    return x, y


def _torch_pgd(net, dev, sync, images_u8, labels, args: argparse.Namespace) -> dict:
    """Times ``torch_baseline.robust_eval`` (PGD) on the shared weights."""
    import torch
    import torch_baseline

    model = _torch_attacked(net, args.pgd_mode)
    x, y = _torch_tensors(images_u8, labels, dev)
    sync()

    runs = []
    for _ in range(1 + args.repeats):
        torch.manual_seed(args.seed)
        with _Timer() as timer:
            natural, robust = torch_baseline.robust_eval(
                model, x, y, args.batch_size, eps=EPS, alpha=STEP_SIZE, steps=args.pgd_steps
            )
            natural, robust = natural.cpu().numpy(), robust.cpu().numpy()  # to the host, as JAX's
        runs.append(timer.times())
    out = _pgd_summary(len(labels), runs)
    out.update(
        clean_accuracy=float(natural.mean()),
        robust_accuracy=float(robust.mean()),
        devices_used=1,
        device_name=str(dev.type) if dev.type != "cuda" else _cuda_name(dev),
        framework_info=_tt._torch_info(dev),
        what="torch_baseline.robust_eval (eager: eval mode, pgd_linf, no_grad forwards)",
    )
    out["_robust"] = robust.astype(bool)
    return out


class _CapturedLog:
    """Stands in for the reference's logger output: keeps its lines, prints nothing."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, text) -> None:
        self.lines.append(str(text))


def _reference_autoattack(model, dev, args: argparse.Namespace):
    """The reference's standard AutoAttack, its budgets reduced where the flags say so."""
    from autoattack import AutoAttack

    # verbose=True only so that the accuracy after each attack is logged (to
    # _CapturedLog); the attack objects themselves are built silent.
    with contextlib.redirect_stdout(io.StringIO()):
        aa = AutoAttack(
            model,
            norm="Linf",
            eps=EPS,
            version="standard",
            seed=args.seed,
            device=dev,
            verbose=True,
        )
    aa.logger.log = _CapturedLog()
    if args.aa_iters != AA_ITERS:
        # APGD derives its step-size checkpoints from n_iter when built, so the two
        # APGD attacks are rebuilt as the standard version builds them, with n_iter.
        from autoattack.autopgd_base import APGDAttack, APGDAttack_targeted

        common = {"n_restarts": 1, "n_iter": args.aa_iters, "verbose": False, "eps": EPS}
        common.update(norm="Linf", eot_iter=1, rho=0.75, seed=args.seed, device=dev)
        aa.apgd = APGDAttack(model, logger=aa.logger, **common)
        aa.apgd_targeted = APGDAttack_targeted(
            model, n_target_classes=AA_TARGETS, logger=aa.logger, **common
        )
        aa.fab.n_iter = args.aa_iters  # read at run time
    aa.square.n_queries = args.aa_queries  # read at run time (the standard sets 5000)
    return aa


def _time_reference_attacks(aa, sync) -> dict[str, float]:
    """Wraps the reference's attack objects so that each call's wall time is summed.

    The reference times nothing per attack, so each attack object's ``perturb``
    (called once per batch; the targeted attacks loop over their targets inside
    it) is timed, the device synchronised at its end.
    """
    seconds = {name: 0.0 for name in _REFERENCE_ATTACKS}
    for name, attr in _REFERENCE_ATTACKS.items():
        attack = getattr(aa, attr)
        inner = attack.perturb

        def timed(*a, _inner=inner, _name=name, **kw):
            start = time.perf_counter()
            out = _inner(*a, **kw)
            sync()
            seconds[_name] += time.perf_counter() - start
            return out

        attack.perturb = timed
    return seconds


def _logged_accuracies(lines: list[str]) -> dict[str, float] | None:
    """``{"clean": ..., "apgd-ce": ..., ...}`` from the reference's log, None if not found."""
    out = {}
    for line in lines:
        m = _LOGGED_ACCURACY.search(line)
        if m is None or (m.group(1) == "robust" and m.group(2) is None):
            continue  # not an accuracy, or the final one (the last attack's again)
        out["clean" if m.group(1) == "initial" else m.group(2).lower()] = float(m.group(3)) / 100
    return out or None


def _torch_autoattack(net, dev, sync, images_u8, labels, args: argparse.Namespace) -> dict:
    """Times the reference package's standard AutoAttack on the shared weights."""
    model = _torch_attacked(net, args.aa_mode).eval()
    x, y = _torch_tensors(images_u8, labels, dev)
    runs, robust = [], None
    for _ in range(1 + args.aa_repeats):
        aa = _reference_autoattack(model, dev, args)
        seconds = _time_reference_attacks(aa, sync)
        sync()
        with _Timer() as timer, contextlib.redirect_stdout(io.StringIO()):
            _, y_adv = aa.run_standard_evaluation(x, y, bs=args.aa_batch_size, return_labels=True)
            sync()
        robust = (y_adv == y).cpu().numpy()
        lines = aa.logger.log.lines
        runs.append(
            {
                **timer.times(),
                "seconds_per_attack": {**seconds, "other": timer.wall - sum(seconds.values())},
                "accuracy_after_each_attack": _logged_accuracies(lines),
                "reference_warnings": [line for line in lines if "Warning" in line],
            }
        )
    out = _aa_summary(len(labels), runs)
    logged = runs[-1]["accuracy_after_each_attack"] or {}
    out.update(
        clean_accuracy=logged.get("clean"),
        robust_accuracy=float(np.mean(robust)),
        devices_used=1,
        device_name=str(dev.type) if dev.type != "cuda" else _cuda_name(dev),
        framework_info={
            **_tt._torch_info(dev),
            "autoattack": autoattack_info(args.autoattack_commit),
        },
        what="autoattack.AutoAttack(norm='Linf', version='standard').run_standard_evaluation",
        per_attack_note="each attack's seconds are its perturb calls; 'other' is the rest "
        "(the reference's checks of the model, the clean pass, re-evaluating each batch)",
    )
    out["_robust"] = robust.astype(bool)
    return out


def _cuda_name(dev) -> str:
    import torch

    return torch.cuda.get_device_name(dev)


# --------------------------------------------------------------------------- summaries


class _Timer:
    """Wall time and this process's CPU time (all its threads) of a ``with`` block.

    CPU seconds per wall second say how many cores the run kept busy: on a
    machine shared with other jobs, a figure well under the run's usual one
    means it waited for a core, and its wall times are inflated.
    """

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu

    def times(self) -> dict:
        return {"total_s": self.wall, "cpu_s": self.cpu}


def _pgd_summary(n: int, runs: list[dict]) -> dict:
    median = statistics.median(r["total_s"] for r in runs[1:])
    return {
        "points": n,
        "first_call_s": runs[0]["total_s"],
        "steady_median_s": median,
        "examples_per_s": n / median,
        "examples_per_s_first_call": n / runs[0]["total_s"],
        "steady_cpu_s_per_wall_s": _cpu_per_wall(runs[1:]),
        "runs": runs,
    }


def _cpu_per_wall(runs: list[dict]) -> float:
    """Median over runs of CPU seconds per wall second: about how many cores were busy."""
    return statistics.median(r["cpu_s"] / r["total_s"] for r in runs)


def _aa_summary(n: int, runs: list[dict]) -> dict:
    steady = runs[1:]
    median = statistics.median(r["total_s"] for r in steady)
    names = steady[-1]["seconds_per_attack"].keys()
    return {
        "points": n,
        "first_call_s": runs[0]["total_s"],
        "steady_median_s": median,
        "seconds_per_1000_points": 1000 * median / n,
        "seconds_per_1000_points_first_call": 1000 * runs[0]["total_s"] / n,
        "seconds_per_1000_points_per_attack": {
            k: 1000 * statistics.median(r["seconds_per_attack"][k] for r in steady) / n
            for k in names
        },
        "steady_cpu_s_per_wall_s": _cpu_per_wall(steady),
        "runs": runs,
    }


def _ratio(jax_r: dict, torch_r: dict) -> dict:
    """JAX / PyTorch throughput (points per second) and the two robust accuracies."""
    row = {
        "model": jax_r["model"],
        "part": jax_r["part"],
        "attack": jax_r["attack"],
        "robust_accuracy_jax": jax_r["robust_accuracy"],
        "robust_accuracy_torch": torch_r["robust_accuracy"],
        "robust_flags_agreement": float(np.mean(jax_r["_robust"] == torch_r["_robust"])),
    }
    if jax_r["part"] == "autoattack":
        # Times, not rates: the rate ratio is PyTorch's seconds over JAX's.
        row["throughput_ratio_jax_over_torch"] = (
            torch_r["seconds_per_1000_points"] / jax_r["seconds_per_1000_points"]
        )
        jax_a = jax_r["seconds_per_1000_points_per_attack"]
        torch_a = torch_r["seconds_per_1000_points_per_attack"]
        row["per_attack_throughput_ratio_jax_over_torch"] = {
            a: torch_a[a] / jax_a[a] for a in AUTOATTACK_ATTACKS if jax_a.get(a) and torch_a.get(a)
        }
    else:
        row["throughput_ratio_jax_over_torch"] = jax_r["examples_per_s"] / torch_r["examples_per_s"]
    return row


# --------------------------------------------------------------------------- driver


def _attack_label(part: str, args: argparse.Namespace) -> str:
    if part == "pgd":
        return f"PGD-{args.pgd_steps}"
    if (args.aa_iters, args.aa_queries) == (AA_ITERS, AA_QUERIES):
        return "AutoAttack standard"
    return f"AutoAttack ({args.aa_iters} iterations, {args.aa_queries} queries)"


def _guarded(fn, *args):
    """Runs one side of one measurement; a failure is recorded (``{"error": ...}``), not raised."""
    try:
        return fn(*args)
    except Exception:
        error = traceback.format_exc()
        print(error, file=sys.stderr)
        return {"error": error}


def _weights_check(jm: _JaxModel, net, dev, images_u8, batch_size) -> dict:
    """Both frameworks' inference-mode logits on the first points, same weights."""
    import torch

    first = images_u8[: min(len(images_u8), batch_size)]
    jax_logits = jm.logits(first, batch_size)
    x, _ = _torch_tensors(first, np.zeros(len(first), np.int32), dev)
    with torch.no_grad():
        torch_logits = net(x).cpu().numpy()
    return {
        "points": len(first),
        "max_abs_logit": float(np.abs(jax_logits).max()),
        "max_abs_logit_difference": float(np.abs(jax_logits - torch_logits).max()),
        "same_predictions": int(np.sum(jax_logits.argmax(1) == torch_logits.argmax(1))),
    }


def bench_model(model_name: str, args: argparse.Namespace, torch_reason, aa_info) -> list[dict]:
    """Every requested (part, framework) for one model; see the module docstring.

    Args:
      model_name: one of ``MODELS``.
      args: the parsed command line.
      torch_reason: None if the PyTorch side runs, else why not (recorded as skipped).
      aa_info: ``autoattack_info()``.

    Returns:
      One result dict per (part, framework), with ``error`` or ``skipped`` where
      that side did not run.

    Example::

        rows = bench_model("small_cnn", parse_args(["--device=cpu"]), None, autoattack_info())
    """
    jm = _JaxModel(model_name, args.seed)
    net = dev = sync = weights = setup_error = None
    if torch_reason is None:
        setup = _guarded(_torch_setup, model_name, jm.host_variables, args.device)
        if isinstance(setup, dict):  # e.g. --device gpu without CUDA in torch
            setup_error = setup["error"]
        else:
            net, dev, sync = setup
    parts = []
    if "pgd" in args.parts:
        parts.append(("pgd", args.pgd_points, args.pgd_mode, args.batch_size))
    if "autoattack" in args.parts:
        parts.append(("autoattack", args.aa_points, args.aa_mode, args.aa_batch_size))
    rows: list[dict] = []
    for part, n, mode, batch in parts:
        images = make_points(model_name, n, args.seed)
        if mode == "plain":  # every point starts correctly classified
            labels = jm.logits(images, batch).argmax(1).astype(np.int32)
        else:
            labels = np.zeros(n, np.int32)
        if net is not None and weights is None:
            weights = _weights_check(jm, net, dev, images, batch)
        common = {
            "model": model_name,
            "part": part,
            "attack": _attack_label(part, args),
            "mode": mode,
            "batch_size": batch,
        }
        if "jax" in args.frameworks:
            print(f"== {model_name} / {part} / jax", file=sys.stderr, flush=True)
            fn = _jax_pgd if part == "pgd" else _jax_autoattack
            rows.append({**common, "framework": "jax", **_guarded(fn, jm, images, labels, args)})
        if "torch" not in args.frameworks:
            continue
        side = {**common, "framework": "torch"}
        reason = torch_reason
        if part == "autoattack":
            side["framework"] = "torch (autoattack package)"
            if reason is None and not aa_info["installed"]:
                reason = f"skipped: {aa_info['reason']}"
        if reason is not None:
            rows.append({**side, "skipped": reason})
            continue
        if setup_error is not None:
            rows.append({**side, "error": setup_error})
            continue
        print(f"== {model_name} / {part} / torch", file=sys.stderr, flush=True)
        fn = _torch_pgd if part == "pgd" else _torch_autoattack
        rows.append({**side, **_guarded(fn, net, dev, sync, images, labels, args)})
    for row in rows:
        row["weights_check"] = weights
    return rows


def _ratios(results: list[dict]) -> list[dict]:
    ok = [r for r in results if "error" not in r and "skipped" not in r]
    out = []
    for jax_r in (r for r in ok if r["framework"] == "jax"):
        for torch_r in ok:
            if torch_r["framework"] != "jax" and (torch_r["model"], torch_r["part"]) == (
                jax_r["model"],
                jax_r["part"],
            ):
                out.append(_ratio(jax_r, torch_r))
    return out


def _public(results: list[dict]) -> list[dict]:
    """Results without the per-example arrays kept for the agreement figures."""
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(results: list[dict], ratios: list[dict]) -> str:
    """The results, the per-attack seconds and the ratios as Markdown tables.

    Args:
      results: ``report["results"]`` (skipped and failed sides get a row saying so).
      ratios: ``report["ratios"]``.

    Returns:
      The tables, one after the other, as one string.

    Example::

        print(markdown(report["results"], report["ratios"]))
    """
    lines = [
        "| model | attack | framework | mode | device | batch | points | first call (s) "
        "| steady (s) | CPU s / wall s | examples/s | s per 1000 points | clean acc. "
        "| robust acc. |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        head = f"| {r['model']} | {r['attack']} | {r['framework']} | {r['mode']} "
        if "error" in r or "skipped" in r:
            why = r.get("skipped") or "failed: " + r["error"].strip().splitlines()[-1][:80]
            lines.append(head + f"| {why} | {r['batch_size']} |" + " - |" * 8)
            continue
        per_s = r.get("examples_per_s", r["points"] / r["steady_median_s"])
        lines.append(
            head + f"| {r['device_name']} | {r['batch_size']} | {r['points']} "
            f"| {r['first_call_s']:.1f} | {r['steady_median_s']:.2f} "
            f"| {r['steady_cpu_s_per_wall_s']:.2f} | {per_s:.1f} "
            f"| {1000 * r['steady_median_s'] / r['points']:.1f} "
            f"| {_fmt(r.get('clean_accuracy'), '.3f')} | {r['robust_accuracy']:.3f} |"
        )
    aa = [r for r in results if r["part"] == "autoattack" and "seconds_per_1000_points" in r]
    if aa:
        lines += [
            "",
            "AutoAttack, seconds per 1000 points by attack (steady state):",
            "",
            "| model | framework | "
            + " | ".join(AUTOATTACK_ATTACKS)
            + " | other / clean | total |",
            "|---|---|" + "---:|" * (len(AUTOATTACK_ATTACKS) + 2),
        ]
        for r in aa:
            per = r["seconds_per_1000_points_per_attack"]
            rest = per.get("other", per.get("clean"))
            lines.append(
                f"| {r['model']} | {r['framework']} | "
                + " | ".join(_fmt(per.get(a), ".1f") for a in AUTOATTACK_ATTACKS)
                + f" | {_fmt(rest, '.1f')} | {r['seconds_per_1000_points']:.1f} |"
            )
    if ratios:
        lines += [
            "",
            "| model | attack | throughput JAX / PyTorch | robust acc. JAX | robust acc. PyTorch "
            "| same robust flags |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for q in ratios:
            lines.append(
                f"| {q['model']} | {q['attack']} | {q['throughput_ratio_jax_over_torch']:.2f} "
                f"| {q['robust_accuracy_jax']:.3f} | {q['robust_accuracy_torch']:.3f} "
                f"| {q['robust_flags_agreement']:.3f} |"
            )
    return "\n".join(lines)


def _positive(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer >= 1; got {text!r}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (flags in benchmarks/README.md).

    Args:
      argv: the arguments (default ``sys.argv[1:]``).

    Returns:
      The namespace, with ``models``, ``frameworks`` and ``parts`` as lists and
      ``aa_batch_size`` filled in.

    Raises:
      SystemExit: with a message naming the accepted values, on a bad flag.

    Example::

        args = parse_args(["--models=small_cnn", "--device=cpu", "--aa-points=16"])
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        default="preact_resnet18",
        help=f"comma-separated, of {', '.join(MODELS)} (small_cnn on 28x28x1; default %(default)s)",
    )
    p.add_argument("--frameworks", default="jax,torch", help="comma-separated, of jax, torch")
    p.add_argument("--parts", default="pgd,autoattack", help="comma-separated, of pgd, autoattack")
    p.add_argument("--pgd-points", type=_positive("--pgd-points"), default=10_000)
    p.add_argument("--aa-points", type=_positive("--aa-points"), default=1000)
    p.add_argument(
        "--batch-size",
        type=_positive("--batch-size"),
        default=128,
        help="PGD batch, both frameworks (JAX splits it over the local devices)",
    )
    p.add_argument(
        "--aa-batch-size",
        type=_positive("--aa-batch-size"),
        default=None,
        help="AutoAttack's bs (reference) and chunk_size (JAX); default --batch-size",
    )
    p.add_argument("--repeats", type=_positive("--repeats"), default=2, help="steady PGD runs")
    p.add_argument(
        "--aa-repeats", type=_positive("--aa-repeats"), default=1, help="steady AutoAttack runs"
    )
    p.add_argument(
        "--pgd-steps",
        type=_positive("--pgd-steps"),
        default=PGD_STEPS,
        help="PGD steps (default %(default)s: PGD-20; fewer only for smoke tests)",
    )
    p.add_argument(
        "--aa-iters",
        type=_positive("--aa-iters"),
        default=AA_ITERS,
        help="APGD and FAB iterations, both sides (default %(default)s, the standard "
        "version's; fewer only for smoke tests)",
    )
    p.add_argument(
        "--aa-queries",
        type=_positive("--aa-queries"),
        default=AA_QUERIES,
        help="Square queries, both sides (default %(default)s, the standard version's)",
    )
    p.add_argument("--pgd-mode", choices=MODES, default="plain")
    p.add_argument("--aa-mode", choices=MODES, default="worst_case")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--autoattack-commit",
        default=None,
        help="the reference package's commit, recorded where pip did not record one",
    )
    p.add_argument("--out", default=None, help="write the JSON report here (atomically)")
    args = p.parse_args(argv)
    try:
        args.models = _tt._split(args.models, MODELS, "--models")
        args.frameworks = _tt._split(args.frameworks, FRAMEWORKS, "--frameworks")
        args.parts = _tt._split(args.parts, PARTS, "--parts")
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.aa_batch_size is None:
        args.aa_batch_size = args.batch_size
    if args.autoattack_commit is not None and not re.fullmatch(
        r"[0-9a-f]{7,40}", args.autoattack_commit
    ):
        p.error(f"--autoattack-commit: 7 to 40 hex digits; got {args.autoattack_commit!r}")
    return args


def _check_devices(args: argparse.Namespace) -> int:
    """The batch sizes must split over the local devices: checked before anything compiles."""
    import jax

    n = jax.local_device_count()
    for flag, value in (("--batch-size", args.batch_size), ("--aa-batch-size", args.aa_batch_size)):
        if value % n:
            raise ValueError(
                f"{flag} {value} does not split over the {n} local devices; accepted: "
                f"multiples of {n}"
            )
    return n


def _report(args, argv, results, torch_reason, aa_info, load_start) -> dict:
    import flax
    import jax
    import jaxlib

    versions = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__}
    versions["numpy"] = np.__version__
    if torch_reason is None:
        import torch

        versions["torch"] = torch.__version__
    else:
        versions["torch"] = torch_reason
    versions["autoattack"] = aa_info
    return {
        "benchmark": "PGD evaluation and AutoAttack (standard attacks), jax_memat vs the "
        "reference PyTorch code, same weights, L-inf 8/255",
        "command": "python benchmarks/eval_throughput.py " + " ".join(argv),
        "settings": {
            "models": args.models,
            "image_shape_hwc": {m: list(_tt.image_shape(m)) for m in args.models},
            "num_classes": NUM_CLASSES,
            "pgd": {
                "eps": EPS,
                "step_size": STEP_SIZE,
                "steps": args.pgd_steps,
                "random_start": True,
            },
            "autoattack": {
                "attacks": list(AUTOATTACK_ATTACKS),
                "norm": "linf",
                "eps": EPS,
                "n_iter": args.aa_iters,
                "n_queries": args.aa_queries,
                "n_target_classes": AA_TARGETS,
                "standard_budget": (args.aa_iters, args.aa_queries) == (AA_ITERS, AA_QUERIES),
            },
            "pgd_points": args.pgd_points,
            "aa_points": args.aa_points,
            "batch_size": args.batch_size,
            "aa_batch_size": args.aa_batch_size,
            "repeats": args.repeats,
            "aa_repeats": args.aa_repeats,
            "pgd_mode": args.pgd_mode,
            "aa_mode": args.aa_mode,
            "worst_case": {"logit_scale": WORST_CASE_SCALE, "margin_on_class_0": WORST_CASE_MARGIN},
            "device": args.device,
            "seed": args.seed,
            "frameworks": args.frameworks,
            "parts": args.parts,
        },
        "host": {
            **_tt._host_info(),
            "load_average_1_5_15_min_before": load_start,
            "load_average_1_5_15_min_after": _load_average(),
        },
        "versions": versions,
        "results": _public(results),
        "ratios": _ratios(results),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _load_average() -> list[float] | None:
    """The host's 1, 5 and 15 minute load averages (None where the OS gives none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark: Markdown to stdout, the JSON report to ``--out``.

    Args:
      argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
      The report: ``command``, ``settings``, ``host`` (with load averages),
      ``versions`` (jax, jaxlib, flax, numpy, torch, the autoattack package),
      ``results`` (one per model, part and framework) and ``ratios``.

    Raises:
      ValueError: if a batch size does not split over the local devices
        (before anything is built or compiled).

    Example::

        report = main(["--models=small_cnn", "--device=cpu", "--parts=pgd", "--pgd-points=64"])
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    # Before JAX starts: the platform, and no preallocation so PyTorch can share a GPU.
    if "jax" not in sys.modules:
        if args.device == "cpu":
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
        elif args.device == "gpu":
            os.environ.setdefault("JAX_PLATFORMS", "cuda")
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    _check_devices(args)
    torch_reason = _torch_available() if "torch" in args.frameworks else "not requested"
    aa_info = autoattack_info(args.autoattack_commit) if torch_reason is None else {}
    if torch_reason is not None:
        aa_info = {"installed": False, "reason": torch_reason}
    load_start = _load_average()
    results: list[dict] = []
    for model in args.models:
        results.extend(bench_model(model, args, torch_reason, aa_info))
        report = _report(args, argv, results, torch_reason, aa_info, load_start)
        if args.out:  # after every model, so a run cut short keeps what it measured
            _tt._write_json(args.out, report)
    print(markdown(results, report["ratios"]))
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
