"""What the command-line entry points share: flag parsing and exit codes.

Every expected failure ends in one line (``error: ...``) that says what is
wrong, what is accepted and what was kept, and in the exit code documented in
``jax_memat.experiment.errors`` (2 bad input, 3 workdir, 4 data, 5 resources,
6 NaN loss, 128+N signal N); ``--debug`` adds the traceback. Only an
unexpected error (a bug) prints its traceback by default, with exit code 1.
``--help`` prints the usage and exits 0.
"""

from __future__ import annotations

import ast
import os
import sys
import traceback
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

_DEBUG = flags.DEFINE_bool("debug", False, "On an expected failure, also print the traceback.")
# JAX's multi-process runtime (jax_memat.distributed, docs/scaling.md): all three, or none
# to let JAX detect a cluster (SLURM srun, Open MPI mpirun, a Cloud TPU VM).
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "Several processes: host:port of process 0's coordination service, the same in every "
    "process (with --num_processes and --process_id). Leave the three out to run in one "
    "process, or to let JAX detect SLURM (srun), Open MPI (mpirun) or a Cloud TPU slice.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes",
    None,
    "Several processes: how many take part (1 alone: one process, no cluster detection).",
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Several processes: this process's id, 0 .. num_processes - 1."
)
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache",
    None,
    "Folder of JAX's persistent compilation cache, or 'off'. Default: the environment "
    "variable JAX_MEMAT_COMPILATION_CACHE, else JAX_COMPILATION_CACHE_DIR, else "
    "$XDG_CACHE_HOME/jax_memat/jax_compilation_cache (~/.cache without XDG_CACHE_HOME).",
)
_HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--help=true", "--helpfull=true")

from jax_memat.experiment import compile_cache  # noqa: E402
from jax_memat.experiment.errors import (  # noqa: E402
    EXIT_BAD_INPUT,
    EXIT_DATA,
    EXIT_INTERRUPTED_SIGINT,
    EXIT_RESOURCES,
    EXIT_WORKDIR,
    exit_code,
)

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_DATA",
    "EXIT_INTERRUPTED_SIGINT",
    "EXIT_RESOURCES",
    "EXIT_WORKDIR",
    "exit_code",
    "fail",
    "message",
    "run",
]


def message(err: BaseException) -> str:
    """One line (or a few) for the user."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C)."
    if isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err)[:200]:
        first = str(err).splitlines()[0][:300] if str(err) else ""
        return f"out of memory ({first}). Reduce the batch size, the model or the data size."
    if isinstance(err, OSError) and err.errno is not None and not str(err).startswith("No "):
        where = f" ({err.filename})" if err.filename else ""
        return (
            f"{err.strerror or err}{where}. Files of a run are replaced only by complete new "
            "versions: what was on disk before is intact."
        )
    return str(err)


def fail(text: str, code: int) -> None:
    print(f"error: {text}", file=sys.stderr, flush=True)
    sys.exit(code)


def _config_flag_message(err: Exception) -> str:
    # ml_collections reports an unknown field as AttributeError of a repr'd message,
    # e.g. "'\\'epoch\\'\\nDid you mean ...'"; unwrap it into plain words.
    text = str(err)
    for _ in range(2):
        if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
            try:
                text = str(ast.literal_eval(text))
            except (ValueError, SyntaxError):
                break
    text = " ".join(text.split())
    if isinstance(err, AttributeError | KeyError):
        name, _, hint = text.partition(" ")
        return (
            f"unknown config field {name.strip(chr(39))!r}{' (' + hint + ')' if hint else ''}. "
            "The fields and their defaults are in jax_memat/experiment/config.py (default_config)."
        )
    return f"bad --config: {text}"


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every parse error a message and exit code 2."""
    if any(a in _HELP for a in argv[1:]):
        full = any(a.startswith("--helpfull") for a in argv[1:])
        app.usage(shorthelp=not full, writeto_stdout=True, exitcode=None if not full else 0)
        # The flags every entry point shares (--debug, the multi-process ones).
        print(flags.FLAGS.module_help(__name__), flush=True)
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        text = str(err)
        if "Traceback (most recent call last)" in text:
            # A config file's get_config raised: absl embeds the whole traceback; keep the
            # error itself.
            lines = [line for line in text.splitlines() if line.strip() and line.strip() != "."]
            text = f"bad --config: {lines[-1].strip()}"
        fail(f"{text.rstrip('.')}. Run with --help for the accepted flags.", EXIT_BAD_INPUT)
    except Exception as err:  # config files and --config.X overrides raise plain errors
        fail(_config_flag_message(err), EXIT_BAD_INPUT)
    raise AssertionError("unreachable")


def start_processes(*, multiprocess: bool = True) -> None:
    """Starts JAX's multi-process runtime from the flags (or a detected cluster).

    Bad values end the program with exit code 2 and a message, before
    anything starts; so does a runtime that does not come up (a wrong
    address, a process missing past the timeout). With ``multiprocess=False``
    (an entry point that runs in one process only) any of the flags is refused.
    """
    from jax_memat import distributed

    values = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if not multiprocess:
        if any(v is not None for v in values):
            fail(
                "--coordinator_address, --num_processes and --process_id are not accepted here: "
                "this command runs in one process.",
                EXIT_BAD_INPUT,
            )
        return
    try:
        distributed.check_arguments(*values)
    except ValueError as err:
        fail(
            f"{err} (flags --coordinator_address, --num_processes, --process_id).",
            EXIT_BAD_INPUT,
        )
    try:
        distributed.initialize(*values)
    except Exception as err:  # JAX raises runtime errors of several types here
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        fail(
            f"the multi-process runtime did not start ({type(err).__name__}: {text[:300]}). "
            "Check that every process got the same --coordinator_address (reachable from all "
            "of them, a free port on process 0) and --num_processes, distinct --process_id "
            "values, and that all were launched; nothing was written.",
            EXIT_BAD_INPUT,
        )


def run(main: Callable[[list[str]], None], *, multiprocess: bool = True) -> None:
    """``app.run(main)`` with messages instead of tracebacks for expected failures.

    Args:
      main: the entry point's ``main(argv)``.
      multiprocess: whether the entry point runs over several processes (the
        ``--coordinator_address``, ``--num_processes`` and ``--process_id``
        flags, or a detected cluster); False refuses those flags.
    """

    def wrapped(argv: list[str]) -> None:
        if not flags.FLAGS["verbosity"].present:
            # Orbax and absl are chatty at INFO; progress goes to the bars instead.
            logging.set_verbosity(logging.WARNING)
        # Before anything compiles: a second run of the same command loads the compiled
        # train step, evaluation and attacks instead of compiling them again.
        compile_cache.enable_compilation_cache(
            compile_cache.resolve_cache_dir(_COMPILATION_CACHE.value)
        )
        start_processes(multiprocess=multiprocess)
        try:
            main(argv)
        except (Exception, KeyboardInterrupt) as err:
            code = exit_code(err)
            if code is None:
                raise  # a bug: keep the traceback
            if _DEBUG.value:
                traceback.print_exc()
            fail(message(err), code)

    app.run(wrapped, flags_parser=_parse_flags)
