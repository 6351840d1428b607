"""The complexity report of a run family (claim C3): measures, gap, taus, table and figure.

Dong et al., *Exploring Memorization in Adversarial Training* (ICLR 2022),
Sec. 4: complexity measures do not track the robust generalization gap once
runs trained on noisy labels are in the family. This script is a thin
wrapper of ``analyze("complexity", ...)`` (``jax_memat.experiment.analyses``):
for every workdir it measures the final checkpoint against the init
checkpoint, measures the gap, flags runs that did not fit their training
labels, and writes ``complexity.json``, ``.csv``, ``.md`` and ``.png`` in
``--out``. See docs/complexity.md.

    python experiments/random_labels_sweep.py --sweep rate --objectives pgd_at,trades \\
        --seeds 0,1 --out-dir workdirs/noise_family
    python experiments/complexity_report.py workdirs/noise_family/*_w2* \\
        --out workdirs/noise_family/complexity --measures dist_fro,log_spec_bound_init
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jax_memat.experiment.analyses import analyze  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="the runs of the family")
    parser.add_argument("--out", required=True, help="where the report goes")
    parser.add_argument("--measures", default=None, help="comma-separated measure names")
    parser.add_argument("--num-examples", type=int, default=None, help="rows per split")
    parser.add_argument("--min-train-accuracy", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        report = analyze(
            "complexity",
            args.workdirs,
            args.out,
            measures=args.measures,
            num_examples=args.num_examples,
            min_train_accuracy=args.min_train_accuracy,
            seed=args.seed,
            progress=print,
        )
    except ValueError as err:
        print(f"error: {err}")
        return 2
    except FileNotFoundError as err:
        print(f"error: {err}")
        return 3
    print(f"{len(report['ranked'])} of {len(report['runs'])} runs ranked.")
    for measure, c in report["correlation"].items():
        print(f"  {measure}: tau-b {c['tau_b']:.3f}, granulated tau {c['granulated_tau']:.3f}")
    print(f"wrote {args.out}/complexity.{{json,csv,md,png}} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
