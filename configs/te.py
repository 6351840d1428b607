"""The robust-overfitting / temporal-ensembling study (claims C4-C5), baselines.

The authors' settings (specs/paper.md): 200 epochs, batch 128, SGD lr 0.1
momentum 0.9, lr x0.1 at epochs 100 and 150, weight decay 5e-4, random crop
(pad 4) + horizontal flip (none for SVHN), L-inf 8/255 with 10 steps of 2/255,
TRADES beta 6. "Best" is the epoch with the highest PGD test accuracy.

Argument: ``"DATASET,MODEL,OBJECTIVE"`` with DATASET in cifar10, cifar100,
svhn; MODEL in preact18, wrn34_10 (or any registry name / ``wrnD_W``);
OBJECTIVE in pgd_at, trades. Example: ``configs/te.py:cifar10,preact18,pgd_at``.

SVHN: no augmentation and learning rate 0.01. At 0.1, PGD-AT on SVHN is known
to diverge or collapse early (Rice et al., 2020, use 0.01 for SVHN for this
reason); we follow them.
"""

from jax_memat.training import default_config
from jax_memat.training.config import set_model


def get_config(arg: str | None = None):
    parts = (arg or "cifar10,preact18,pgd_at").split(",")
    if len(parts) != 3:
        raise ValueError(f"te.py takes 'DATASET,MODEL,OBJECTIVE'; got {arg!r}.")
    dataset, model, objective = parts
    c = default_config()
    c.dataset.name = dataset
    set_model(c, model)
    c.objective.name = objective
    c.epochs = 200
    c.schedule.name = "multistep"
    c.schedule.milestones = (100, 150)
    c.optimizer.weight_decay = 5e-4
    if dataset == "svhn":
        c.dataset.augment = False
        c.optimizer.learning_rate = 0.01
    return c
