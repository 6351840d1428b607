"""The persistent compilation cache the entry points turn on (experiment.compile_cache)."""

import os
import subprocess
import sys
import textwrap

from jax_memat.experiment import compile_cache as cc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_dir_under_xdg_cache_home_or_home_cache(tmp_path):
    xdg = str(tmp_path / "xdg")
    assert cc.default_cache_dir({"XDG_CACHE_HOME": xdg}) == os.path.join(
        xdg, "jax_memat", "jax_compilation_cache", cc.cpu_kind()
    )
    home = os.path.expanduser("~")
    assert cc.default_cache_dir({}) == os.path.join(
        os.path.abspath(home), ".cache", "jax_memat", "jax_compilation_cache", cc.cpu_kind()
    )
    # Never inside the repository (the default, whatever the working directory).
    assert not cc.default_cache_dir({}).startswith(ROOT + os.sep)


def test_cpu_kind_separates_instruction_sets(tmp_path):
    # Same extensions in another order: one kind; one extension more (avx512f): another.
    files = {}
    for name, flags in (
        ("a", "fpu sse2 avx2"),
        ("b", "avx2 fpu sse2"),
        ("c", "fpu sse2 avx2 avx512f"),
    ):
        path = tmp_path / name
        path.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        files[name] = cc.cpu_kind(str(path))
    assert files["a"] == files["b"] != files["c"]


def test_resolution_order(tmp_path):
    flag, env, jax_env, xdg = (str(tmp_path / n) for n in ("flag", "env", "jaxenv", "xdg"))
    full = {cc.ENV_VAR: env, cc.JAX_ENV_VAR: jax_env, "XDG_CACHE_HOME": xdg}
    assert cc.resolve_cache_dir(flag, full) == flag
    assert cc.resolve_cache_dir(None, full) == env
    assert cc.resolve_cache_dir("", full) == env
    assert cc.resolve_cache_dir(None, {cc.JAX_ENV_VAR: jax_env, "XDG_CACHE_HOME": xdg}) == jax_env
    assert cc.resolve_cache_dir(None, {"XDG_CACHE_HOME": xdg}) == cc.default_cache_dir(
        {"XDG_CACHE_HOME": xdg}
    )
    for off in ("off", "OFF", "none", "false", "0", "no"):
        assert cc.resolve_cache_dir(off, full) is None
        assert cc.resolve_cache_dir(None, {**full, cc.ENV_VAR: off}) is None
    # A relative folder is made absolute (the run may change directory later).
    assert os.path.isabs(cc.resolve_cache_dir("rel/cache", {}))


def _run(script: str, *args: str, env_extra: dict, tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
    env.pop(cc.JAX_ENV_VAR, None)
    env.pop(cc.ENV_VAR, None)
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="", **env_extra)
    path = tmp_path / "entry.py"
    path.write_text(textwrap.dedent(script))
    return subprocess.run(
        [sys.executable, str(path), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=str(tmp_path),
    )


# An entry point like jax_memat.main: cli.run around a main that compiles one tiny
# function and reports where the cache is and how many persistent-cache hits it had.
_ENTRY = """
import jax
import jax.numpy as jnp
from jax_memat.experiment import cli

def main(argv):
    hits = []
    jax.monitoring.register_event_listener(
        lambda name, **kw: hits.append(name) if name.endswith("/cache_hits") else None
    )
    # The cache keeps only programs above a compile time; this one is tiny.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.jit(lambda x: jnp.tanh(x) * 3.0 + 1.0)(jnp.arange(7.0)).block_until_ready()
    print("DIR", jax.config.jax_compilation_cache_dir)
    print("ENABLED", jax.config.jax_enable_compilation_cache)
    print("HITS", len(hits))

cli.run(main)
"""


def _field(out: str, name: str) -> str:
    for line in out.splitlines():
        if line.startswith(name + " "):
            return line.split(" ", 1)[1]
    raise AssertionError(f"no {name} line in {out!r}")


def _entries(folder) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return [n for n in os.listdir(folder) if not n.startswith(".")]


def test_cli_default_cache_hit_in_second_process(tmp_path):
    xdg = tmp_path / "xdg"
    expected = cc.default_cache_dir({"XDG_CACHE_HOME": str(xdg)})
    first = _run(_ENTRY, env_extra={"XDG_CACHE_HOME": str(xdg)}, tmp_path=tmp_path)
    assert first.returncode == 0, first.stderr
    assert _field(first.stdout, "DIR") == expected
    assert _field(first.stdout, "HITS") == "0"
    written = _entries(expected)
    assert written, "the first run wrote nothing to the cache"

    second = _run(_ENTRY, env_extra={"XDG_CACHE_HOME": str(xdg)}, tmp_path=tmp_path)
    assert second.returncode == 0, second.stderr
    assert int(_field(second.stdout, "HITS")) >= 1
    assert sorted(_entries(expected)) == sorted(written)  # loaded, nothing new compiled


def test_cli_flag_off_and_folder(tmp_path):
    xdg = tmp_path / "xdg"
    off = _run(
        _ENTRY, "--compilation_cache=off", env_extra={"XDG_CACHE_HOME": str(xdg)}, tmp_path=tmp_path
    )
    assert off.returncode == 0, off.stderr
    assert _field(off.stdout, "ENABLED") == "False"
    assert not xdg.exists()

    folder = tmp_path / "mine"
    env = {"XDG_CACHE_HOME": str(xdg), cc.ENV_VAR: "off"}  # the flag wins over the variable
    mine = _run(_ENTRY, f"--compilation_cache={folder}", env_extra=env, tmp_path=tmp_path)
    assert mine.returncode == 0, mine.stderr
    assert _field(mine.stdout, "DIR") == str(folder)
    assert _entries(folder)


def test_unusable_folder_is_a_warning_not_a_crash(tmp_path):
    # A folder below a plain file cannot be created, for root as well.
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = _run(_ENTRY, env_extra={cc.ENV_VAR: str(blocker / "cache")}, tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "compilation cache folder" in out.stderr and "not usable" in out.stderr
    assert _field(out.stdout, "ENABLED") == "False"
    assert blocker.read_text() == "not a folder"
