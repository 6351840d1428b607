"""Command-line entry point for training.

  python -m jax_memat.main --config=configs/quickstart.py --workdir=workdirs/quickstart
  python -m jax_memat.main --config=configs/te.py:cifar10,preact18,pgd_at \
      --workdir=workdirs/te_c10 --config.epochs=5

Any config field can be overridden as ``--config.FIELD=VALUE``. Running again
with the same workdir resumes from its latest checkpoint; a finished run is
left as it is. SIGINT (Ctrl-C) or SIGTERM stops the run keeping the last
finished epoch. Exit codes: 0 done, 2 bad config or flags, 3 workdir problem,
4 dataset not found, 5 too little memory or disk, 6 NaN/Inf loss, 130/143
stopped by SIGINT/SIGTERM, 1 unexpected error; ``--debug`` shows tracebacks.

Several processes (hosts of a TPU slice, nodes of a GPU cluster, or processes
on one machine): the same command in every process, with
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``, or
without them where JAX detects the cluster (SLURM ``srun``, Open MPI
``mpirun``, Cloud TPU); process 0 writes the files. See docs/scaling.md.
"""

from absl import flags
from ml_collections import config_flags

from jax_memat.experiment import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:argument]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (resumes if it holds this run).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {argv[1:]} (flags are written --name=value).", 2)
    import jax

    from jax_memat.distributed import is_main_process
    from jax_memat.experiment import train_and_evaluate

    if jax.process_count() == 1:
        print(f"Devices: {jax.devices()}", flush=True)
    else:
        print(
            f"Process {jax.process_index()} of {jax.process_count()}: local devices "
            f"{jax.local_devices()}; {jax.device_count()} devices in all.",
            flush=True,
        )
    report = train_and_evaluate(_CONFIG.value, _WORKDIR.value, handle_signals=True)
    if not is_main_process():
        return
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
    cli.run(main)
