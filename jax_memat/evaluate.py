"""Evaluate a trained run: PGD, CW or AutoAttack on a checkpoint.

  python -m jax_memat.evaluate --workdir=workdirs/c10_pgdat --checkpoint=best --attack=autoattack
  python -m jax_memat.evaluate --workdir=... --checkpoint=final --attack=pgd --steps=20
  python -m jax_memat.evaluate --workdir=... --checkpoint=1560 --attack=cw --split=train

The threat model (norm, eps, step size) defaults to the run's training attack
and can be overridden. Results go to ``<workdir>/eval/<checkpoint>_<attack>_<split>.json``
(or ``--output``); ``--save_adversarial`` also writes the adversarial inputs
as ``.npz``. Every argument, the checkpoint's presence and the output's folder
are checked before the checkpoint is restored or anything compiles. Exit
codes: 0 done, 2 bad argument, 3 workdir problem (no run, no such checkpoint,
a damaged checkpoint, output not writable), 4 dataset not found, 5 out of
memory or disk, 130/143 stopped by SIGINT/SIGTERM; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import os
import time

from absl import flags

from jax_memat import cli

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


CHECKPOINT_NAMES = ("best", "final", "latest", "init")


def _checkpoint_arg(value: str) -> str | int:
    return int(value) if value.isdigit() else value


def check_arguments(
    workdir: str,
    *,
    checkpoint: str | int,
    attack: str,
    split: str,
    norm: str | None,
    eps: float | None,
    step_size: float | None,
    steps: int,
    num_examples: int,
    batch_size: int,
    seed: int,
) -> None:
    """Checks every argument and that the workdir holds the checkpoint, reading no arrays.

    Raises:
      ConfigError: a bad argument (all problems listed at once).
      WorkdirError: no run in ``workdir``, or no such kept checkpoint.
    """
    import jax

    from jax_memat.training.config import MAX_SEED, batch_size_problem, threat_model_problems
    from jax_memat.training.errors import ConfigError, WorkdirError
    from jax_memat.training.workdir import CONFIG_FILE, read_json, survey_workdir

    problems = []
    if attack not in ATTACKS:
        problems.append(f"attack={attack!r} is not accepted; use one of {ATTACKS}.")
    if split not in ("test", "train"):
        problems.append(f"split={split!r} is not accepted; use 'test' or 'train'.")
    if isinstance(checkpoint, str) and checkpoint not in CHECKPOINT_NAMES:
        problems.append(
            f"checkpoint={checkpoint!r} is not accepted; use one of {CHECKPOINT_NAMES} or the "
            "step number of a kept checkpoint."
        )
    if attack != "autoattack" and (not isinstance(steps, int) or steps < 1):
        problems.append(f"steps={steps!r} is invalid; accepted: a positive integer.")
    if num_examples != -1 and (not isinstance(num_examples, int) or num_examples < 1):
        problems.append(f"num_examples={num_examples!r} is invalid; accepted: -1 (all) or >= 1.")
    if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        problems.append(f"seed={seed!r} is out of range; accepted: an integer in [0, {MAX_SEED}].")
    problem = batch_size_problem(batch_size, jax.device_count(), "batch_size")
    if problem:
        problems.append(problem)
    if os.path.isdir(workdir) and os.path.exists(os.path.join(workdir, CONFIG_FILE)):
        saved = read_json(os.path.join(workdir, CONFIG_FILE)).get("attack", {})
        problems.extend(
            threat_model_problems(
                norm or saved.get("norm"),
                saved.get("eps") if eps is None else eps,
                (saved.get("step_size") if step_size is None else step_size)
                if attack != "autoattack"
                else 1.0,  # AutoAttack sets its own step sizes
            )
        )
    if problems:
        raise ConfigError("Invalid arguments:\n  - " + "\n  - ".join(problems))
    if not os.path.isdir(workdir) or not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
        raise WorkdirError(f"{workdir} holds no training run ({CONFIG_FILE} is missing).")
    kept = survey_workdir(workdir).checkpoint_steps
    kind = {"final": "latest"}.get(checkpoint, checkpoint)
    found = (
        any(checkpoint in steps for steps in kept.values())
        if isinstance(checkpoint, int)
        else bool(kept.get(kind))
    )
    if not found:
        listing = ", ".join(f"{k}: steps {v}" for k, v in kept.items()) or "none"
        raise WorkdirError(
            f"{workdir} keeps no {checkpoint!r} checkpoint; kept checkpoints: {listing}."
        )


def check_output(path: str) -> None:
    """Raises ``WorkdirError`` unless ``path`` can be written (checked before the evaluation)."""
    from jax_memat.training.errors import WorkdirError
    from jax_memat.training.workdir import check_workdir_path

    if os.path.isdir(path):
        raise WorkdirError(f"The output {path} is a folder; give a file name (.json).")
    check_workdir_path(os.path.dirname(os.path.abspath(path)))


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
    from jax_memat.training.workdir import save_npz

    check_arguments(
        workdir,
        checkpoint=checkpoint,
        attack=attack,
        split=split,
        norm=norm,
        eps=eps,
        step_size=step_size,
        steps=steps,
        num_examples=num_examples,
        batch_size=batch_size,
        seed=seed,
    )
    if save_adversarial:
        check_output(save_adversarial)
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
        save_npz(save_adversarial, **arrays)
    return result


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {argv[1:]} (flags are written --name=value).", 2)
    from jax_memat.training.workdir import write_json

    checkpoint = _checkpoint_arg(_CHECKPOINT.value)
    name = f"{checkpoint}_{_ATTACK.value}_{_SPLIT.value}"
    output = _OUTPUT.value or os.path.join(_WORKDIR.value, "eval", name + ".json")
    check_output(output)
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
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_json(output, result)
    print(
        f"{result['attack']} on {result['split']} ({result['num_examples']} examples, checkpoint "
        f"{checkpoint}, epoch {result['epoch']}): natural {100 * result['natural_accuracy']:.2f}%"
        f" | robust {100 * result['robust_accuracy']:.2f}%"
    )
    print(f"wrote {output}")


if __name__ == "__main__":
    cli.run(main)
