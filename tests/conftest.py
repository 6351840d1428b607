"""Shared pytest set-up.

Eight CPU devices are simulated for the whole suite so that data-parallel code
is tested against single-device code in one process (the flag must be set
before JAX initialises its backends, hence here and not in a fixture).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow (used only by tfds) must never grab an accelerator or spam logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
