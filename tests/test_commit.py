"""The output commit protocol (superswallow_jax.io.commit, superswallow_jax.output): crash safety, resume, locks.

Real merge processes are killed with SIGKILL at every step of the commit
(``SUPERSWALLOW_CRASH_AT``) and after a random number of finished tensors;
after each kill OUT must hold no final-named weight file unless it holds the
whole merge, and the same command must then finish it, byte for byte equal
to an uninterrupted run, leaving no staging folder behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from superswallow_jax.config import parse_config
from superswallow_jax.errors import OutputError
from superswallow_jax.io import commit as cm
from superswallow_jax.merge import run_merge
from superswallow_jax.options import MergeOptions
from superswallow_jax.tiny import make_tiny_models

ROOT = Path(__file__).resolve().parents[1]
CRASH_POINTS = ["tensor-3", "staged", "before-journal", "journal-written", "moved-one", "renamed", "committed"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("models"), models=["swallow", "tulu"])


def _config(models, tmp: Path, name: str) -> Path:
    text = (ROOT / "configs" / name).read_text().replace("models/", str(models["swallow"].parent) + "/")
    p = tmp / f"cfg-{Path(name).stem}.yaml"
    p.write_text(text)
    return p


def _cli(cfg: Path, out: Path, *args: str, crash: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SUPERSWALLOW_MALLOC": "off"}
    env.pop("SUPERSWALLOW_CRASH_AT", None)
    if crash is not None:
        env["SUPERSWALLOW_CRASH_AT"] = crash
    code = "import sys; from superswallow_jax.cli import main; sys.argv = ['superswallow', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, "merge", str(cfg), str(out), "-q", "--no-fsync", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def _files(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def _weights(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith((".safetensors", ".safetensors.index.json")))


# ----------------------------------------------------------------------------- the protocol in-process


def _staged(tmp: Path, out: Path, names: dict[str, bytes]) -> Path:
    staging = cm.staging_path(out)
    staging.mkdir()
    for n, data in names.items():
        (staging / n).write_bytes(data)
    return staging


def test_commit_into_a_new_folder_is_one_rename(tmp_path):
    out = tmp_path / "out"
    staging = _staged(tmp_path, out, {"model.safetensors": b"w", "config.json": b"{}"})
    with cm.OutputLock(out) as lock:
        assert lock.created and out.is_dir()
        cm.commit(staging, out)
    assert _files(out).keys() == {"model.safetensors", "config.json"} and not staging.exists()


def test_commit_keeps_other_files_and_replaces_same_names(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "x").write_text("x")
    (out / "config.json").write_text("old")
    staging = _staged(tmp_path, out, {"model.safetensors": b"w", "config.json": b"new"})
    with cm.OutputLock(out):
        cm.commit(staging, out)
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "x").read_text() == "x"
    assert (out / "config.json").read_text() == "new" and not cm.journal_path(out).exists()


def test_lock_fails_fast_and_names_the_folder(tmp_path):
    out = tmp_path / "out"
    with cm.OutputLock(out):
        with pytest.raises(OutputError) as ei:
            cm.OutputLock(out)
    assert "another superswallow merge" in str(ei.value) and str(out) in str(ei.value)
    assert not out.exists()  # the lock made it and nothing was committed
    cm.OutputLock(out).release()  # free again


def test_recover_moves_entries_back(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    staging = _staged(tmp_path, out, {"model.safetensors": b"w", "a.txt": b"a"})
    (out / "b.txt").write_text("b")
    cm.journal_path(out).write_text(json.dumps({"moved": ["a.txt", "b.txt"]}))
    note = cm.recover(out)
    assert "1 of 2 entries moved back" in note
    assert (out / "a.txt").read_text() == "a" and (out / "b.txt").read_text() == "b"
    assert not cm.journal_path(out).exists() and (staging / "model.safetensors").exists()


def test_remove_previous_merge_only_named_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for n in ("model.safetensors", "config.json", "merge_manifest.json", "notes.txt", "other.safetensors"):
        (out / n).write_text(n)
    (out / "merge_manifest.json").write_text(json.dumps({"files": ["model.safetensors", "config.json", "../x"]}))
    removed = cm.remove_previous_merge(out, "merge_manifest.json", ("model.safetensors.index.json",))
    assert removed == ["config.json", "merge_manifest.json", "model.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "other.safetensors"]


def test_free_space_error_names_folder_and_bytes(tmp_path):
    with pytest.raises(OutputError) as ei:
        cm.check_free_space(tmp_path, 1 << 62, tmp_path / "out")
    msg = str(ei.value)
    assert str(tmp_path / "out") in msg and "missing" in msg and "\n" not in msg


# ----------------------------------------------------------------------------- merges


def test_force_keeps_other_users_files_and_refuses_without_it(models, tmp_path):
    cfg = parse_config(_config(models, tmp_path, "superswallow-tiny.yaml").read_text())
    out = tmp_path / "out"
    run_merge(cfg, out, MergeOptions(fsync=False))
    before = _files(out)
    (out / "notes.txt").write_text("keep me")
    (out / "stray.safetensors").write_bytes(b"not ours")
    with pytest.raises(OutputError, match="not empty"):
        run_merge(cfg, out, MergeOptions(fsync=False))
    lines = []
    run_merge(cfg, out, MergeOptions(fsync=False, force=True), say=lines.append)
    after = _files(out)
    assert (out / "notes.txt").read_text() == "keep me" and (out / "stray.safetensors").read_bytes() == b"not ours"
    assert {k: v for k, v in after.items() if k in before} == before
    assert any("removed" in line and "previous merge" in line for line in lines)
    man = json.loads((out / "merge_manifest.json").read_text())
    assert "notes.txt" not in man["files"] and "model.safetensors" in man["files"]


def test_a_second_merge_into_a_locked_folder_fails_at_once(models, tmp_path):
    cfg = _config(models, tmp_path, "superswallow-tiny.yaml")
    out = tmp_path / "out"
    r = _cli(cfg, out)
    assert r.returncode == 0, r.stderr
    before = _files(out)
    with cm.OutputLock(out):
        r2 = _cli(cfg, out, "--force")
    assert r2.returncode == 2 and "another superswallow merge" in r2.stderr and r2.stderr.count("\n") == 1
    assert _files(out) == before


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_at_each_commit_step_then_rerun(models, tmp_path, point):
    cfg = _config(models, tmp_path, "superswallow-tiny.yaml")
    ref = tmp_path / "ref" / "out"  # the same folder name: it titles the model card
    assert _cli(cfg, ref).returncode == 0
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep")  # a file of someone else's in OUT: the journal steps run
    r = _cli(cfg, out, "--force", crash=point)
    assert r.returncode == -9, (point, r.returncode, r.stderr[-500:])
    complete = point in ("renamed", "committed")
    assert bool(_weights(out)) == complete, (point, sorted(os.listdir(out)))
    if not complete:
        assert sorted(os.listdir(out)) in ([], ["notes.txt"]) or cm.journal_path(out).exists()
    r = _cli(cfg, out, "--force")
    assert r.returncode == 0, r.stderr
    assert (out / "notes.txt").read_text() == "keep"
    got = _files(out)
    got.pop("notes.txt")
    assert got == _files(ref)
    assert not cm.staging_path(out).exists() and not cm.journal_path(out).exists()


@pytest.mark.parametrize("recipe, shard", [("superswallow-tiny.yaml", "5B"), ("examples/dare-ties-d05.yaml", "200K")])
def test_kill_while_writing_then_resume(models, tmp_path, recipe, shard):
    cfg = _config(models, tmp_path, recipe)
    ref = tmp_path / "ref" / "out"  # the same folder name: it titles the model card
    assert _cli(cfg, ref, "--shard-size", shard).returncode == 0
    k = random.Random(recipe).randrange(1, 30)
    out = tmp_path / "out"
    r = _cli(cfg, out, "--shard-size", shard, crash=f"tensor-{k}")
    assert r.returncode == -9, r.stderr[-500:]
    assert not out.exists() or not _weights(out)
    assert cm.staging_path(out).is_dir()
    r = _cli(cfg, out, "--shard-size", shard)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr and f"resume: {k} finished tensors kept" in r.stderr
    assert _files(out) == _files(ref)
    assert not cm.staging_path(out).exists()


def test_stale_staging_of_another_run_is_removed_with_a_note(models, tmp_path):
    cfg = _config(models, tmp_path, "examples/dare-ties-d05.yaml")
    out = tmp_path / "out"
    assert _cli(cfg, out, crash="tensor-5").returncode == -9
    r = _cli(cfg, out, "--seed", "1")
    assert r.returncode == 0 and "removed" in r.stderr and "options" in r.stderr, r.stderr
    assert not cm.staging_path(out).exists()
    ref = tmp_path / "ref" / "out"  # the same folder name: it titles the model card
    assert _cli(cfg, ref, "--seed", "1").returncode == 0
    assert _files(out) == _files(ref)


@pytest.mark.parametrize("sig, code", [("TERM", 143), ("INT", 130)])
def test_sigterm_and_sigint_clean_up(models, tmp_path, sig, code):
    cfg = _config(models, tmp_path, "superswallow-tiny.yaml")
    out = tmp_path / "out"
    r = _cli(cfg, out, crash=f"tensor-4:{sig}")
    assert r.returncode == code and r.stderr == "interrupted\n", (r.returncode, r.stderr[-300:])
    assert not out.exists() and not cm.staging_path(out).exists()


def test_errors_remove_the_staging_folder(models, tmp_path):
    cfg = parse_config(_config(models, tmp_path, "superswallow-tiny.yaml").read_text())
    out = tmp_path / "out"
    boom = RuntimeError("boom")

    def progress(n):
        raise boom

    with pytest.raises(RuntimeError):
        run_merge(cfg, out, MergeOptions(fsync=False), progress=progress)
    assert not cm.staging_path(out).exists() and not out.exists()


def _tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("where", ["allocation", "end"])
def test_disk_full_is_one_line_and_leaves_nothing(models, tmp_path, monkeypatch, where):
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "400k" if where == "allocation" else "700k"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        cfg = parse_config(_config(models, tmp_path, "superswallow-tiny.yaml").read_text())
        out = disk / "out"
        if where == "end":  # the shards fit, the small files at the end do not
            from superswallow_jax import output

            monkeypatch.setattr(output.Output, "_space", lambda self: None)
            monkeypatch.setattr(output, "extra_files", lambda plan, name: {"big.bin": b"x" * 400_000})
        with pytest.raises(OutputError) as ei:
            run_merge(cfg, out, MergeOptions(fsync=False))
        msg = str(ei.value)
        assert "\n" not in msg
        if where == "allocation":
            assert str(out) in msg and "missing" in msg
        else:
            assert "No space left on device" in msg and "big.bin" in msg
        assert not cm.staging_path(out).exists() and not out.exists()
        assert not os.listdir(disk)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
