"""Command-line entry point for the analyses of trained runs.

  python -m jax_memat.analyze memorization --workdir=workdirs/quickstart
  python -m jax_memat.analyze memorization --workdir=... --fraction=0.05 --epoch=40

Writes a JSON report and figures under ``<workdir>/analysis/`` (or
``--out_dir``). The analyses and their outputs are listed in
``jax_memat.analysis.reports``. Exit codes: 0 done, 2 bad argument or unknown
analysis, 3 no run in the workdir or nothing recorded that the analysis needs;
``--debug`` shows tracebacks.
"""

from absl import flags

from jax_memat.experiment import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where outputs go (default <workdir>/analysis).")
_FRACTION = flags.DEFINE_float("fraction", 0.1, "memorization: the share of examples called hard.")
_EPOCH = flags.DEFINE_integer(
    "epoch", None, "memorization: rank hard examples at this epoch (default: the best one)."
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
    from jax_memat.analysis.reports import ANALYSES, analyze

    if len(argv) != 2:
        cli.fail(
            f"name one analysis: python -m jax_memat.analyze ANALYSIS --workdir=...; accepted: "
            f"{', '.join(sorted(ANALYSES))}.",
            2,
        )
    name = argv[1]
    options = {"fraction": _FRACTION.value, "epoch": _EPOCH.value} if name == "memorization" else {}
    summary = analyze(name, _WORKDIR.value, _OUT_DIR.value, **options)
    hard = summary.get("hard_examples", {})
    if hard:
        print(
            f"{summary['num_examples']} training examples over epochs {summary['epochs'][0]}-"
            f"{summary['epochs'][-1]}: {hard['count']} hard at epoch {hard['epoch']} "
            f"(by {hard['quantity']}); {summary['num_corrupted']} with corrupted labels."
        )
    print(f"wrote {_OUT_DIR.value or _WORKDIR.value + '/analysis'}")


if __name__ == "__main__":
    cli.run(main)
