"""Test set-up: fake 8 CPU devices before JAX initialises, keep XLA single-threaded-ish."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# keep the persistent caches (XLA compiles, input hashes) out of the user's home
import tempfile  # noqa: E402

os.environ.setdefault("SUPERSWALLOW_CACHE", tempfile.mkdtemp(prefix="superswallow-test-cache-"))

# ... and the Hugging Face Hub out of the tests: an empty cache and home, no token, and an
# endpoint nothing listens on (a test that downloads points HF_ENDPOINT at its own stand-in hub)
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="superswallow-test-hf-")
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
for _key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE",
             "TRANSFORMERS_OFFLINE", "SUPERSWALLOW_MODEL_CACHE"):
    os.environ.pop(_key, None)

import jax  # noqa: E402

# The kernels promote nothing implicitly: every mixed-dtype operation in the
# library is an explicit cast (strict promotion makes any other one an error).
jax.config.update("jax_numpy_dtype_promotion", "strict")
# The tests compare prng's own threefry stream with jax.random's, which follows it only under this flag.
jax.config.update("jax_threefry_partitionable", True)
