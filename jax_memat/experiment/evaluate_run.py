"""Evaluating a kept checkpoint of a run: PGD, CW or AutoAttack, with checked arguments.

The library side of ``python -m jax_memat.evaluate``: ``check_arguments``
and ``check_output`` run before anything is restored or compiled;
``run_evaluation`` restores the checkpoint and evaluates it.
"""

from __future__ import annotations

import os
import time

ATTACKS = ("pgd", "cw", "autoattack")
CHECKPOINT_NAMES = ("best", "final", "latest", "init")


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

    from jax_memat.attacks import threat_model_problems
    from jax_memat.experiment.config import MAX_SEED, batch_size_problem
    from jax_memat.experiment.errors import ConfigError, WorkdirError
    from jax_memat.experiment.workdir import CONFIG_FILE, read_json, survey_workdir

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
                # AutoAttack sets its own step sizes.
                None
                if attack == "autoattack"
                else (saved.get("step_size") if step_size is None else step_size),
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
    from jax_memat.experiment.errors import WorkdirError
    from jax_memat.experiment.workdir import check_workdir_path

    if os.path.isdir(path):
        raise WorkdirError(f"The output {path} is a folder; give a file name (.json).")
    check_workdir_path(os.path.dirname(os.path.abspath(path)), what="output folder")


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

    Several processes: each calls it with the same arguments and gets the
    whole result; process 0 alone writes ``save_adversarial``.

    Example:
      >>> result = run_evaluation("workdirs/quickstart", attack="autoattack", num_examples=1000)
      >>> result["robust_accuracy"]
    """
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from jax_memat.distributed import is_main_process
    from jax_memat.evaluation import evaluate, make_eval_fn
    from jax_memat.experiment.config import evaluation_attacks
    from jax_memat.experiment.setup import load_run
    from jax_memat.experiment.workdir import save_npz
    from jax_memat.training import replicate

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
    quiet = not is_main_process()  # several processes: one set of progress bars
    if attack == "autoattack":
        from jax_memat.attacks.autoattack import autoattack

        bars = {}  # one bar per attack: its chunks cost alike, so its ETA holds

        def progress(name, done, total, acc):
            if name not in bars:
                for earlier in bars.values():
                    earlier.close()
                bars[name] = tqdm(
                    total=total, desc=f"AutoAttack {name}", unit="chunk", disable=quiet
                )
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
        specs = evaluation_attacks(
            run.config, steps, (attack,), norm=norm, eps=eps, step_size=step_size
        )
        eval_fn = make_eval_fn(run.setup.apply_fn, specs, run.mesh)
        images, labels = replicate((data.images, data.labels), run.mesh)
        num_batches = -(-n // batch_size)
        bar = tqdm(total=num_batches, desc=f"{attack.upper()}-{steps}", unit="batch", disable=quiet)
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
    if save_adversarial and is_main_process():
        arrays = {"robust": np.asarray(robust), "index": np.arange(n)}
        if x_adv is not None:
            arrays["x_adv"] = np.asarray(x_adv)
        save_npz(save_adversarial, **arrays)
    return result
