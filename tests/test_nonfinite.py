"""NaN and ±Inf values: counted by bit pattern (tier 1), and reported by a merge (tier 3)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from superswallow_jax import finite
from superswallow_jax.cli import app
from superswallow_jax.config import parse_config
from superswallow_jax.merge import run_merge
from superswallow_jax.options import MergeOptions
from superswallow_jax.tiny import make_tiny_models

FLOATS = [ml_dtypes.bfloat16, np.float16, np.float32, np.float64]


@settings(max_examples=60, deadline=None)
@given(dt=st.sampled_from(FLOATS), bits=st.lists(st.integers(0, 2**64 - 1), max_size=300))
def test_count_matches_isfinite_on_every_bit_pattern(dt, bits):
    """Any bit pattern (NaNs with any payload, ±Inf, subnormals, -0): the count is numpy's."""
    size = np.dtype(dt).itemsize
    raw = np.array([b & ((1 << 8 * size) - 1) for b in bits], dtype=f"<u{size}")
    x = raw.view(dt)
    want = int(np.count_nonzero(~np.isfinite(x.astype(np.float64))))
    assert finite.count_nonfinite(x) == want


def test_count_special_values_shapes_and_other_dtypes(monkeypatch):
    x = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 1e38, 3.0], np.float32)
    for dt in FLOATS:
        with np.errstate(over="ignore"):
            y = x.astype(dt)
        assert finite.count_nonfinite(y) == (4 if dt is np.float16 else 3)  # 1e38 overflows float16
    assert finite.count_nonfinite(np.full((3, 5), np.nan, ml_dtypes.bfloat16)) == 15
    assert finite.count_nonfinite(np.zeros(0, np.float32)) == 0
    assert finite.count_nonfinite(np.arange(10, dtype=np.int32)) == 0
    monkeypatch.setattr(finite, "BLOCK", 3)  # the blocked loop sees every element once
    y = np.zeros(11, np.float32)
    y[[0, 2, 3, 10]] = np.nan
    assert finite.count_nonfinite(y) == 4


def test_tally_counts_a_chunk_read_twice_once_and_combines_processes():
    t = finite.NonFiniteTally()
    t.input("m", "w", "w", 0, 2)
    t.input("m", "w", "w", 0, 2)  # the same chunk again (a later pass)
    t.input("m", "w", "w", 8, 1)
    t.input("m", "w", "lm_head", 0, 1)  # the same input read for another output: the larger count
    t.input("m", "ok", "ok", 0, 0)
    t.output("w", 1)
    t.output("w", 2)
    t.output("ok", 0)
    rec = t.record()
    assert rec == {"inputs": {"m": {"w": 3}}, "outputs": {"w": 3}}
    both = finite.combine([rec, {"inputs": {"m": {"w": 1}, "n": {"v": 4}}, "outputs": {"v": 4}}])
    assert both == {"inputs": {"m": {"w": 3}, "n": {"v": 4}}, "outputs": {"v": 4, "w": 3}}
    lines = finite.warnings(both, limit=1)
    assert lines[0] == "warning: model m: 3 NaN/Inf values in 1 tensor: w (3)"
    assert lines[2] == "warning: the output has 7 NaN/Inf values in 2 tensors: v (4) and 1 more"
    assert finite.warnings({"inputs": {}, "outputs": {}}) == []


# -- end to end ----------------------------------------------------------------------------------

NAME = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """Tiny llama and tulu (sharded); tulu's up_proj holds 3 NaN and 2 Inf."""
    d = tmp_path_factory.mktemp("nf")
    made = make_tiny_models(d / "models", models=["llama", "tulu"])
    index = json.loads((made["tulu"] / "model.safetensors.index.json").read_text())
    f = made["tulu"] / index["weight_map"][NAME]
    tensors = load_file(f)
    w = tensors[NAME].copy()
    flat = w.reshape(-1)
    flat[[0, 5, flat.size - 1]] = np.nan
    flat[[7, 9]] = np.inf
    tensors[NAME] = w
    save_file(tensors, f)
    return made


def _cfg(made, method: str) -> str:
    extra = "\n    parameters: {weight: 0.5, density: 0.5}" if method != "linear" else "\n    parameters: {weight: 0.5}"
    return (f"models:\n  - model: {made['llama']}{extra}\n  - model: {made['tulu']}{extra}\n"
            f"merge_method: {method}\nbase_model: {made['llama']}\ndtype: bfloat16\n")


def _output_nonfinite(out: Path) -> dict:
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        for n, x in load_file(f).items():
            c = finite.count_nonfinite(x)
            if c:
                got[n] = c
    return got


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_merge_reports_input_and_output_nonfinite_values(poisoned, tmp_path, method):
    said = []
    counts = []
    for chunk in (None, 64):  # chunking (and a second read in the TIES passes) does not change the counts
        out = tmp_path / f"{method}-{chunk}"
        run_merge(parse_config(_cfg(poisoned, method)), out, MergeOptions(seed=0, fsync=False, chunk_elems=chunk),
                  say=said.append)
        man = json.loads((out / "merge_manifest.json").read_text())["nonfinite"]
        assert man["inputs"] == {str(poisoned["tulu"]): {NAME: 5}}
        assert man["outputs"] == _output_nonfinite(out)  # what the files hold
        counts.append(man)
    assert counts[0] == counts[1]
    if method == "linear":
        assert counts[0]["outputs"] == {NAME: 5}
    assert any(line.startswith(f"warning: model {poisoned['tulu']}: 5 NaN/Inf values in 1 tensor") for line in said)


def test_clean_inputs_record_nothing_and_say_nothing(poisoned, tmp_path):
    said = []
    cfg = parse_config(_cfg(poisoned, "linear").replace(str(poisoned["tulu"]), str(poisoned["llama"])))
    run_merge(cfg, tmp_path / "o", MergeOptions(seed=0, fsync=False), say=said.append)
    man = json.loads((tmp_path / "o" / "merge_manifest.json").read_text())
    assert man["nonfinite"] == {"inputs": {}, "outputs": {}}
    assert not [line for line in said if "NaN" in line]


def test_cli_prints_the_warning_and_exits_0(poisoned, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_cfg(poisoned, "linear"))
    res = CliRunner().invoke(app, ["merge", str(cfg), str(tmp_path / "o"), "--no-fsync"])
    assert res.exit_code == 0, res.output
    assert f"warning: the output has 5 NaN/Inf values in 1 tensor: {NAME} (5)" in res.output


def test_a_resumed_merge_keeps_the_counts_of_the_tensors_it_kept(poisoned, tmp_path):
    """Killed after most tensors (the poisoned one among them), the rerun's manifest is the full run's."""
    import os
    import subprocess
    import sys

    from superswallow_jax.plan import build_plan

    cfg = tmp_path / "c.yaml"
    cfg.write_text(_cfg(poisoned, "linear"))
    with build_plan(parse_config(cfg.read_text())) as plan:
        total = len(plan.steps)

    def cli(out, crash=None):
        env = {k: v for k, v in os.environ.items() if k != "SUPERSWALLOW_CRASH_AT"}
        env.update({"SUPERSWALLOW_CRASH_AT": crash} if crash else {})
        code = "import sys; from superswallow_jax.cli import main; sys.argv = ['superswallow', *sys.argv[1:]]; main()"
        return subprocess.run([sys.executable, "-c", code, "merge", str(cfg), str(out), "-q", "--no-fsync"],
                              capture_output=True, text=True, env=env, timeout=300)

    assert cli(tmp_path / "ref").returncode == 0
    assert cli(tmp_path / "out", f"tensor-{total - 2}").returncode == -9
    r = cli(tmp_path / "out")
    assert r.returncode == 0 and f"resume: {total - 2} finished tensors kept" in r.stderr, r.stderr
    want = json.loads((tmp_path / "ref" / "merge_manifest.json").read_text())["nonfinite"]
    assert json.loads((tmp_path / "out" / "merge_manifest.json").read_text())["nonfinite"] == want
    assert want["outputs"] == {NAME: 5}
    assert "5 NaN/Inf values" in r.stderr
