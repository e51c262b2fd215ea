"""Tier 3: merges of ``base+adapter`` references, bit for bit against mergekit 0.1.5 ``--lora-merge-cache``.

``tests/fixtures/lora/mergekit.json`` holds what mergekit (torch 2.13,
transformers 5, peft 0.21) wrote for every config of
``tests/fixtures/lora/configs``: each tensor's sha256, ``vocab_size`` and
the token ids of a text. The configs name ``./models/{llama,swallow,tulu}``
(the published fixtures), ``./models/gpt2``, ``./adapters/*`` and
``./tiny/*`` (``superswallow tiny`` models, made here; the record holds
their digests too, so a change of the generator is reported as such).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from superswallow_jax.config import load_config, parse_config
from superswallow_jax.io.checkpoint import Checkpoint
from superswallow_jax.merge import dumps_plan, run_merge
from superswallow_jax.options import MergeOptions
from superswallow_jax.plan import build_plan
from superswallow_jax.tiny import make_tiny_models

from .test_published import _ids

FIX = Path(__file__).parent / "fixtures"
LORA = FIX / "lora"
RECORD = json.loads((LORA / "mergekit.json").read_text(encoding="utf-8"))
DT = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def _sha(folder: Path) -> dict:
    ck = Checkpoint(folder)
    return {n: [DT[ck.tensors[n].dtype], list(ck.tensors[n].shape),
                hashlib.sha256(np.ascontiguousarray(ck.view(n)).tobytes()).hexdigest()] for n in ck.tensors}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder laid out as the configs expect (links to the fixtures, tiny models made here)."""
    root = tmp_path_factory.mktemp("lora")
    (root / "models").mkdir()
    for m in ("llama", "swallow", "tulu"):
        os.symlink(FIX / "published" / "models" / m, root / "models" / m)
    os.symlink(LORA / "models" / "gpt2", root / "models" / "gpt2")
    os.symlink(LORA / "adapters", root / "adapters")
    make_tiny_models(root / "tiny", models=["llama", "swallow", "tulu"])
    for m, want in RECORD["tiny"].items():
        assert _sha(root / "tiny" / m) == want, f"superswallow tiny makes a different {m}: re-record the fixtures"
    return root


@pytest.mark.parametrize("name", sorted(RECORD["configs"]))
def test_bit_exact_with_mergekit_lora_merge_cache(name, workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(workdir)
    out = tmp_path / "out"
    # 1024-element chunks: rows of 176 (down_proj), 96 (GPT-2 c_fc) and embeddings cross chunk ends
    run_merge(load_config(LORA / "configs" / name), out, MergeOptions(seed=0, fsync=False, chunk_elems=1024))
    rec = RECORD["configs"][name]
    assert _sha(out) == rec["tensors"]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rec["vocab_size"]
    if "ids" in rec:
        assert _ids(out, RECORD["text"]) == rec["ids"]


def test_chunk_size_and_sharding_do_not_change_bytes_and_manifest_records_adapters(workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(workdir)
    cfg = load_config(LORA / "configs" / "tiny-superswallow.yaml")
    outs = []
    for chunk, shard in ((1024, None), (1 << 20, None), (4096, "64")):  # "64": adapted chunks spread over the 8 devices
        if shard:
            monkeypatch.setenv("SUPERSWALLOW_MIN_SHARD_ELEMS", shard)
        outs.append(tmp_path / f"out-{chunk}")
        run_merge(cfg, outs[-1], MergeOptions(seed=0, fsync=False, chunk_elems=chunk))
    m = [json.loads((o / "merge_manifest.json").read_text()) for o in outs]
    assert m[0]["model_digest"] == m[1]["model_digest"] == m[2]["model_digest"]
    files = m[0]["input_files_sha256"]
    ref = "./tiny/tulu+./adapters/tiny-down"
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert files[f"{ref}/adapter/{f}"] == hashlib.sha256((LORA / "adapters" / "tiny-down" / f).read_bytes()).hexdigest()
    assert f"{ref}/model.safetensors.index.json" not in files and any(k.startswith(f"{ref}/model-") for k in files)


def test_plan_shows_adapters(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    with build_plan(load_config(LORA / "configs" / "superswallow-lora.yaml")) as plan:
        summary = json.loads(dumps_plan(plan))
    swallow = summary["models"][0]
    assert swallow["key"] == "./models/swallow+./adapters/embed" and swallow["adapter"]["dir"].endswith("adapters/embed")
    step = next(s for s in summary["steps"] if s["name"] == "model.layers.1.self_attn.q_proj.weight")
    lora = [src["lora"] for src in step["sources"]]
    assert lora[0] == {"dtype": "BF16", "rank": 8, "scale": 1.0, "transposed": False}
    assert lora[1] == {"dtype": "BF16", "rank": 16, "scale": 2.0, "transposed": False}


def test_a_bad_adapter_is_one_line_from_the_cli(workdir, tmp_path):
    bad = tmp_path / "dora"
    bad.mkdir()
    src = LORA / "adapters" / "r8"
    (bad / "adapter_model.safetensors").symlink_to(src / "adapter_model.safetensors")
    (bad / "adapter_config.json").write_text(json.dumps({**json.loads((src / "adapter_config.json").read_text()),
                                                          "use_dora": True}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"models:\n  - model: {workdir}/models/swallow+{bad}\n    parameters: {{weight: 1}}\n"
                   "merge_method: linear\n")
    r = subprocess.run([sys.executable, "-m", "superswallow_jax.cli", "merge", str(cfg), str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("error: ") and "use_dora: DoRA (use_dora) is not supported" in r.stderr


def test_missing_adapter_names_it(tmp_path):
    cfg = parse_config(f"models:\n  - model: {FIX}/published/models/llama+{tmp_path}/nowhere\n"
                       "    parameters: {weight: 1}\nmerge_method: linear\n")
    with pytest.raises(Exception, match="adapter .*nowhere.* not found locally"):
        build_plan(cfg)


def test_a_recipe_stage_with_an_adapter(workdir, tmp_path, monkeypatch):
    """``stage+adapter``: the stage is read (and merged first), the adapter applied to it; the same
    bytes as merging the stage's folder with the adapter by hand."""
    from superswallow_jax.recipe import check_references, identities, parse_recipe, run_recipe

    monkeypatch.chdir(workdir)
    stage = ("name: lin\nmodels:\n  - model: ./models/llama\n    parameters: {weight: 0.7}\n"
             "  - model: ./models/tulu\n    parameters: {weight: 0.3}\nmerge_method: linear\ndtype: bfloat16\n")
    final = "models:\n  - model: {m}+./adapters/pattern\n    parameters: {{weight: 1}}\nmerge_method: linear\ndtype: bfloat16\n"
    recipe = parse_recipe(stage + "---\n" + final.format(m="lin"))
    assert recipe.stages[-1].reads == ("lin",)
    check_references(recipe)
    ids = identities(recipe, MergeOptions(seed=0))
    run_recipe(recipe, tmp_path / "out", MergeOptions(seed=0, fsync=False))
    run_merge(parse_config(stage, allow_name=True), tmp_path / "lin", MergeOptions(seed=0, fsync=False))
    run_merge(parse_config(final.format(m=tmp_path / "lin")), tmp_path / "direct", MergeOptions(seed=0, fsync=False))
    assert _sha(tmp_path / "out") == _sha(tmp_path / "direct")
    # the adapter's files are part of the stage identity
    copy = tmp_path / "pattern2"
    copy.mkdir()
    for f in (LORA / "adapters" / "pattern").iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 15}))
    other = identities(parse_recipe(stage + "---\n" + final.format(m="lin").replace("./adapters/pattern", str(copy))),
                       MergeOptions(seed=0))
    assert other[None] != ids[None] and other["lin"] == ids["lin"]


def test_every_read_path_gives_the_same_adapted_values(workdir, monkeypatch):
    """padded (the merge), chunk (whole-row reads, della) and rows (vocabulary alignment) agree."""
    from superswallow_jax.stream import InputFetcher

    monkeypatch.chdir(workdir)
    with build_plan(load_config(LORA / "configs" / "tiny-linear.yaml")) as plan:
        fetch = InputFetcher(plan)
        for name in ("model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"):
            step = plan.step(name)
            assert step.sources[0].adapt.delta is not None
            rows, cols = step.shape
            full = np.asarray(fetch.padded(step, 0, 0, step.numel, step.numel)).reshape(rows, cols)
            a, b = cols + 5, 3 * cols + 17  # starts and ends inside rows
            assert np.array_equal(fetch.chunk(step, 0, a, b), full.reshape(-1)[a:b])
            got = np.asarray(fetch.padded(step, 0, a, b, 2048))
            assert np.array_equal(got[: b - a], full.reshape(-1)[a:b]) and not got[b - a:].any()
            ids = np.array([7, 3, 4, 5, rows - 1])
            assert np.array_equal(fetch._rows(step, 0, ids), full[ids])


def test_adapter_by_hub_id_from_the_cache(workdir, tmp_path, monkeypatch):
    """``base+org/name``: the adapter found in the Hugging Face cache, as models are; same bytes as by path."""
    from .test_published import _hub_cache

    hub = tmp_path / "hub"
    _hub_cache(hub, "someone/swallow-lora-r8", LORA / "adapters" / "r8")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.delenv("SUPERSWALLOW_MODEL_CACHE", raising=False)
    monkeypatch.chdir(workdir)
    text = (LORA / "configs" / "linear-r8.yaml").read_text()
    run_merge(parse_config(text.replace("./adapters/r8", "someone/swallow-lora-r8")), tmp_path / "out",
              MergeOptions(seed=0, fsync=False))
    assert _sha(tmp_path / "out") == RECORD["configs"]["linear-r8.yaml"]["tensors"]
    files = json.loads((tmp_path / "out" / "merge_manifest.json").read_text())["input_files_sha256"]
    assert "./models/swallow+someone/swallow-lora-r8/adapter/adapter_model.safetensors" in files


def test_adapter_by_hub_id_is_downloaded_adapter_files_only(workdir, tmp_path, monkeypatch):
    """``base+org/name`` not in the cache: huggingface_hub fetches adapter_config.json and the weights
    (not the repo's other files); the bytes are those of the adapter by path; offline, the cache is used,
    and an adapter missing from it is one line naming the adapter."""
    from superswallow_jax.errors import ModelError
    from superswallow_jax.io.hub import HubAccess
    from superswallow_jax.verify import verify_folder

    from .hub_server import StandInHub

    r8 = LORA / "adapters" / "r8"
    files = {p.name: p.read_bytes() for p in r8.iterdir() if p.is_file()}
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("SUPERSWALLOW_MODEL_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(workdir)
    cfg = parse_config((LORA / "configs" / "linear-r8.yaml").read_text().replace("./adapters/r8", "someone/lora-r8"))
    with StandInHub() as hub:
        commit = hub.add("someone/lora-r8", {**files, "README.md": b"# card\n", "training_args.bin": b"args"})
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(ModelError, match="^adapter 'someone/lora-r8': .* not in the Hugging Face cache .*; downloads are off"):
            run_merge(cfg, tmp_path / "no", MergeOptions(seed=0, fsync=False), hub=HubAccess(offline=True))
        with pytest.raises(ModelError, match="^adapter 'someone/lora-r8': .*plan reads only cached adapters"):
            build_plan(cfg, hub=HubAccess(download=False))  # what `plan` does
        assert hub.downloads() == []
        run_merge(cfg, tmp_path / "out", MergeOptions(seed=0, fsync=False))
        got = sorted(p.rsplit("/", 1)[1] for p in hub.downloads())
        assert got == sorted(files), got
        first = json.loads((tmp_path / "out" / "merge_manifest.json").read_text())["hub_inputs"]
        assert first == {"someone/lora-r8": {"repo_id": "someone/lora-r8", "revision": None, "commit": commit}}
        # the adapter repo moves on: verify replays the recorded commit (from the cache), a new merge takes main
        conf = json.loads(files["adapter_config.json"])
        conf["lora_alpha"] = 2 * conf["lora_alpha"]
        newer = hub.add("someone/lora-r8", {**files, "adapter_config.json": json.dumps(conf).encode()})
        assert newer != commit
        rep = verify_folder(cfg, tmp_path / "out")
        assert rep.ok, [f.line() for f in rep.findings]
        import shutil

        shutil.rmtree(tmp_path / "hf")  # with an empty cache too: the recorded commit is downloaded
        rep = verify_folder(cfg, tmp_path / "out")
        assert rep.ok, [f.line() for f in rep.findings]
        shutil.rmtree(tmp_path / "hf")  # (a cached main is used as it is, as for models: cache first)
        run_merge(cfg, tmp_path / "moved", MergeOptions(seed=0, fsync=False))
        moved = json.loads((tmp_path / "moved" / "merge_manifest.json").read_text())
        assert moved["hub_inputs"]["someone/lora-r8"]["commit"] == newer
        assert moved["model_digest"] != json.loads((tmp_path / "out" / "merge_manifest.json").read_text())["model_digest"]
    assert _sha(tmp_path / "out") == RECORD["configs"]["linear-r8.yaml"]["tensors"]
    run_merge(cfg, tmp_path / "again", MergeOptions(seed=0, fsync=False), hub=HubAccess(offline=True))
    assert _sha(tmp_path / "again") == _sha(tmp_path / "moved")  # offline: what the cache holds now
