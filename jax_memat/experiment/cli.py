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
import errno
import os
import sys
import traceback
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

_DEBUG = flags.DEFINE_bool("debug", False, "On an expected failure, also print the traceback.")
_HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--help=true", "--helpfull=true")

EXIT_BAD_INPUT = 2
EXIT_WORKDIR = 3
EXIT_DATA = 4
EXIT_RESOURCES = 5
EXIT_INTERRUPTED_SIGINT = 130

_FULL_DISK = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_WORKDIR = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST}


def exit_code(err: BaseException) -> int | None:
    """The documented exit code of an expected failure; None for a bug."""
    from jax_memat.data import DatasetNotFoundError
    from jax_memat.experiment.errors import RunError

    if isinstance(err, RunError):
        return err.exit_code
    if isinstance(err, DatasetNotFoundError):
        return EXIT_DATA
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED_SIGINT
    if isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err)[:200]:
        return EXIT_RESOURCES
    if isinstance(err, OSError):
        if err.errno in _FULL_DISK:
            return EXIT_RESOURCES
        if err.errno in _WORKDIR or isinstance(err, FileNotFoundError):
            return EXIT_WORKDIR
        return None
    if isinstance(err, ValueError):
        return EXIT_BAD_INPUT  # the library's argument checks
    return None


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
        app.usage(shorthelp="--helpfull" not in argv, writeto_stdout=True, exitcode=0)
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


def run(main: Callable[[list[str]], None]) -> None:
    """``app.run(main)`` with messages instead of tracebacks for expected failures."""

    def wrapped(argv: list[str]) -> None:
        if not flags.FLAGS["verbosity"].present:
            # Orbax and absl are chatty at INFO; progress goes to the bars instead.
            logging.set_verbosity(logging.WARNING)
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
