"""Command-line entry point for the analyses of trained runs.

  python -m jax_memat.analyze memorization --workdir=workdirs/quickstart
  python -m jax_memat.analyze memorization --workdir=... --fraction=0.05 --epoch=40
  python -m jax_memat.analyze gradients --workdir=... --checkpoint=final --num_examples=512
  python -m jax_memat.analyze complexity --workdir=A --workdir=B --out_dir=... \\
      --measures=dist_fro,local_lipschitz --num_examples=1000 --min_train_accuracy=0.9

Writes a JSON report and figures under ``<workdir>/analysis/`` (or
``--out_dir``). ``--workdir`` is repeated for ``complexity`` (a family of
runs; ``--out_dir`` is then required); the other analyses take exactly one.
The analyses and their outputs are listed in
``jax_memat.experiment.analyses``. Exit codes: 0 done, 2 bad argument,
unknown analysis or unknown checkpoint name, 3 no run in a workdir, no such
checkpoint, or nothing recorded that the analysis needs; ``--debug`` shows
tracebacks.
"""

from absl import flags

from jax_memat.experiment import cli

_WORKDIR = flags.DEFINE_multi_string(
    "workdir", None, "A training workdir (complexity: repeat it, one per run of the family)."
)
_OUT_DIR = flags.DEFINE_string(
    "out_dir", None, "Where outputs go (default <workdir>/analysis; required for several workdirs)."
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "gradients: best (default), final, latest, init or the step of a kept checkpoint.",
)
_FRACTION = flags.DEFINE_float("fraction", 0.1, "memorization: the share of examples called hard.")
_EPOCH = flags.DEFINE_integer(
    "epoch", None, "memorization: rank hard examples at this epoch (default: the best one)."
)
_NUM_EXAMPLES = flags.DEFINE_integer(
    "num_examples",
    None,
    "gradients: the first training examples analysed, a multiple of the run's batch size "
    "(default 4 batches); complexity: the first rows of each split measured (default 512, at "
    "most the smallest split).",
)
_MICROBATCH = flags.DEFINE_integer(
    "microbatch", None, "gradients: per-example gradients computed at once (memory only)."
)
_SEED = flags.DEFINE_integer("seed", 0, "gradients, complexity: the attacks' randomness.")
_MEASURES = flags.DEFINE_string(
    "measures",
    None,
    "complexity: comma-separated measure names (default: the CPU-affordable set, "
    "jax_memat.analysis.complexity.report.DEFAULT_MEASURES).",
)
_MIN_TRAIN_ACCURACY = flags.DEFINE_float(
    "min_train_accuracy",
    0.9,
    "complexity: runs whose natural training accuracy on their trained-on labels is below "
    "this are flagged as not converged and left out of the ranking.",
)
flags.mark_flags_as_required(["workdir"])

# Which flags each analysis reads; the others are refused when given.
_OPTIONS = {
    "memorization": {"fraction": _FRACTION, "epoch": _EPOCH},
    "gradients": {
        "checkpoint": _CHECKPOINT,
        "num_examples": _NUM_EXAMPLES,
        "microbatch": _MICROBATCH,
        "seed": _SEED,
    },
    "complexity": {
        "measures": _MEASURES,
        "num_examples": _NUM_EXAMPLES,
        "min_train_accuracy": _MIN_TRAIN_ACCURACY,
        "seed": _SEED,
    },
}


def _print_summary(name: str, summary: dict) -> None:
    hard = summary.get("hard_examples", {})
    if hard:
        print(
            f"{summary['num_examples']} training examples over epochs {summary['epochs'][0]}-"
            f"{summary['epochs'][-1]}: {hard['count']} hard at epoch {hard['epoch']} "
            f"(by {hard['quantity']}); {summary['num_corrupted']} with corrupted labels."
        )
    if name == "gradients":
        norms = summary["grad_norm"]
        print(
            f"{summary['num_examples']} training examples at the {summary['checkpoint']} "
            f"checkpoint (epoch {summary['epoch']}): median per-example gradient norm "
            f"{norms['median']:.4g}, noise scale {summary['noise_scale']}."
        )
    if name == "complexity":
        print(
            f"{len(summary['runs'])} runs, {len(summary['ranked'])} ranked"
            + (f", not converged: {', '.join(summary['excluded'])}" if summary["excluded"] else "")
            + "."
        )
        if summary["note"]:
            print(summary["note"])
        for measure, c in summary["correlation"].items():
            print(f"  {measure}: tau-b {c['tau_b']:.3f}, granulated tau {c['granulated_tau']:.3f}")


def main(argv):
    from jax_memat.experiment.analyses import ANALYSES, FAMILY_ANALYSES, analyze

    if len(argv) != 2:
        cli.fail(
            f"name one analysis: python -m jax_memat.analyze ANALYSIS --workdir=...; accepted: "
            f"{', '.join(sorted(ANALYSES))}.",
            2,
        )
    name = argv[1]
    if name not in ANALYSES:
        cli.fail(f"Unknown analysis {name!r}; accepted: {', '.join(sorted(ANALYSES))}.", 2)
    ours = _OPTIONS[name]
    foreign = sorted(
        {
            f"--{flag}"
            for options in _OPTIONS.values()
            for flag, holder in options.items()
            if flag not in ours and flags.FLAGS[holder.name].present
        }
    )
    if foreign:
        cli.fail(
            f"{', '.join(foreign)} do(es) not apply to the {name} analysis; its options: "
            f"{', '.join('--' + f for f in ours) or 'none'}.",
            2,
        )
    workdirs = _WORKDIR.value
    if len(workdirs) > 1 and name not in FAMILY_ANALYSES:
        cli.fail(
            f"the {name} analysis reads exactly one --workdir; got {len(workdirs)}. Analyses of "
            f"several runs: {', '.join(FAMILY_ANALYSES)}.",
            2,
        )
    options = {k: v.value for k, v in ours.items()}
    if name in FAMILY_ANALYSES:
        options["progress"] = print
    summary = analyze(
        name, workdirs if name in FAMILY_ANALYSES else workdirs[0], _OUT_DIR.value, **options
    )
    _print_summary(name, summary)
    print(f"wrote {_OUT_DIR.value or workdirs[0] + '/analysis'}")


if __name__ == "__main__":
    cli.run(main, multiprocess=False)
