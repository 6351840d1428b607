"""The random-label study's runs: capacity (C1) and convergence (C2), swept.

Dong et al., *Exploring Memorization in Adversarial Training* (ICLR 2022),
Sec. 3: PGD-AT memorizes completely random labels (natural and robust
training accuracy near 100%, test accuracy at chance) given enough capacity,
while TRADES with beta = 6 does not converge, which the authors trace to
unstable gradients. This script trains the runs that test it and draws them
(``experiments/random_labels_figure.py``): one row per run, accuracies on
the random labels and on the test set beside the gradient statistics.

Sweeps (``--sweep``):

- ``demo``: PGD-AT, TRADES (beta = 6) and TRADES (beta = 1) on random labels;
- ``beta``: TRADES with each of ``--betas`` (default 0.5, 1, 3, 6);
- ``width``: PGD-AT with each model width of ``--widths`` (the capacity study);
- ``rate``: each of ``--objectives`` (default PGD-AT; ``pgd_at,trades`` for
  the noise-rate family of claim C3) with each label-noise rate of ``--rates``.

Every sweep runs once per seed of ``--seeds`` (default 0); a run of seed
``s > 0`` is named with ``_s{s}``.

Scales (``--scale``):

- ``cpu`` (default): Fashion-MNIST, the first 128 training images, the small
  CNN (``cnn_width`` 2 unless swept), batch 16, SGD with learning rate 0.01
  (x0.1 after epoch 200), 300 epochs, no weight decay or augmentation,
  L-inf eps 0.1 with 10 steps of 0.025, per-step gradient statistics. About
  8-15 minutes per run on a 2-core CPU. Smaller than the paper in every
  dimension so that a laptop can show the effect; docs/random_labels.md
  reports what it shows.
- ``paper``: ``configs/random_labels.py`` (CIFAR-10, WRN-28-10, 300 epochs,
  the authors' settings); ``--widths`` are WideResNet-28 widths. For GPUs.

Every run is a workdir under ``--out-dir`` named after its settings; a
finished run is not trained again, an interrupted one resumes.

    python experiments/random_labels_sweep.py --sweep demo --out-dir workdirs/random_labels
    python experiments/random_labels_sweep.py --sweep beta --betas 1,6 --out-dir workdirs/rl
    python experiments/random_labels_sweep.py --sweep rate --objectives pgd_at,trades \
        --seeds 0,1,2 --out-dir workdirs/noise_family  # then experiments/complexity_report.py

Writes ``<sweep>.png`` and ``<sweep>.json`` (the last epoch's accuracies per
run and whether it fitted its random labels) in ``--out-dir``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.random_labels import get_config as paper_config  # noqa: E402
from experiments.random_labels_figure import plot, summarize  # noqa: E402
from jax_memat.experiment import default_config, train_and_evaluate  # noqa: E402
from jax_memat.experiment.workdir import write_json  # noqa: E402

# A run "fits" its random labels when its robust training accuracy on them
# reaches this (claim C1 says ~100%; the demonstration asks for > 95%).
FIT_THRESHOLD = 0.95


def cpu_config(objective: str, *, beta: float = 6.0, width: int = 2, rate: float = 1.0):
    """The CPU-sized random-label run (see the module docstring)."""
    c = default_config()
    c.dataset.name = "fashion_mnist"
    c.dataset.num_train_examples = 128
    c.dataset.num_test_examples = 1000
    c.dataset.label_noise = rate
    c.dataset.augment = False
    c.model.name = "small_cnn"
    c.model.cnn_width = width
    c.model.bn_unbiased_var = True  # as configs/random_labels.py (the authors' code)
    c.objective.name = objective
    c.objective.beta = beta
    c.attack.clip_start = objective != "trades"
    c.attack.eps = 0.1
    c.attack.step_size = 0.025
    c.batch_size = 16
    # 0.1 (the paper's rate) makes this small network collapse to one class on
    # random labels at batch 16; 0.01 fits them.
    c.optimizer.learning_rate = 0.01
    c.optimizer.weight_decay = 0.0 if rate == 1.0 else 2e-4
    c.schedule.name = "step"
    c.schedule.step_every = 200
    c.epochs = 300
    c.eval.every_epochs = 10
    c.eval.batch_size = 250
    c.grad_stats.every_steps = 8  # once per epoch (8 steps)
    c.final_eval.cw = False
    c.progress_bar = False
    c.log_every_steps = 1000
    return c


def run_config(scale: str, objective: str, *, beta=6.0, width=None, rate=1.0):
    if scale == "cpu":
        return cpu_config(objective, beta=beta, width=width or 2, rate=rate)
    model = f"wrn28_{width}" if width else "wrn28_10"
    c = paper_config(f"cifar10,{model},{objective},{rate}")
    c.objective.beta = beta
    c.grad_stats.every_steps = 50
    return c


def plan(
    sweep: str, scale: str, betas, widths, rates, *, seeds=(0,), objectives=("pgd_at",)
) -> list[tuple[str, object]]:
    """``[(run name, config)]`` for a sweep, every run once per seed.

    ``objectives`` are those of ``--sweep rate`` (e.g. ``("pgd_at", "trades")``
    for the noise-rate family of claim C3; TRADES with beta 6). A seed ``s``
    other than 0 appends ``_s{s}`` to the name and sets ``config.seed``; seed
    0 runs keep the names and configs they always had.
    """
    if sweep == "demo":
        runs = [("pgd_at", {}), ("trades", {"beta": 6.0}), ("trades", {"beta": 1.0})]
    elif sweep == "beta":
        runs = [("trades", {"beta": b}) for b in betas]
    elif sweep == "width":
        runs = [("pgd_at", {"width": w}) for w in widths]
    else:
        runs = [(o, {"rate": r}) for o in objectives for r in rates]
    out = []
    for seed in seeds:
        for objective, kw in runs:
            config = run_config(scale, objective, **kw)
            width = config.model.cnn_width if scale == "cpu" else config.model.width
            name = f"{objective}_r{config.dataset.label_noise:g}_w{width}"
            if objective == "trades":
                name += f"_beta{config.objective.beta:g}"
            if seed != 0:
                name += f"_s{seed}"
                config.seed = seed
            out.append((name, config))
    return out


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", choices=("demo", "beta", "width", "rate"), default="demo")
    parser.add_argument("--scale", choices=("cpu", "paper"), default="cpu")
    parser.add_argument("--out-dir", required=True, help="where the run workdirs and figures go")
    parser.add_argument("--betas", default="0.5,1,3,6", help="TRADES betas of --sweep beta")
    parser.add_argument("--widths", default="1,2,4", help="model widths of --sweep width")
    parser.add_argument("--rates", default="0,0.2,0.4,0.6,0.8,1", help="noise rates, --sweep rate")
    parser.add_argument("--seeds", default="0", help="seeds, each run once per seed (e.g. 0,1,2)")
    parser.add_argument(
        "--objectives", default="pgd_at", help="objectives of --sweep rate (e.g. pgd_at,trades)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="override the epochs")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and stop")
    args = parser.parse_args(argv)
    try:
        betas, rates = _floats(args.betas), _floats(args.rates)
        widths = [int(w) for w in args.widths.split(",") if w]
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError as err:
        print(f"error: --betas, --rates, --widths and --seeds are comma-separated numbers: {err}")
        return 2
    objectives = [o for o in args.objectives.split(",") if o]
    if not objectives or any(o not in ("pgd_at", "trades") for o in objectives):
        print(f"error: --objectives takes pgd_at and/or trades; got {args.objectives!r}.")
        return 2
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        print(f"error: --seeds takes distinct integers >= 0; got {args.seeds!r}.")
        return 2
    runs = plan(args.sweep, args.scale, betas, widths, rates, seeds=seeds, objectives=objectives)
    if args.epochs is not None:
        for _, config in runs:
            config.epochs = args.epochs
    workdirs = [os.path.join(args.out_dir, name) for name, _ in runs]
    for (name, config), workdir in zip(runs, workdirs, strict=True):
        print(f"{name}: {workdir}")
        if not args.dry_run:
            train_and_evaluate(config, workdir)
    if args.dry_run:
        return 0
    summary = []
    for workdir in workdirs:
        s = summarize(workdir)
        s["fits_random_labels"] = bool(s["train_pgd_accuracy"] >= FIT_THRESHOLD)
        summary.append(s)
    out = os.path.join(args.out_dir, f"{args.sweep}.png")
    plot(workdirs, out)
    write_json(os.path.splitext(out)[0] + ".json", summary)
    for s in summary:
        print(
            f"{s['label']} (epoch {s['epoch']}): train nat {100 * s['train_natural_accuracy']:.1f}%"
            f" | train robust {100 * s['train_pgd_accuracy']:.1f}% | test nat "
            f"{100 * s['test_natural_accuracy']:.1f}% | test robust "
            f"{100 * s['test_pgd_accuracy']:.1f}% | fits: {s['fits_random_labels']}"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
