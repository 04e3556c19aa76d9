"""Test set-up: 4 fake CPU devices, quiet TensorFlow, and small shared fixtures.

XLA_FLAGS must be set before jax is imported anywhere, so it lives here at the top.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
