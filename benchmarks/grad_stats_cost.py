"""The cost of the gradient-statistics probe (``jax_memat.analysis.GradStats``) per step.

Times jitted train steps on the same fixed batch: the plain step, the step
with the probe on a step it does not sample (gradient norm and consecutive
cosine only), and the step with the probe on a sampled step (per-example
gradients, noise scale, smoothness), the last two as the training loop runs
them (the host passes ``sample``; no branch in the program). With
``--device-branch`` also the sampled step decided on the device (``lax.cond``),
as a notebook call ``step(state, batch)`` runs it. Each is run ``--warmup``
times, then ``--steps`` times back to back with the state synchronised at the
end; the median of ``--repeats`` such runs is reported, in milliseconds per
step, with the average overhead at a sampling interval of ``--every`` steps.

Example::

    JAX_PLATFORMS=cpu python benchmarks/grad_stats_cost.py --model small_cnn \\
        --objective trades --batch-size 128 --image-shape 28,28,1 --microbatch 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from jax_memat.analysis import GradStats
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


def _time(step, state, batch, steps, warmup, repeats):
    for _ in range(warmup):
        state, _ = step(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, _ = step(state, batch)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - t0) / steps * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--objective", default="trades")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-shape", default="28,28,1")
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--microbatch", type=int, default=16, help="0: the whole batch")
    parser.add_argument("--examples", type=int, default=0, help="0: the whole batch")
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device-branch", action="store_true")
    args = parser.parse_args()

    shape = tuple(int(s) for s in args.image_shape.split(","))
    mesh = make_mesh(jax.devices()[:1])
    module = get_model(args.model, 10)
    attack = AttackSpec("pgd", 0.3, 0.1, args.attack_steps)
    objective = make_objective(args.objective, make_apply_fn(module), attack)
    rng = np.random.default_rng(0)
    batch = shard_batch(
        {
            "image": rng.uniform(size=(args.batch_size, *shape)).astype(np.float32),
            "label": rng.integers(0, 10, args.batch_size).astype(np.int32),
            "index": np.arange(args.batch_size, dtype=np.int32),
        },
        mesh,
    )
    tx = make_optimizer("sgd", 0.01, momentum=0.9, weight_decay=5e-4)
    microbatch = args.microbatch or None
    examples = args.examples or None
    probe = GradStats(every_steps=1, microbatch=microbatch, examples=examples)

    def timed(probe, sample):
        opt = tx if probe is None else probe.optimizer(tx)
        state = create_train_state(module, jax.random.key(0), shape, opt, mesh)
        jitted = make_train_step(objective, opt, mesh, probe=probe)

        def step(state, batch):
            return jitted(state, batch) if sample is None else jitted(state, batch, sample)

        return _time(step, state, batch, args.steps, args.warmup, args.repeats)

    plain = timed(None, None)
    print(f"plain step: {plain:.1f} ms", flush=True)
    off = timed(probe, False)
    print(f"probe, step not sampled: {off:.1f} ms", flush=True)
    on = timed(probe, True)
    print(f"probe, sampled step: {on:.1f} ms", flush=True)
    branch = None
    if args.device_branch:
        branch = timed(probe, None)  # every_steps=1: the branch is always taken
        print(f"probe, sampled step decided on the device: {branch:.1f} ms", flush=True)
    every = args.every
    result = {
        "device": jax.devices()[0].device_kind,
        "model": args.model,
        "objective": args.objective,
        "batch_size": args.batch_size,
        "image_shape": shape,
        "attack_steps": args.attack_steps,
        "microbatch": microbatch,
        "examples": examples,
        "ms_per_step_plain": round(plain, 1),
        "ms_per_step_probe_not_sampled": round(off, 1),
        "ms_per_step_probe_sampled": round(on, 1),
        "sampled_step_cost_in_plain_steps": round(on / plain, 2),
        f"overhead_every_{every}_steps": round(((every - 1) * off + on) / every / plain - 1, 4),
    }
    if branch is not None:
        result["ms_per_step_probe_sampled_device_branch"] = round(branch, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
