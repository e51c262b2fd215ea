"""The CLI's garbage-collector policy: off while a command imports, then on with the start-up heap frozen."""

import gc
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_imports_done_turns_the_collector_back_on_with_the_heap_frozen():
    code = (
        "import gc, superswallow_jax.cli as m; gc.disable(); import superswallow_jax.merge; m._imports_done(); "
        "print(gc.isenabled(), gc.get_freeze_count() > 100000)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.split() == ["True", "True"]


def test_imports_done_leaves_an_enabled_collector_alone():
    from superswallow_jax.cli import _imports_done

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    _imports_done()
    assert gc.isenabled() and gc.get_freeze_count() == frozen
