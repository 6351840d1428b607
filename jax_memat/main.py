"""Command-line entry point for training.

  python -m jax_memat.main --config=configs/quickstart.py --workdir=workdirs/quickstart
  python -m jax_memat.main --config=configs/te.py:cifar10,preact18,pgd_at \
      --workdir=workdirs/te_c10 --config.epochs=5

Any config field can be overridden as ``--config.FIELD=VALUE``. Running again
with the same workdir resumes from its latest checkpoint.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:argument]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (resumes if it holds this run).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import jax

    from jax_memat.training import train_and_evaluate
    from jax_memat.training.config import ConfigError, WorkdirConflictError

    if not flags.FLAGS["verbosity"].present:
        # Orbax and absl are chatty at INFO; progress goes to the bar instead.
        logging.set_verbosity(logging.WARNING)
    print(f"Devices: {jax.devices()}", flush=True)
    try:
        report = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, WorkdirConflictError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    for name in ("best", "final"):
        r = report[name]
        line = f"{name:5s} (epoch {r['epoch']}): "
        line += f"test natural {100 * r['test_natural_accuracy']:.2f}%"
        if "test_pgd_accuracy" in r:
            line += f" | test PGD-{report['pgd_steps']} {100 * r['test_pgd_accuracy']:.2f}%"
        if "test_cw_accuracy" in r:
            line += f" | test CW {100 * r['test_cw_accuracy']:.2f}%"
        print(line)
    print(f"Outputs in {_WORKDIR.value}")


if __name__ == "__main__":
    app.run(main)
