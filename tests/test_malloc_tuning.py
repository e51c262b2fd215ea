"""malloc thresholds for the CLI: applied on glibc, skipped when switched off (in child processes)."""

import platform
import subprocess
import sys

import pytest

CODE = "from superswallow_jax.malloc_tuning import tune_malloc; print(tune_malloc(), tune_malloc())"


def run(env_value):
    env = {"PATH": "/usr/bin:/bin"}
    if env_value is not None:
        env["SUPERSWALLOW_MALLOC"] = env_value
    return subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, check=True).stdout.split()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_applied_on_glibc_and_idempotent():
    assert run(None) == ["True", "True"]


@pytest.mark.parametrize("value", ["off", "0", "OFF"])
def test_switched_off(value):
    assert run(value) == ["False", "False"]
