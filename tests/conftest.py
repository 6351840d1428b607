"""Shared pytest set-up.

Eight CPU devices are simulated for the whole suite so that data-parallel code
is tested against single-device code in one process (the flag must be set
before JAX initialises its backends, hence here and not in a fixture).
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow (used only by tfds) must never grab an accelerator or spam logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# The loop tests build the same tiny programs many times (a run, its resumption,
# the CLI in a subprocess): a persistent compilation cache shared by the session
# and its subprocesses compiles each once. Compile-count tests count lowerings,
# which happen with or without the cache.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jax_memat_test_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
