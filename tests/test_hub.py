"""Models by Hugging Face id: the cache first, else a download through huggingface_hub.

No internet: a stand-in hub (tests/hub_server.py) serves tiny models on
127.0.0.1 and ``HF_ENDPOINT`` points huggingface_hub at it; the cache is a
tmp folder (``HF_HUB_CACHE``), laid out by huggingface_hub itself.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from superswallow_jax import manifest as mf
from superswallow_jax.cli import app
from superswallow_jax.config import parse_config
from superswallow_jax.errors import ModelError, SafetensorsError
from superswallow_jax.io import hub as hubmod
from superswallow_jax.io.checkpoint import WeightChoice, choose_weights
from superswallow_jax.io.hub import HubAccess, hub_cache_dir, offline_by_env, resolve_hub_model, wanted_files
from superswallow_jax.io.model_dir import resolve_model
from superswallow_jax.merge import run_merge
from superswallow_jax.options import MergeOptions
from superswallow_jax.tiny import make_tiny_models
from superswallow_jax.verify import verify_folder

from .hub_server import TOKEN, StandInHub

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
SMALL = ["config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"]
TULU_ST = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]


# -- which files: pure rules --------------------------------------------------------------------

def test_choose_weights_prefers_safetensors_and_its_index():
    names = {"config.json", "pytorch_model.bin", "model.safetensors", "model.safetensors.index.json", "README.md"}
    assert choose_weights(names, "x") == WeightChoice("safetensors", "model.safetensors.index.json", ())
    assert choose_weights(names - {"model.safetensors.index.json"}, "x") == \
        WeightChoice("safetensors", None, ("model.safetensors",))
    assert choose_weights({"b.safetensors", "a.safetensors", "pytorch_model.bin"}, "x").files == \
        ("a.safetensors", "b.safetensors")
    assert choose_weights({"pytorch_model.bin.index.json", "pytorch_model.bin", "training_args.bin"}, "x") == \
        WeightChoice("pytorch", "pytorch_model.bin.index.json", ())
    assert choose_weights({"pytorch_model.bin", "training_args.bin"}, "x").files == ("pytorch_model.bin",)
    assert choose_weights({"config.json", "model.gguf", "training_args.bin"}, "x") is None
    with pytest.raises(SafetensorsError, match="acme/m@123: 1 shard files .* no model.safetensors.index.json"):
        choose_weights({"model-00001-of-00002.safetensors"}, "acme/m@123")


def test_wanted_files_are_the_small_files_then_one_format():
    repo = {n: 1 for n in ["README.md", "config.json", "tokenizer.model", "merges.txt", "onnx/model.onnx", "vocab.json",
                           "model.safetensors", "pytorch_model.bin", "training_args.bin", "generation_config.json"]}
    got = wanted_files(repo, choose_weights(repo, "x"), [])
    assert got == ["config.json", "generation_config.json", "tokenizer.model", "merges.txt", "vocab.json",
                   "model.safetensors"]
    idx = WeightChoice("safetensors", "model.safetensors.index.json", ())
    assert wanted_files({"config.json": 1}, idx, ["b.safetensors", "a.safetensors", "a.safetensors"]) == \
        ["config.json", "a.safetensors", "b.safetensors"]


def test_cache_and_offline_settings_follow_huggingface_hub(monkeypatch, tmp_path):
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HF_HUB_OFFLINE",
              "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    assert hub_cache_dir() == Path("~/.cache/huggingface/hub").expanduser()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "old"))
    assert hub_cache_dir() == tmp_path / "old"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "new"))
    assert hub_cache_dir() == tmp_path / "new"
    assert not offline_by_env()
    for value, off in (("1", True), ("yes", True), ("ON", True), ("0", False), ("", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert offline_by_env() is off
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert not offline_by_env()  # as huggingface_hub reads them: HF_HUB_OFFLINE first


def test_pins_come_from_the_manifest_and_its_stages():
    a, b = "a" * 40, "b" * 40
    man = {"hub_inputs": {"acme/x": {"commit": a}, "acme/bad": {"commit": "main"}},
           "stages": {"s1": {"hub_inputs": {"acme/y@v1": {"commit": b}}}, "s2": None}}
    assert mf.pins(man) == {"acme/x": a, "acme/y@v1": b}
    assert mf.pins(None) == {} and mf.pins({"hub_inputs": ["x"]}) == {}


def test_local_folders_and_the_model_cache_never_load_huggingface_hub(tmp_path):
    """Start-up: a merge of local folders (or SUPERSWALLOW_MODEL_CACHE folders) does not import huggingface_hub."""
    (tmp_path / "m").mkdir()
    (tmp_path / "cache" / "acme" / "kept").mkdir(parents=True)
    code = ("import sys; from pathlib import Path; from superswallow_jax.io.model_dir import resolve_model as r; "
            f"p, s = r({str(tmp_path / 'm')!r}); assert s is None and p == Path({str(tmp_path / 'm')!r}).resolve(), p; "
            "p, s = r('acme/kept'); assert s is None and p.name == 'kept', p; "
            "print('huggingface_hub' in sys.modules)")
    env = {**os.environ, "SUPERSWALLOW_MODEL_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


# -- a stand-in hub ------------------------------------------------------------------------------

def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    fast = make_tiny_models(d / "fast", models=["swallow", "tulu"])
    pub = make_tiny_models(d / "pub", models=["tulu"], published=True)
    return {"swallow": fast["swallow"], "tulu": fast["tulu"], "tulu_bin": pub["tulu"]}


@pytest.fixture
def hub(tiny, tmp_path, monkeypatch):
    """acme/swallow (safetensors, plus files a merge does not read) and acme/tulu (sharded safetensors
    and sharded .bin: only the safetensors are fetched), served on 127.0.0.1; an empty cache."""
    with StandInHub() as h:
        swallow = {**_files(tiny["swallow"]), "README.md": b"# card\n", "onnx/model.onnx": b"onnx" * 100,
                   "training_args.bin": b"args"}
        h.add("acme/swallow", swallow)
        bins = {n: b for n, b in _files(tiny["tulu_bin"]).items() if n.startswith("pytorch_model")}
        tulu = {**bins, **_files(tiny["tulu"])}
        assert "pytorch_model.bin.index.json" in tulu and "model.safetensors.index.json" in tulu
        h.add("acme/tulu", tulu)
        h.add("acme/tulu", tulu, ref="v1")  # a tag on the same files (another commit id)
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        yield h


def _config(tmp_path: Path) -> Path:
    text = (ROOT / "configs" / "superswallow-tiny.yaml").read_text()
    cfg = tmp_path / "hub.yaml"
    cfg.write_text(text.replace("models/swallow", "acme/swallow").replace("models/tulu", "acme/tulu"))
    return cfg


def _resolved(hub: StandInHub, start: int = 0) -> set:
    """(repo, file) of every file GET since log entry ``start``."""
    return {(p.split("/")[1] + "/" + p.split("/")[2], p.split("/", 5)[5]) for m, p, _ in hub.log[start:]
            if m == "GET" and "/resolve/" in p}


def test_merge_downloads_what_it_reads_then_runs_offline_and_verify_refetches_the_commit(hub, tiny, tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    out = tmp_path / "out"
    r = runner.invoke(app, ["merge", str(cfg), str(out)])
    assert r.exit_code == 0, r.output
    swallow_c, tulu_c = hub.repos["acme/swallow"].refs["main"], hub.repos["acme/tulu"].refs["main"]
    assert f"downloading acme/swallow@main (commit {swallow_c}): 6 files" in r.output
    assert f"downloading acme/tulu@main (commit {tulu_c}): 8 files" in r.output  # the index came first
    # exactly the files a merge reads: no README, no onnx/, no training_args.bin, no .bin when safetensors exist
    assert _resolved(hub) == {("acme/swallow", n) for n in SMALL + ["model.safetensors"]} | \
        {("acme/tulu", n) for n in SMALL + TULU_ST + ["model.safetensors.index.json"]}
    man = json.loads((out / "merge_manifest.json").read_text())
    assert man["hub_inputs"] == {"acme/swallow": {"repo_id": "acme/swallow", "revision": None, "commit": swallow_c},
                                 "acme/tulu": {"repo_id": "acme/tulu", "revision": None, "commit": tulu_c}}
    # the same bytes as the merge of the local folders the hub serves
    local = tmp_path / "local.yaml"
    local.write_text((ROOT / "configs" / "superswallow-tiny.yaml").read_text()
                     .replace("models/swallow", str(tiny["swallow"])).replace("models/tulu", str(tiny["tulu"])))
    res = run_merge(parse_config(local.read_text()), tmp_path / "local", MergeOptions(fsync=False))
    assert json.loads((res.out_dir / "merge_manifest.json").read_text())["model_digest"] == man["model_digest"]

    # cached: no request at all, with or without --offline (mergekit 0.1.5 lists the repo first)
    seen = len(hub.log)
    for extra in ([], ["--offline"]):
        r = runner.invoke(app, ["merge", str(cfg), str(tmp_path / f"again{len(extra)}"), "-q", *extra])
        assert r.exit_code == 0, r.output
        again = json.loads((tmp_path / f"again{len(extra)}" / "merge_manifest.json").read_text())
        assert again["model_digest"] == man["model_digest"]
    assert len(hub.log) == seen

    # main moves on; with an empty cache verify downloads the recorded commits, not main
    changed = dict(hub.repos["acme/tulu"].commits[tulu_c])
    changed["config.json"] = changed["config.json"].replace(b"}", b', "note": 1}', 1)
    new_c = hub.add("acme/tulu", changed)
    shutil.rmtree(tmp_path / "hf-cache")
    rep = verify_folder(parse_config(cfg.read_text()), out)
    assert rep.ok, [f.line() for f in rep.findings]
    revs = {p.split("/")[4] for m, p, _ in hub.log[seen:] if m == "GET" and "/resolve/" in p}
    assert revs == {swallow_c, tulu_c}
    assert resolve_hub_model("acme/tulu")[1].commit == new_c  # unpinned, main is the new commit


def test_a_revision_resolves_and_is_found_offline_by_name(hub, tmp_path):
    snap, src = resolve_hub_model("acme/tulu@v1")
    v1 = hub.repos["acme/tulu"].refs["v1"]
    assert src.record() == {"repo_id": "acme/tulu", "revision": "v1", "commit": v1} and snap.name == v1
    assert (tmp_path / "hf-cache" / "models--acme--tulu" / "refs" / "v1").read_text() == v1
    seen = len(hub.log)
    assert resolve_hub_model("acme/tulu@v1", HubAccess(offline=True)) == (snap, src)
    assert resolve_hub_model(f"acme/tulu@{v1}", HubAccess(offline=True))[0] == snap
    assert len(hub.log) == seen
    with pytest.raises(ModelError, match="acme/tulu is not in the Hugging Face cache"):
        resolve_hub_model("acme/tulu", HubAccess(offline=True))  # main was never fetched


def test_a_dropped_connection_resumes_with_a_range_request(hub, tmp_path):
    """huggingface_hub keeps what it received in whole 10 MiB chunks and asks for the rest."""
    big = np.arange(3_000_000, dtype=np.float32)  # 12 MB: more than one chunk
    from safetensors.numpy import save

    weights = save({"w": big})
    hub.add("acme/big", {"config.json": b"{}", "model.safetensors": weights})
    hub.cut["model.safetensors"] = 11_000_000
    counted = []
    progress = lambda label, total: counted.append(total) or counted.append  # noqa: E731
    snap, _ = resolve_hub_model("acme/big", HubAccess(progress=progress))
    gets = [(p, rng) for m, p, rng in hub.log if m == "GET" and p.endswith("/model.safetensors")]
    assert len(gets) == 2 and gets[0][1] is None and gets[1][1] == f"bytes={10 * 1024 * 1024}-"
    assert (snap / "model.safetensors").read_bytes() == weights
    assert counted[0] == len(weights) + 2 and sum(counted[1:]) == counted[0]  # the progress counts each byte once
    blobs = list((tmp_path / "hf-cache" / "models--acme--big" / "blobs").iterdir())
    assert not [b for b in blobs if b.name.endswith(".incomplete")]


def test_a_stopped_download_keeps_finished_files_and_fetches_only_the_rest(hub, tmp_path):
    hub.fail[TULU_ST[2]] = 1
    with pytest.raises(ModelError) as e:
        resolve_hub_model("acme/tulu")
    assert "\n" not in str(e.value) and "HTTP 500" in str(e.value) and "acme/tulu" in str(e.value)
    commit = hub.repos["acme/tulu"].refs["main"]
    snap = tmp_path / "hf-cache" / "models--acme--tulu" / "snapshots" / commit
    assert sorted(p.name for p in snap.iterdir()) == sorted(SMALL + TULU_ST[:2] + ["model.safetensors.index.json"])
    with pytest.raises(ModelError, match="not in the Hugging Face cache"):
        resolve_hub_model("acme/tulu", HubAccess(offline=True))  # incomplete weights are not a cache hit
    seen = len(hub.log)
    resolve_hub_model("acme/tulu")
    assert _resolved(hub, seen) == {("acme/tulu", TULU_ST[2])}


def _error(ref: str, access: HubAccess | None = None) -> str:
    with pytest.raises(ModelError) as e:
        resolve_hub_model(ref, access)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"model {ref!r}"), msg
    return msg


def test_each_failure_is_one_line_naming_the_model(hub, tiny, monkeypatch):
    files = _files(tiny["swallow"])
    hub.add("acme/gated", files, gated=True)
    hub.add("acme/private", files, private=True)
    hub.add("acme/noweights", {"config.json": b"{}", "model.gguf": b"x"})
    assert "acme/gated is gated: accept its conditions at " + hub.url + "/acme/gated, then log in with `hf auth login`" \
        in _error("acme/gated")
    assert "is private or gated and you are not logged in: check the id, or log in with `hf auth login`" \
        in _error("acme/private")
    assert f"{hub.url} has no repo acme/nope" in _error("acme/nope")
    assert "acme/tulu has no revision 'v9'" in _error("acme/tulu@v9")
    assert "not a Hugging Face id" in _error("acme/bad--name")
    assert "has no weights superswallow reads" in _error("acme/noweights")
    assert "downloads are off (--offline or HF_HUB_OFFLINE=1)" in _error("acme/swallow", HubAccess(offline=True))
    plan = _error("acme/swallow", HubAccess(download=False))
    assert "plan reads only cached models: `superswallow merge` downloads 6 files (" in plan
    assert not hub.downloads()  # nothing above fetched a file
    real_free = hubmod._free_bytes
    monkeypatch.setattr(hubmod, "_free_bytes", lambda path: 1000)
    assert "needs more space than the 1.00 kB free in" in _error("acme/swallow")
    assert not hub.downloads()  # the space is checked before the first byte
    monkeypatch.setattr(hubmod, "_free_bytes", real_free)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert resolve_hub_model("acme/private")[1].repo_id == "acme/private"  # a token opens a private repo
    assert "your token cannot read it" in _error("acme/nope2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "downloads are off" in _error("acme/gated")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert "the Hub (http://127.0.0.1:9) cannot be reached (" in _error("acme/swallow")
    assert "--offline then uses it" in _error("acme/swallow")


def test_cli_errors_and_plan_without_downloads(hub, tmp_path):
    cfg = _config(tmp_path)
    for cmd in (["merge", str(cfg), str(tmp_path / "o"), "--offline", "-q"], ["plan", str(cfg)],
                ["plan", str(cfg), "--offline"], ["verify", str(cfg), str(tmp_path / "o"), "--offline"]):
        r = runner.invoke(app, cmd)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: model 'acme/swallow'"), (cmd, r.output)
    assert "`superswallow merge` downloads 6 files" in runner.invoke(app, ["plan", str(cfg)]).output
    assert not hub.downloads()
    assert not (tmp_path / "o").exists()
    r = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "o"), "-q"])
    assert r.exit_code == 0, r.output
    seen = len(hub.log)
    r = runner.invoke(app, ["plan", str(cfg), "--offline"])
    assert r.exit_code == 0 and "acme/tulu" in r.output, r.output
    assert len(hub.log) == seen


def test_a_recipe_records_every_stage_s_hub_inputs(hub, tmp_path):
    main, v1 = hub.repos["acme/tulu"].refs["main"], hub.repos["acme/tulu"].refs["v1"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: first\nmerge_method: linear\nmodels:\n  - model: acme/tulu\n    parameters: {weight: 1}\n"
        "  - model: acme/tulu@v1\n    parameters: {weight: 1}\ndtype: float32\n---\n"
        "name: final\nmerge_method: linear\nmodels:\n  - model: first\n    parameters: {weight: 1}\n"
        "  - model: acme/tulu@v1\n    parameters: {weight: 1}\ndtype: float32\n")
    r = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "o"), "-q"])
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "o" / "merge_manifest.json").read_text())
    assert man["hub_inputs"] == {"acme/tulu@v1": {"repo_id": "acme/tulu", "revision": "v1", "commit": v1}}
    assert man["stages"]["first"]["hub_inputs"]["acme/tulu"]["commit"] == main
    assert mf.pins(man) == {"acme/tulu": main, "acme/tulu@v1": v1}
    seen = len(hub.log)
    r = runner.invoke(app, ["verify", str(recipe), str(tmp_path / "o"), "--offline"])
    assert r.exit_code == 0 and "0 differences" in r.output, r.output
    assert len(hub.log) == seen


def test_resolve_model_passes_ids_to_the_hub_and_keeps_local_errors(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "swallow").mkdir(parents=True)
    assert resolve_model("acme/swallow") == ((tmp_path / "acme" / "swallow").resolve(), None)  # a folder wins
    with pytest.raises(ModelError, match="not found locally"):
        resolve_model("./acme/tulu")
    d, src = resolve_model("acme/tulu")
    assert src is not None and src.commit == d.name
