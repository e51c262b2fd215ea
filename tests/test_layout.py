"""The output layout is the plan's: file names, byte offsets and owners known before anything is read,
and exactly where the merge then writes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from superswallow_jax.cli import app
from superswallow_jax.config import parse_config
from superswallow_jax.devices import ProcessInfo
from superswallow_jax.io.checkpoint import Checkpoint
from superswallow_jax.layout import assign_shards_to_processes
from superswallow_jax.merge import plan_summary, run_merge
from superswallow_jax.options import MergeOptions
from superswallow_jax.output import Output
from superswallow_jax.plan import build_plan

from .test_e2e import models, recipe  # noqa: F401  (the session's tiny models)


@pytest.mark.parametrize("seed", [0, 123456789])
def test_merge_writes_every_tensor_where_the_plan_says(models, tmp_path, seed):  # noqa: F811
    cfg = parse_config(recipe(models))
    with build_plan(cfg, shard_size=150_000, seed=seed) as plan:
        places = plan.layout.places()
        files = {lay.filename: lay.size for lay in plan.layout.files}
    assert len(files) > 2 and len(places) == len(plan.steps)
    run_merge(cfg, tmp_path / "o", MergeOptions(seed=seed, fsync=False, shard_size=150_000))
    ck = Checkpoint(tmp_path / "o")
    got = {n: (t.path.name, t.begin, t.end) for n, t in ck.tensors.items()}
    assert got == {n: (p.file, p.begin, p.end) for n, p in places.items()}
    assert {f: (tmp_path / "o" / f).stat().st_size for f in files} == files


def test_layout_depends_on_the_seed_digits_and_output_refuses_another(models, tmp_path):  # noqa: F811
    cfg = parse_config(recipe(models))
    with build_plan(cfg, seed=0) as a, build_plan(cfg, seed=10**12) as b:
        assert b"1000000000000" in b.layout.files[0].header and a.layout.files[0].header != b.layout.files[0].header
        assert b.layout.place("lm_head.weight").begin >= a.layout.place("lm_head.weight").begin
        with pytest.raises(ValueError, match="not made for this seed"):
            Output(a, tmp_path / "x", MergeOptions(seed=1), ProcessInfo(0, 1), print)
        with pytest.raises(ValueError, match="process count"):
            Output(a, tmp_path / "x", MergeOptions(seed=0), ProcessInfo(0, 2), print)


def test_owners_split_the_files_among_processes(models):  # noqa: F811
    cfg = parse_config(recipe(models))
    with build_plan(cfg, shard_size=100_000, processes=3) as plan:
        lay = plan.layout
        mine = [lay.mine(p) for p in range(3)]
        assert sorted(x.filename for m in mine for x in m) == sorted(x.filename for x in lay.files)
        assert all(mine)  # more files than processes: every process writes some
        summary = plan_summary(plan)
    assert [f["owner"] for f in summary["files"]] == list(lay.owners)
    step = summary["steps"][0]
    p = lay.place(step["name"])
    assert step["output"] == {"file": p.file, "offsets": [p.begin, p.end], "owner": p.owner}


@given(st.lists(st.integers(0, 10**9), max_size=40), st.integers(1, 9))
def test_assign_shards_to_processes_is_balanced(sizes, count):
    owner = assign_shards_to_processes(sizes, count)
    assert len(owner) == len(sizes) and all(0 <= o < count for o in owner)
    load = [sum(s for s, o in zip(sizes, owner) if o == p) for p in range(count)]
    # greedy largest-first: no process carries more than the lightest plus the largest shard
    assert max(load) - min(load) <= (max(sizes) if sizes else 0)


def test_plan_cli_shows_files_and_offsets_for_the_seed(models, tmp_path):  # noqa: F811
    cfg = tmp_path / "c.yaml"
    cfg.write_text(recipe(models))
    r0 = CliRunner().invoke(app, ["plan", str(cfg), "--tensors", "--shard-size", "150K"])
    r9 = CliRunner().invoke(app, ["plan", str(cfg), "--tensors", "--shard-size", "150K", "--seed", "123456789"])
    assert r0.exit_code == 0 and r9.exit_code == 0, r0.output + r9.output
    for out, seed in ((r0.output, 0), (r9.output, 123456789)):
        with build_plan(parse_config(recipe(models)), shard_size=150_000, seed=seed) as plan:
            want = [f"    -> {p.file} bytes [{p.begin}, {p.end})" for p in plan.layout.places().values()]
        assert [line for line in out.splitlines() if line.startswith("    -> ")] == want
    js = json.loads(CliRunner().invoke(app, ["plan", str(cfg), "--json", "--seed", "5"]).output)
    assert js["files"][0]["name"] == "model.safetensors" and js["steps"][0]["output"]["file"] == "model.safetensors"
