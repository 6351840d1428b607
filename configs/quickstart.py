"""Quickstart: PGD-AT on Fashion-MNIST with a small CNN, sized for a 2-core CPU.

Runs offline from the IDX files of Debian's ``dataset-fashion-mnist`` package
(or ``$JAX_MEMAT_DATA_DIR``). L-inf eps 0.1 with 10 steps of 0.025, the usual
Fashion-MNIST setting. The first 15,000 training images, 6 epochs (learning
rate x0.1 after epoch 5); evaluation (per epoch with PGD-10, at the end with
PGD-20 and CW-20) on the first 1,000 training and 2,000 test images.

Run: ``python -m jax_memat.main --config=configs/quickstart.py --workdir=workdirs/quickstart``.
"""

from jax_memat.experiment import default_config


def get_config(arg: str | None = None):
    del arg
    c = default_config()
    c.epochs = 6
    c.batch_size = 128
    c.dataset.name = "fashion_mnist"
    c.dataset.num_train_examples = 15_000
    c.dataset.augment = False
    c.model.name = "small_cnn"
    c.attack.eps = 0.1
    c.attack.step_size = 0.025
    c.attack.steps = 10
    c.optimizer.learning_rate = 0.05
    c.optimizer.weight_decay = 5e-4
    c.schedule.name = "multistep"
    c.schedule.milestones = (5,)
    c.eval.batch_size = 500
    c.eval.num_train_examples = 1_000
    c.eval.num_test_examples = 2_000
    c.log_every_steps = 20
    return c
