"""Base config: PGD-AT, CIFAR-10, PreActResNet-18, the TE study's training settings.

Every other config starts from this one (``jax_memat.training.default_config``).
Run: ``python -m jax_memat.main --config=configs/base.py --workdir=...``.
"""

from jax_memat.experiment import default_config


def get_config(arg: str | None = None):
    del arg
    return default_config()
