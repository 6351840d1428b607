"""AutoAttack (standard) wall time per 1000 CIFAR-10-shaped points on a PreActResNet-18.

  python benchmarks/autoattack_time.py --num-points 1000 --out results/autoattack.json

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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(num_points: int, mode: str, chunk_size: int | None, dtype: str, seed: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_memat.attacks.autoattack import autoattack
    from jax_memat.models import get_model, init_model, make_apply_fn
    from jax_memat.training import make_mesh

    mesh = make_mesh()
    module = get_model("preact_resnet18", 10, dtype=dtype)
    variables = init_model(module, jax.random.key(seed), (32, 32, 3))
    apply_fn = make_apply_fn(module)
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(num_points, 32, 32, 3)).astype(np.float32)
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
        "benchmark": "AutoAttack standard, L-inf 8/255, PreActResNet-18, 32x32x3, 10 classes",
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-points", type=int, default=1000)
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
    report = run(args.num_points, args.mode, args.chunk_size, args.dtype, args.seed)
    print(
        f"{report['seconds_per_1000_points']:.1f} s per 1000 points ({args.mode}, "
        f"{report['device']}, steady state)"
    )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        from jax_memat.fileio import atomic_write  # a cut-short write leaves no torn file

        with atomic_write(args.out) as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
