"""JAX's persistent compilation cache, as the command-line entry points use it.

XLA compiles every jitted function (train step, evaluation, attacks) afresh
in each new process, which on a CPU is a large share of a short run. JAX can
keep the compiled programs on disk and load them in the next process that
compiles the same program on the same backend and versions ("Persistent
compilation cache" in the JAX documentation). The entry points turn it on by
default, in a folder of the user's cache directory, never in the repository:

1. ``--compilation_cache=DIR`` or ``--compilation_cache=off`` on the command line;
2. else the environment variable ``JAX_MEMAT_COMPILATION_CACHE`` (a folder or ``off``);
3. else JAX's own ``JAX_COMPILATION_CACHE_DIR`` where set (left as it is);
4. else ``$XDG_CACHE_HOME/jax_memat/jax_compilation_cache/<cpu>`` (``~/.cache``
   when ``XDG_CACHE_HOME`` is unset), where ``<cpu>`` names this CPU's
   architecture and instruction-set extensions: JAX's cache key names a CPU
   backend only as "cpu", and XLA loads a program compiled for other
   extensions with a logged error (then possibly an illegal instruction), so
   a home folder shared by Intel and AMD nodes keeps one cache per kind.

A folder that cannot be created or written is a warning and the run goes on
without the cache. JAX treats the cache as trusted code: do not point it at a
folder others can write. It is not pruned; delete the folder to reclaim the
space (a new one is filled on the next run).

This sets process-wide JAX configuration, so it lives here, with the entry
points, not in the library below (which has no global state).
"""

from __future__ import annotations

import hashlib
import os
import platform
import tempfile
import warnings
from collections.abc import Mapping

ENV_VAR = "JAX_MEMAT_COMPILATION_CACHE"
JAX_ENV_VAR = "JAX_COMPILATION_CACHE_DIR"
MIN_TIME_ENV_VAR = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
OFF_VALUES = ("off", "none", "false", "0", "no")
# Programs that compile faster than this are not written: loading an entry
# costs a file read and a deserialisation, which beats recompiling anything
# above a few tenths of a second on a CPU. JAX's own default is 1 s, which
# skips most of the evaluation and attack functions of a small-model run.
MIN_COMPILE_TIME_S = 0.2


def cpu_kind(cpuinfo: str = "/proc/cpuinfo") -> str:
    """``<machine>-<12 hex digits>``: the architecture and a hash of the CPU's feature flags.

    Two CPUs with the same instruction-set extensions get the same name
    (compiled programs are interchangeable between them); where the flags
    cannot be read (not Linux) the hash is of the processor's description.

    Example:
      >>> cpu_kind()  # doctest: +SKIP
      'x86_64-3f9c2a0b71de'
    """
    flags = platform.processor()
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    digest = hashlib.sha1(flags.encode()).hexdigest()[:12]
    return f"{platform.machine() or 'cpu'}-{digest}"


def default_cache_dir(environ: Mapping[str, str] | None = None) -> str:
    """The default cache folder: under ``XDG_CACHE_HOME`` (or ``~/.cache``), one per CPU kind.

    Args:
      environ: the environment to read (default ``os.environ``).

    Returns:
      An absolute path (not created here).

    Example:
      >>> default_cache_dir({"XDG_CACHE_HOME": "/var/cache/me"})  # doctest: +ELLIPSIS
      '/var/cache/me/jax_memat/jax_compilation_cache/x86_64-...'
    """
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "jax_memat", "jax_compilation_cache", cpu_kind())


def resolve_cache_dir(value: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """Where the cache goes, from a flag's value and the environment (precedence in the module doc).

    Args:
      value: the ``--compilation_cache`` flag: a folder, ``off`` (or ``none``,
        ``false``, ``0``, ``no``), or None/empty when not given.
      environ: the environment to read (default ``os.environ``).

    Returns:
      An absolute folder, or None for no cache.

    Example:
      >>> resolve_cache_dir("off") is None
      True
      >>> resolve_cache_dir(None, {"JAX_MEMAT_COMPILATION_CACHE": "/scratch/c"})
      '/scratch/c'
    """
    environ = os.environ if environ is None else environ
    for candidate in (value, environ.get(ENV_VAR)):
        if candidate is not None and candidate.strip():
            candidate = candidate.strip()
            if candidate.lower() in OFF_VALUES:
                return None
            return os.path.abspath(os.path.expanduser(candidate))
    if environ.get(JAX_ENV_VAR, "").strip():
        return os.path.abspath(os.path.expanduser(environ[JAX_ENV_VAR].strip()))
    return default_cache_dir(environ)


def _writable_problem(path: str) -> str | None:
    """Why ``path`` cannot hold the cache, or None: creates it, writes and removes a probe."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        return err.strerror or str(err)
    return None


def enable_compilation_cache(
    path: str | None, *, min_compile_time_s: float = MIN_COMPILE_TIME_S
) -> str | None:
    """Points JAX's persistent compilation cache at ``path``; call before anything compiles.

    Args:
      path: the folder (created if missing), or None to turn the cache off.
      min_compile_time_s: programs compiling faster than this are not written
        (JAX's ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``, where set, wins).

    Returns:
      The folder in use, or None (turned off, or the folder not writable: then
      a ``RuntimeWarning`` says why and the run goes on without the cache).

    Example:
      >>> enable_compilation_cache(resolve_cache_dir(None))  # doctest: +SKIP
      '/home/me/.cache/jax_memat/jax_compilation_cache'
    """
    import jax

    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    problem = _writable_problem(path)
    if problem is not None:
        warnings.warn(
            f"compilation cache folder {path} is not usable ({problem}); running without the "
            f"cache. Give a writable folder with --compilation_cache=DIR or {ENV_VAR}=DIR, "
            "or turn it off with --compilation_cache=off.",
            RuntimeWarning,
            stacklevel=2,
        )
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    if MIN_TIME_ENV_VAR not in os.environ:  # JAX's own variable, where set, wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    # jax_persistent_cache_min_entry_size_bytes stays at JAX's default (0: no size floor,
    # which a remote file system's backend may raise).
    return path
