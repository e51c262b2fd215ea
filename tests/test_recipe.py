"""Multi-stage recipes (superswallow_jax.recipe): parsing, running, resuming, verifying.

The published fixtures' ``configs/multi-stage.yaml`` (two slerp stages
feeding a dare_ties) was also run by ``mergekit-multi`` 0.1.5; ``mergekit.json``
records what it wrote for each named stage, and ours must match it bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from superswallow_jax import manifest as mf
from superswallow_jax.errors import ConfigError
from superswallow_jax.options import MergeOptions
from superswallow_jax.recipe import check_references, load_recipe, parse_recipe, run_recipe, stage_dirs
from superswallow_jax.verify import verify_recipe

from .test_published import _ids, _tensor_sha

FIX = Path(__file__).parent / "fixtures" / "published"
RECIPE = FIX / "configs" / "multi-stage.yaml"
RECORD = json.loads((FIX / "mergekit.json").read_text(encoding="utf-8"))
OPTS = MergeOptions(seed=0, fsync=False)


def _doc(name: str | None, models: list[str], method: str = "linear") -> str:
    head = f"name: {name}\n" if name else ""
    body = "".join(f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in models)
    return f"{head}models:\n{body}merge_method: {method}\n"


# ---------------------------------------------------------------- parsing (no files)

def test_stages_run_after_the_stages_they_read():
    text = "---\n".join([_doc(None, ["b", "x"]), _doc("b", ["a", "y"]), _doc("a", ["x", "y"])])
    r = parse_recipe(text)
    assert [s.name for s in r.stages] == ["a", "b", None]
    assert r.stages[1].reads == ("a",) and r.final.reads == ("b",) and r.multi


def test_last_named_document_is_final_without_an_unnamed_one():
    r = parse_recipe("---\n".join([_doc("a", ["x", "y"]), _doc("b", ["a", "y"])]))
    assert r.final.name == "b" and [s.name for s in r.stages] == ["a", "b"]


def test_one_unnamed_document_is_an_ordinary_config():
    r = parse_recipe(_doc(None, ["x", "y"]))
    assert not r.multi and r.final.name is None


@pytest.mark.parametrize("docs, message", [
    ([_doc("a", ["b", "x"]), _doc("b", ["a", "x"]), _doc(None, ["a", "x"])], "cycle: a -> b -> a"),
    ([_doc("a", ["a", "x"]), _doc(None, ["a", "x"])], "cycle: a -> a"),
    ([_doc("a", ["x", "y"]), _doc("a", ["x", "y"])], "name: 'a' is given to two stages"),
    ([_doc(None, ["x", "y"]), _doc(None, ["x", "y"])], "two documents have no name"),
    ([_doc("a", ["x", "y"]), _doc("b", ["a", "y"]), _doc("c", ["b", "y"]).replace("- model: b", "- model: c")],
     "cycle: c -> c"),
    (["name: [1]\n" + _doc(None, ["x", "y"]), _doc(None, ["x", "y"])], "must be a plain non-empty string"),
    (["name: a/b\n" + _doc(None, ["x", "y"]), _doc(None, ["x", "y"])], "must be a plain non-empty string"),
    ([_doc("a", ["x", "y"]), "- 1\n"], "each document must be a mapping"),
])
def test_bad_recipes_are_one_line_errors(docs, message):
    with pytest.raises(ConfigError) as e:
        parse_recipe("---\n".join(docs), Path("multi.yaml"))
    assert message in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("multi.yaml")


def test_a_stage_error_names_the_file_and_key():
    bad = _doc("a", ["x", "y"]).replace("weight: 1.0", "weight: lots")
    with pytest.raises(ConfigError, match=r"multi.yaml.*weight"):
        parse_recipe("---\n".join([bad, _doc(None, ["a", "x"])]), Path("multi.yaml"))


def test_unknown_names_fail_before_anything_runs(tmp_path):
    (tmp_path / "x").mkdir()
    r = parse_recipe("---\n".join([_doc("a", [str(tmp_path / "x"), str(tmp_path / "x")]),
                                   _doc(None, ["a", "stage-c"])]), Path("multi.yaml"))
    with pytest.raises(ConfigError, match=r"stage \(final\): model 'stage-c' is neither a stage of this recipe \(a\)"):
        check_references(r)
    with pytest.raises(ConfigError, match="stage-c"):
        run_recipe(r, tmp_path / "out", OPTS, run=lambda *a, **k: pytest.fail("a stage ran"))


# ---------------------------------------------------------------- running (tiny published checkpoints)

@pytest.fixture(scope="module")
def fix_cwd():
    old = os.getcwd()
    os.chdir(FIX)  # the recipe names ./models/...
    yield
    os.chdir(old)


@pytest.fixture(scope="module")
def merged(tmp_path_factory, fix_cwd):
    """The recipe merged once, every stage kept."""
    out = tmp_path_factory.mktemp("recipe") / "out"
    run_recipe(load_recipe(RECIPE), out, OPTS, keep_intermediate=True)
    return out


def test_named_stages_are_bit_exact_with_mergekit_multi(merged):
    dirs = stage_dirs(load_recipe(RECIPE), merged, None)
    rec = RECORD["recipes"]["multi-stage.yaml"]["stages"]
    assert set(rec) == set(dirs) == {"llama-tulu", "tulu-swallow"}
    dt = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
    for name, folder in dirs.items():
        ours = {n: [dt[v[0]], v[1], v[2]] for n, v in _tensor_sha(folder).items()}
        assert ours == rec[name]["tensors"], name
        assert json.loads((folder / "config.json").read_text())["vocab_size"] == rec[name]["vocab_size"]
        assert _ids(folder, RECORD["text"]) == rec[name]["ids"]


def test_final_manifest_records_every_stage(merged):
    man = mf.read_manifest(merged)
    dirs = stage_dirs(load_recipe(RECIPE), merged, None)
    assert set(man["stages"]) == set(dirs) and man.get("stage") is None and man["stage_identity"]
    for name, folder in dirs.items():
        stage_man = mf.read_manifest(folder)
        assert stage_man["stage"] == name
        assert man["stages"][name]["model_digest"] == stage_man["model_digest"] == \
            mf.model_digest(mf.folder_digests(folder).values())
        assert man["stages"][name]["identity"] == stage_man["stage_identity"]


def test_same_bytes_on_a_rerun_and_intermediates_deleted(merged, tmp_path):
    out = tmp_path / "out"
    lines: list[str] = []
    run_recipe(load_recipe(RECIPE), out, OPTS, say=lines.append)
    assert mf.model_digest(mf.folder_digests(out).values()) == mf.model_digest(mf.folder_digests(merged).values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # stage folders and stages.json gone
    assert sum("intermediate output deleted" in line for line in lines) == 2


def test_stage_name_is_folded_into_the_keys(tmp_path, fix_cwd):
    text = RECIPE.read_text()
    outs = []
    for i, name in enumerate(["final-x", "final-y", "final-x"]):
        out = tmp_path / f"o{i}"
        run_recipe(parse_recipe(text + f"name: {name}\n", RECIPE), out, OPTS)
        outs.append(mf.model_digest(mf.folder_digests(out).values()))
    assert outs[0] == outs[2] != outs[1]


def test_user_intermediate_dir_keeps_other_files(tmp_path, fix_cwd):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    run_recipe(load_recipe(RECIPE), tmp_path / "out", OPTS, intermediate_dir=work)
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]


def _cli(*args: str, crash: str | None = None, cwd: Path = FIX) -> subprocess.CompletedProcess:
    env = {**os.environ, "SUPERSWALLOW_MALLOC": "off"}
    env.pop("SUPERSWALLOW_CRASH_AT", None)
    if crash:
        env["SUPERSWALLOW_CRASH_AT"] = crash
    code = "from superswallow_jax.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True)


def test_kill_during_stage_two_then_rerun_gives_the_same_bytes(merged, tmp_path):
    out = tmp_path / "out"
    r = _cli("merge", str(RECIPE), str(out), "-q", "--no-fsync", crash="tulu-swallow/tensor-5")
    assert r.returncode == -9, r.stderr
    assert not out.exists()
    stages = tmp_path / ".out.superswallow-stages"
    assert (stages / "llama-tulu" / mf.MANIFEST_NAME).is_file()
    assert not (stages / "tulu-swallow" / mf.MANIFEST_NAME).exists()
    assert (stages / ".tulu-swallow.superswallow-staging").is_dir()
    r = _cli("merge", str(RECIPE), str(out), "-q", "--no-fsync")
    assert r.returncode == 0, r.stderr
    assert "stage llama-tulu: reusing" in r.stderr and "resume: 5 finished tensors kept" in r.stderr
    assert mf.model_digest(mf.folder_digests(out).values()) == mf.model_digest(mf.folder_digests(merged).values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


CHAIN = """name: a
models:
  - model: ./models/llama
  - model: ./models/tulu
merge_method: slerp
base_model: ./models/llama
parameters: {t: 0.3}
---
name: b
models:
  - model: a
    parameters: {weight: 0.5}
  - model: ./models/tulu
    parameters: {weight: 0.5}
merge_method: linear
---
models:
  - model: b
    parameters: {weight: 0.5}
  - model: ./models/llama
    parameters: {weight: 0.5}
merge_method: linear
"""


def test_finished_readers_need_no_stage_again(tmp_path, fix_cwd):
    """a -> b -> final: a was deleted once b finished; rerunning the final stage must not merge a again."""
    out, lines = tmp_path / "out", []
    recipe = parse_recipe(CHAIN, Path("chain.yaml"))
    dirs = stage_dirs(recipe, out, None)
    run_recipe(recipe, out, OPTS, keep_intermediate=True)
    want = mf.model_digest(mf.folder_digests(out).values())
    shutil.rmtree(out)
    shutil.rmtree(dirs["a"])
    run_recipe(recipe, out, OPTS, say=lines.append)
    assert "stage a: not needed (every stage that reads it is finished)" in lines
    assert any(line.startswith("stage b: reusing") for line in lines)
    assert mf.model_digest(mf.folder_digests(out).values()) == want
    assert mf.read_manifest(out)["stages"]["a"]["identity"]  # recorded from stages.json


def test_a_changed_stage_is_merged_again(tmp_path, fix_cwd):
    out, lines = tmp_path / "out", []
    run_recipe(load_recipe(RECIPE), out, OPTS, keep_intermediate=True)
    changed = parse_recipe(RECIPE.read_text().replace("t: [0, 0.3, 0.7, 1]", "t: [0, 0.3, 0.7, 0.9]"), RECIPE)
    shutil.rmtree(out)
    run_recipe(changed, out, OPTS, keep_intermediate=True, say=lines.append)
    assert any("stage llama-tulu: merging" in line for line in lines)
    assert any("stage tulu-swallow: reusing" in line for line in lines)


def test_verify_replays_the_chain(merged):
    rep = verify_recipe(load_recipe(RECIPE), merged)
    assert rep.ok, [f.line() for f in rep.findings]
    assert rep.tensors_matched == rep.tensors_checked > 0
    assert not list(merged.parent.glob(".out.superswallow-verify-*"))


def test_verify_names_the_stage_that_differs(merged):
    changed = parse_recipe(RECIPE.read_text().replace("value: [0.2, 0.8]", "value: [0.2, 0.7]"), RECIPE)
    rep = verify_recipe(changed, merged)
    lines = [f.line() for f in rep.findings]
    assert "DIFFERS merge_manifest.json: stage tulu-swallow is not what the recipe makes" in lines
    assert not any("llama-tulu" in line for line in lines)


def test_cli_plan_shows_the_stage_graph():
    r = _cli("plan", str(RECIPE))
    assert r.returncode == 0, r.stderr
    assert "recipe: 3 stages, run in this order:" in r.stdout
    assert "(final): dare_ties of 3 models reads llama-tulu, tulu-swallow -> OUT" in r.stdout
    assert "== stage tulu-swallow ==" in r.stdout and "method: slerp" in r.stdout
    assert "it reads llama-tulu, tulu-swallow, not merged yet" in r.stdout


def test_cli_cycle_is_one_line(tmp_path):
    cfg = tmp_path / "multi.yaml"
    cfg.write_text("---\n".join([_doc("a", ["b", "x"]), _doc("b", ["a", "x"])]))
    r = _cli("merge", str(cfg), str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "cycle" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
