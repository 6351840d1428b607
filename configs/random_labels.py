"""The random-label study (claims C1-C3): adversarial training under label noise.

The authors' settings (Dong et al., "Exploring Memorization in Adversarial
Training", ICLR 2022, Sec. 3, and their released code): WRN-28-10, 300 epochs,
batch 128, SGD lr 0.1 momentum 0.9, lr x0.1 every 100 epochs, no augmentation,
weight decay 0 for random labels (rate 1) and 2e-4 otherwise, L-inf 8/255 with
10 steps of 2/255, TRADES beta 6. As in their PyTorch code, BatchNorm running
variances are updated with the unbiased batch variance
(``model.bn_unbiased_var``) and the TRADES attack starts at
``x + 0.001 * N(0, 1)`` without clipping to [0, 1] (``attack.clip_start``; the
PGD-AT attack clips its start).

Argument: ``"DATASET,MODEL,OBJECTIVE,RATE[,CORRUPTION]"``, e.g.
``configs/random_labels.py:cifar10,wrn28_10,pgd_at,1.0`` or
``configs/random_labels.py:cifar10,wrn28_10,trades,0.4`` or
``configs/random_labels.py:cifar10,wrn28_10,pgd_at,0.0,random_pixels``.
MODEL is a registry name or ``wrnD_W`` for a WideResNet of depth D, width W
(capacity study: e.g. ``wrn28_1``, ``wrn28_4``). Defaults: ``cifar10,wrn28_10,pgd_at,1.0``.
"""

from jax_memat.experiment import default_config
from jax_memat.experiment.config import set_model


def get_config(arg: str | None = None):
    parts = (arg or "cifar10,wrn28_10,pgd_at,1.0").split(",")
    if len(parts) not in (4, 5):
        raise ValueError(
            f"random_labels.py takes 'DATASET,MODEL,OBJECTIVE,RATE[,CORRUPTION]'; got {arg!r}."
        )
    dataset, model, objective, rate = parts[:4]
    c = default_config()
    c.dataset.name = dataset
    set_model(c, model)
    c.objective.name = objective
    # As the authors' PyTorch code (see the module docstring).
    c.model.bn_unbiased_var = True
    c.attack.clip_start = objective != "trades"
    try:
        c.dataset.label_noise = float(rate)
    except ValueError:
        raise ValueError(
            f"random_labels.py: RATE must be a number in [0, 1] (e.g. 0.4); got {rate!r}."
        ) from None
    if len(parts) == 5:
        c.dataset.image_corruption = parts[4]
    c.epochs = 300
    c.dataset.augment = False
    c.optimizer.weight_decay = 0.0 if c.dataset.label_noise == 1.0 else 2e-4
    c.schedule.name = "step"
    c.schedule.step_every = 100
    return c
