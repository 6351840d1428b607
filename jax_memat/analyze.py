"""Command-line entry point for the analyses of trained runs.

  python -m jax_memat.analyze memorization --workdir=workdirs/quickstart
  python -m jax_memat.analyze memorization --workdir=... --fraction=0.05 --epoch=40
  python -m jax_memat.analyze gradients --workdir=... --checkpoint=final --num_examples=512

Writes a JSON report and figures under ``<workdir>/analysis/`` (or
``--out_dir``). The analyses and their outputs are listed in
``jax_memat.experiment.analyses``. Exit codes: 0 done, 2 bad argument,
unknown analysis or unknown checkpoint name, 3 no run in the workdir, no such
checkpoint, or nothing recorded that the analysis needs; ``--debug`` shows
tracebacks.
"""

from absl import flags

from jax_memat.experiment import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where outputs go (default <workdir>/analysis).")
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
    "(default 4 batches).",
)
_MICROBATCH = flags.DEFINE_integer(
    "microbatch", None, "gradients: per-example gradients computed at once (memory only)."
)
_SEED = flags.DEFINE_integer("seed", 0, "gradients: the attack's randomness.")
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
}


def main(argv):
    from jax_memat.experiment.analyses import ANALYSES, analyze

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
        f"--{flag}"
        for options in _OPTIONS.values()
        for flag, holder in options.items()
        if flag not in ours and flags.FLAGS[holder.name].present
    )
    if foreign:
        cli.fail(
            f"{', '.join(foreign)} do(es) not apply to the {name} analysis; its options: "
            f"{', '.join('--' + f for f in ours) or 'none'}.",
            2,
        )
    summary = analyze(name, _WORKDIR.value, _OUT_DIR.value, **{k: v.value for k, v in ours.items()})
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
    print(f"wrote {_OUT_DIR.value or _WORKDIR.value + '/analysis'}")


if __name__ == "__main__":
    cli.run(main)
