"""AutoAttack (standard) wall time per 1000 CIFAR-10-shaped points on a PreActResNet-18.

  python benchmarks/autoattack_time.py --num-points 1000 --out results/autoattack.json

``--model`` picks another network of the benchmark's registry (train_throughput.MODELS;
``wide_resnet`` is WRN-34-10); the small CNN runs on 28x28x1 inputs. ``--version
custom`` with ``--attacks``/``--n-iter``/``--n-queries``/``--n-targets`` runs smaller
budgets than the standard version (for smoke tests; not AutoAttack's cost).

What is timed: ``jax_memat.attacks.autoattack.autoattack`` (APGD-CE, APGD-T with 9
targets, FAB-T with 9 targets, Square with 5000 queries; L-inf eps 8/255) on
random 32x32x3 inputs, twice: the first call includes compilation, the second
is the steady-state cost. Per-attack seconds come from the result.

The cost of AutoAttack depends on how many points survive each attack (each
runs only on the still-robust ones). ``--mode worst_case`` (default) makes every
point survive every attack: the network's logits are scaled by 1e-3 and a
margin of 100 is added to class 0, the label of every point, so every attack
runs its full budget on every point at the full cost of the network's forward
and backward passes; this is the upper bound of the standard version's cost.
``--mode random_init`` attacks the randomly initialised network as it is
(labels = its clean predictions), where most points fall to APGD-CE at once:
a lower bound. A trained robust model (about half the points robust) lies
between the two.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import train_throughput as tt  # noqa: E402  (model names and shapes, beside this file)


def run(
    num_points: int,
    mode: str,
    chunk_size: int | None,
    dtype: str,
    seed: int,
    model: str = "preact_resnet18",
    budget: dict | None = None,
) -> dict:
    """Times ``autoattack`` twice (with, then without compilation) on random points.

    Args:
      num_points: points attacked.
      mode: ``"worst_case"`` or ``"random_init"`` (module docstring).
      chunk_size: points per compiled call (None: the library's default).
      dtype: the model's compute dtype.
      seed: parameters and data.
      model: a name of ``train_throughput.MODELS``.
      budget: None for the standard version, or ``autoattack``'s custom-version
        arguments (``attacks``, ``n_iter``, ``n_queries``, ``n_target_classes``).

    Returns:
      The report: ``runs`` (total and per-attack seconds, accuracies), seconds per
      1000 points (steady state and first call), device and versions.

    Example:
      >>> run(16, "worst_case", 8, "float32", 0, model="small_cnn",
      ...     budget={"attacks": ("apgd-ce",), "n_iter": 2})["runs"][1]["total_s"] > 0
      True
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_memat.attacks.autoattack import autoattack
    from jax_memat.models import get_model, init_model, make_apply_fn
    from jax_memat.training import make_mesh

    mesh = make_mesh()
    module = get_model(model, 10, dtype=dtype, **tt.MODEL_KWARGS.get(model, {}))
    shape = tt.image_shape(model)
    variables = init_model(module, jax.random.key(seed), shape)
    apply_fn = make_apply_fn(module)
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(num_points, *shape)).astype(np.float32)
    if mode == "worst_case":
        margin = jnp.zeros(10).at[0].set(100.0)

        def attacked(variables, x, train):
            logits, state = apply_fn(variables, x, train)
            return 1e-3 * logits + margin, state

        labels = np.zeros(num_points, np.int32)
    else:
        attacked = apply_fn
        logits, _ = jax.jit(lambda v, x: apply_fn(v, x, False))(variables, images)
        labels = np.asarray(jnp.argmax(logits, -1), np.int32)

    runs = []
    for attempt in range(2):
        start = time.perf_counter()
        result = autoattack(
            attacked,
            variables,
            images,
            labels,
            eps=8 / 255,
            norm="linf",
            key=jax.random.key(attempt),
            mesh=mesh,
            chunk_size=chunk_size,
            **({} if budget is None else {"version": "custom", **budget}),
        )
        total = time.perf_counter() - start
        runs.append(
            {
                "total_s": total,
                "seconds_per_attack": result.seconds,
                "accuracy_after_each_attack": result.accuracy,
                "checks": result.checks,
            }
        )
        print(
            f"run {attempt} ({'with' if attempt == 0 else 'without'} compilation): "
            f"{total:.1f} s for {num_points} points; robust {result.robust_accuracy:.3f}; "
            f"per attack {json.dumps({k: round(v, 2) for k, v in result.seconds.items()})}",
            flush=True,
        )
    steady = runs[1]["total_s"]
    return {
        "benchmark": f"AutoAttack {'standard' if budget is None else 'custom'}, L-inf 8/255, "
        f"{model}, {'x'.join(map(str, shape))}, 10 classes",
        "model": model,
        "budget": "standard"
        if budget is None
        else {k: list(v) if isinstance(v, tuple) else v for k, v in budget.items()},
        "mode": mode,
        "num_points": num_points,
        "chunk_size": chunk_size,
        "dtype": dtype,
        "device": jax.devices()[0].device_kind,
        "num_devices": mesh.devices.size,
        "jax": jax.__version__,
        "seconds_per_1000_points": 1000 * steady / num_points,
        "seconds_per_1000_points_first_call": 1000 * runs[0]["total_s"] / num_points,
        "runs": runs,
    }


def custom_budget(
    version: str,
    attacks: str | None,
    n_iter: int | None,
    n_queries: int | None,
    n_targets: int | None,
) -> dict | None:
    """``run``'s ``budget`` from command-line values; None for the standard version.

    Raises:
      ValueError: a budget value given with the standard version, or one below 1.

    Example:
      >>> custom_budget("custom", "apgd-ce,square", 5, 10, None)
      {'attacks': ('apgd-ce', 'square'), 'n_iter': 5, 'n_queries': 10}
    """
    given = {"n_iter": n_iter, "n_queries": n_queries, "n_target_classes": n_targets}
    given = {k: v for k, v in given.items() if v is not None}
    if version == "standard":
        if attacks is not None or given:
            raise ValueError(
                "attacks, iterations, queries and targets are fixed in the standard version; "
                "add --version custom (or --aa-version custom) to change them"
            )
        return None
    bad = {k: v for k, v in given.items() if v < 1}
    if bad:
        raise ValueError(f"budgets must be >= 1; got {bad}")
    budget: dict = {}
    if attacks is not None:
        budget["attacks"] = tuple(a.strip() for a in attacks.split(",") if a.strip())
    return {**budget, **given}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-points", type=int, default=1000)
    parser.add_argument("--model", choices=tt.MODELS, default="preact_resnet18")
    parser.add_argument("--version", choices=("standard", "custom"), default="standard")
    parser.add_argument("--attacks", default=None, help="custom: comma-separated attacks")
    parser.add_argument("--n-iter", type=int, default=None, help="custom: APGD/FAB iterations")
    parser.add_argument("--n-queries", type=int, default=None, help="custom: Square queries")
    parser.add_argument("--n-targets", type=int, default=None, help="custom: target classes")
    parser.add_argument("--mode", choices=("worst_case", "random_init"), default="worst_case")
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="points per compiled call (default: the library's)",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    try:
        budget = custom_budget(
            args.version, args.attacks, args.n_iter, args.n_queries, args.n_targets
        )
    except ValueError as e:
        parser.error(str(e))
    if args.num_points < 1:
        parser.error(f"--num-points must be >= 1; got {args.num_points}")
    report = run(
        args.num_points, args.mode, args.chunk_size, args.dtype, args.seed, args.model, budget
    )
    print(
        f"{report['seconds_per_1000_points']:.1f} s per 1000 points ({args.mode}, "
        f"{report['device']}, steady state)"
    )
    if args.out:
        tt._write_json(args.out, report)


if __name__ == "__main__":
    main()
