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

Several processes: the same command in every process, with
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or
none where JAX detects the cluster); the points are split over the devices
of all processes and process 0 writes the result (docs/scaling.md).
"""

from __future__ import annotations

import os

from absl import flags

from jax_memat.experiment import cli
from jax_memat.experiment.evaluate_run import ATTACKS, check_output, run_evaluation

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


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {argv[1:]} (flags are written --name=value).", 2)
    from jax_memat.distributed import is_main_process
    from jax_memat.experiment.workdir import write_json

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
    if not is_main_process():
        return  # process 0 writes the result
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
