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



def test_sets_thresholds_and_one_arena(monkeypatch):
    """The three mallopt settings, each checked (glibc's mallopt returns 1 on success)."""
    from types import SimpleNamespace

    from superswallow_jax import malloc_tuning as mt

    calls = []
    refuse = set()

    def mallopt(param, value):  # tune_malloc sets argtypes/restype on it, as on a ctypes function
        calls.append((param, value))
        return 0 if param in refuse else 1

    monkeypatch.delenv("SUPERSWALLOW_MALLOC", raising=False)
    monkeypatch.setattr(mt, "_glibc", lambda: SimpleNamespace(mallopt=mallopt))
    assert mt.tune_malloc() is True
    assert calls == [(mt.M_MMAP_THRESHOLD, 32 << 20), (mt.M_TRIM_THRESHOLD, 512 << 20), (mt.M_ARENA_MAX, 1)]
    refuse.add(mt.M_ARENA_MAX)
    assert mt.tune_malloc() is False  # a refused value is reported
