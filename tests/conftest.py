"""Test set-up: fake 8 CPU devices before JAX initialises, keep XLA single-threaded-ish."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# keep the persistent caches (XLA compiles, input hashes) out of the user's home
import tempfile  # noqa: E402

os.environ.setdefault("SUPERSWALLOW_CACHE", tempfile.mkdtemp(prefix="superswallow-test-cache-"))
