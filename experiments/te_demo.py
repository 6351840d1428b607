"""Small-scale demonstration of robust overfitting and of TE, on a 2-core CPU.

PGD-AT and PGD-AT+TE on a Fashion-MNIST subset with the small CNN (twice the
default width, so it can memorize adversarial examples), the paper's
recipe scaled down in epochs: learning rate x0.1 at 50% and 75% of training
(the paper: 100 and 150 of 200), TE's ramp from 45% to 75% (the paper: 90 to
150 of 200), TE momentum 0.9 and weight 300 as in the paper. Defaults (the
run in docs/te_demo.md): 500 training images with 20% symmetric label noise,
L-inf eps 0.05 (10 steps of eps/4), no weight decay, 100 epochs, evaluation
every 2 epochs on 1000 test images. The small, partly mislabeled training set
makes late-training memorization, and so robust overfitting, show within
minutes; on clean labels this small model did not overfit (docs/te_demo.md).

  python experiments/te_demo.py --out-dir workdirs/te_demo

Writes the two workdirs, then ``<out-dir>/te_demo.{md,csv,png}`` via
experiments/te_table.py.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import te_table  # noqa: E402
from jax_memat.experiment import default_config, train_and_evaluate  # noqa: E402


def demo_config(
    *,
    te: bool,
    epochs: int,
    num_train: int,
    num_test: int,
    seed: int,
    label_noise: float = 0.0,
    cnn_width: int = 2,
    eval_every: int = 2,
    eps: float = 0.1,
    weight_decay: float = 5e-4,
):
    c = default_config()
    c.seed = seed
    c.epochs = epochs
    c.batch_size = 128
    c.dataset.name = "fashion_mnist"
    c.dataset.num_train_examples = num_train
    c.dataset.num_test_examples = num_test
    c.dataset.label_noise = label_noise
    c.dataset.augment = False
    c.model.name = "small_cnn"
    c.model.cnn_width = cnn_width
    c.attack.eps = eps
    c.attack.step_size = eps / 4
    c.attack.steps = 10
    c.optimizer.learning_rate = 0.1
    c.optimizer.weight_decay = weight_decay
    c.schedule.name = "multistep"
    c.schedule.milestones = (epochs // 2, (3 * epochs) // 4)
    c.te.enabled = te
    c.te.ramp_start = max(1, (9 * epochs) // 20)
    c.te.ramp_end = (3 * epochs) // 4
    c.eval.batch_size = 500
    c.eval.every_epochs = eval_every
    c.eval.num_train_examples = min(500, num_train)
    c.log_every_steps = 10
    return c


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="workdirs/te_demo")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--num-train", type=int, default=500)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label-noise", type=float, default=0.2)
    parser.add_argument("--cnn-width", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--eps", type=float, default=0.05, help="L-inf radius (steps of eps/4)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    args = parser.parse_args(argv)
    workdirs = []
    for te in (False, True):
        workdir = os.path.join(args.out_dir, "pgd_at_te" if te else "pgd_at")
        config = demo_config(
            te=te,
            epochs=args.epochs,
            num_train=args.num_train,
            num_test=args.num_test,
            seed=args.seed,
            label_noise=args.label_noise,
            cnn_width=args.cnn_width,
            eval_every=args.eval_every,
            eps=args.eps,
            weight_decay=args.weight_decay,
        )
        print(f"== {workdir}", flush=True)
        train_and_evaluate(config, workdir)
        workdirs.append(workdir)
    te_table.main([*workdirs, "--out", os.path.join(args.out_dir, "te_demo")])


if __name__ == "__main__":
    main()
