"""Quickstart: PGD-AT on Fashion-MNIST with a small CNN, sized for a 2-core CPU.

Runs offline from the IDX files of Debian's ``dataset-fashion-mnist`` package
(or ``$JAX_MEMAT_DATA_DIR``). L-inf eps 0.1 with 10 steps of 0.025, the usual
Fashion-MNIST setting. 20,000 training examples, 8 epochs, per-epoch
evaluation on 2,000 training and 2,000 test examples; the final report on the
full 10,000-example test set.

Run: ``python -m jax_memat.main --config=configs/quickstart.py --workdir=workdirs/quickstart``.
"""

from jax_memat.training import default_config


def get_config(arg: str | None = None):
    del arg
    c = default_config()
    c.epochs = 8
    c.batch_size = 128
    c.dataset.name = "fashion_mnist"
    c.dataset.num_train_examples = 20_000
    c.dataset.augment = False
    c.model.name = "small_cnn"
    c.attack.eps = 0.1
    c.attack.step_size = 0.025
    c.attack.steps = 10
    c.optimizer.learning_rate = 0.05
    c.optimizer.weight_decay = 5e-4
    c.schedule.name = "multistep"
    c.schedule.milestones = (6,)
    c.eval.batch_size = 500
    c.eval.num_train_examples = 2_000
    c.eval.num_test_examples = 2_000
    c.log_every_steps = 20
    return c
