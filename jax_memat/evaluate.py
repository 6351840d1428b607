"""Evaluate a trained run: PGD, CW or AutoAttack on a checkpoint.

  python -m jax_memat.evaluate --workdir=workdirs/c10_pgdat --checkpoint=best --attack=autoattack
  python -m jax_memat.evaluate --workdir=... --checkpoint=final --attack=pgd --steps=20
  python -m jax_memat.evaluate --workdir=... --checkpoint=1560 --attack=cw --split=train

The threat model (norm, eps, step size) defaults to the run's training attack
and can be overridden. Results go to ``<workdir>/eval/<checkpoint>_<attack>_<split>.json``
(or ``--output``); ``--save_adversarial`` also writes the adversarial inputs
as ``.npz``. Exit code 2 with a message on bad input.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

ATTACKS = ("pgd", "cw", "autoattack")
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "best", "best, final (= latest), init, or a step number of a kept checkpoint."
)
_ATTACK = flags.DEFINE_enum("attack", "pgd", ATTACKS, "The evaluation attack.")
_SPLIT = flags.DEFINE_enum("split", "test", ("test", "train"), "Which set (train: noisy labels).")
_NORM = flags.DEFINE_enum("norm", None, ("linf", "l2"), "Norm; default the run's.")
_EPS = flags.DEFINE_float("eps", None, "Radius; default the run's.")
_STEP_SIZE = flags.DEFINE_float("step_size", None, "PGD/CW step size; default the run's.")
_STEPS = flags.DEFINE_integer("steps", 20, "PGD/CW iterations.")
_NUM = flags.DEFINE_integer("num_examples", -1, "Evaluate the first N examples (-1: all).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Global batch (PGD/CW) or chunk (AutoAttack).")
_SEED = flags.DEFINE_integer("seed", 0, "Attack randomness.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON path; default under <workdir>/eval/.")
_SAVE_ADV = flags.DEFINE_bool("save_adversarial", False, "Also save adversarial inputs (.npz).")
flags.mark_flags_as_required(["workdir"])


def _checkpoint_arg(value: str) -> str | int:
    return int(value) if value.isdigit() else value


def run_evaluation(
    workdir: str,
    *,
    checkpoint: str | int = "best",
    attack: str = "pgd",
    split: str = "test",
    norm: str | None = None,
    eps: float | None = None,
    step_size: float | None = None,
    steps: int = 20,
    num_examples: int = -1,
    batch_size: int = 256,
    seed: int = 0,
    save_adversarial: str | None = None,
) -> dict:
    """Evaluates one checkpoint of a run; returns a JSON-compatible result dict.

    Example:
      >>> result = run_evaluation("workdirs/quickstart", attack="autoattack", num_examples=1000)
      >>> result["robust_accuracy"]
    """
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from jax_memat.attacks import AttackSpec
    from jax_memat.training import evaluate, load_run, make_eval_fn, replicate

    if attack not in ATTACKS:
        raise ValueError(f"attack={attack!r} is not accepted; use one of {ATTACKS}.")
    run = load_run(workdir, checkpoint)
    a = run.config.attack
    norm = norm or a.norm
    eps = a.eps if eps is None else eps
    step_size = a.step_size if step_size is None else step_size
    data = run.test if split == "test" else run.train
    n = data.num_examples if num_examples < 0 else min(num_examples, data.num_examples)
    key = jax.random.key(seed)
    result = {
        "workdir": os.path.abspath(workdir),
        "checkpoint": checkpoint,
        "epoch": run.meta.get("epoch"),
        "step": int(jax.device_get(run.state.step)),
        "split": split,
        "num_examples": n,
        "attack": attack,
        "norm": norm,
        "eps": eps,
    }
    start = time.perf_counter()
    if attack == "autoattack":
        from jax_memat.attacks.autoattack import autoattack

        bars = {}  # one bar per attack: its chunks cost alike, so its ETA holds

        def progress(name, done, total, acc):
            if name not in bars:
                for earlier in bars.values():
                    earlier.close()
                bars[name] = tqdm(total=total, desc=f"AutoAttack {name}", unit="chunk")
            bar = bars[name]
            bar.total = total  # an estimate that falls as points are broken
            bar.update(done - bar.n)
            bar.set_postfix(robust=f"{100 * acc:.2f}%")

        images = data.images[:n].astype(np.float32) / 255.0
        out = autoattack(
            run.setup.apply_fn,
            run.state.variables,
            images,
            data.labels[:n],
            eps=eps,
            norm=norm,
            key=key,
            mesh=run.mesh,
            chunk_size=batch_size,
            progress=progress,
        )
        for bar in bars.values():
            bar.close()
        result.update(
            natural_accuracy=out.clean_accuracy,
            robust_accuracy=out.robust_accuracy,
            accuracy_after_each_attack=out.accuracy,
            checks=out.checks,
            seconds_per_attack=out.seconds,
        )
        robust, x_adv = out.robust, out.x_adv
    else:
        spec = AttackSpec(attack, eps, step_size, steps, norm, True)
        eval_fn = make_eval_fn(run.setup.apply_fn, {attack: spec}, run.mesh)
        images, labels = replicate((data.images, data.labels), run.mesh)
        num_batches = -(-n // batch_size)
        bar = tqdm(total=num_batches, desc=f"{attack.upper()}-{steps}", unit="batch")
        per_example, summary = evaluate(
            eval_fn,
            run.state.variables,
            images,
            labels,
            batch_size=batch_size,
            key=key,
            mesh=run.mesh,
            num_examples=n,
            progress=lambda i: bar.update(1),
        )
        bar.close()
        result.update(
            steps=steps,
            step_size=step_size,
            natural_accuracy=summary["natural_accuracy"],
            robust_accuracy=summary[f"{attack}_accuracy"],
        )
        robust, x_adv = per_example[f"{attack}_correct"], None
    result["seconds"] = time.perf_counter() - start
    if save_adversarial:
        arrays = {"robust": np.asarray(robust), "index": np.arange(n)}
        if x_adv is not None:
            arrays["x_adv"] = np.asarray(x_adv)
        np.savez_compressed(save_adversarial, **arrays)
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    checkpoint = _checkpoint_arg(_CHECKPOINT.value)
    name = f"{checkpoint}_{_ATTACK.value}_{_SPLIT.value}"
    output = _OUTPUT.value or os.path.join(_WORKDIR.value, "eval", name + ".json")
    try:
        result = run_evaluation(
            _WORKDIR.value,
            checkpoint=checkpoint,
            attack=_ATTACK.value,
            split=_SPLIT.value,
            norm=_NORM.value,
            eps=_EPS.value,
            step_size=_STEP_SIZE.value,
            steps=_STEPS.value,
            num_examples=_NUM.value,
            batch_size=_BATCH.value,
            seed=_SEED.value,
            save_adversarial=output.removesuffix(".json") + ".npz" if _SAVE_ADV.value else None,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=2)
    print(
        f"{result['attack']} on {result['split']} ({result['num_examples']} examples, checkpoint "
        f"{checkpoint}, epoch {result['epoch']}): natural {100 * result['natural_accuracy']:.2f}%"
        f" | robust {100 * result['robust_accuracy']:.2f}%"
    )
    print(f"wrote {output}")


if __name__ == "__main__":
    app.run(main)
