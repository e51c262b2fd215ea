"""Tier 3: merges of checkpoints as they are published (``.bin`` shards, sentencepiece-only tokenizers).

``tests/fixtures/published/models`` were saved by transformers 4.46 and real
torch; ``mergekit.json`` holds what mergekit 0.1.5 (torch 2.13, transformers
v5) wrote from them: every tensor's sha256, ``vocab_size`` and the token ids
of a multilingual text. Ours must match all three, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from superswallow_jax.config import load_config, parse_config
from superswallow_jax.io.checkpoint import Checkpoint
from superswallow_jax.merge import run_merge
from superswallow_jax.options import MergeOptions
from superswallow_jax.tiny import make_tiny_models
from superswallow_jax.tokenizer.sentencepiece import tokenizer_json

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures" / "published"
RECORD = json.loads((FIX / "mergekit.json").read_text(encoding="utf-8"))


def _tensor_sha(out: Path) -> dict:
    ck = Checkpoint(out)
    return {n: [ck.tensors[n].dtype, list(ck.tensors[n].shape),
                hashlib.sha256(np.ascontiguousarray(ck.view(n)).tobytes()).hexdigest()] for n in ck.tensors}


def _ids(out: Path, text: str) -> list[int]:
    if (out / "tokenizer.json").is_file():
        tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    else:  # files copied from the base: transformers converts its tokenizer.model
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        tok = tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json(out / "tokenizer.model", cfg)))
    return tok.encode(text).ids


@pytest.mark.parametrize("name", sorted(RECORD["configs"]))
def test_bit_exact_with_mergekit_on_published_files(name, tmp_path, monkeypatch):
    monkeypatch.chdir(FIX)  # the configs name ./models/...
    out = tmp_path / "out"
    run_merge(load_config(FIX / "configs" / name), out, MergeOptions(seed=0, fsync=False))
    rec = RECORD["configs"][name]
    ours = _tensor_sha(out)
    assert set(ours) == set(rec["tensors"])
    dt = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
    assert {n: [dt[v[0]], v[1], v[2]] for n, v in ours.items()} == rec["tensors"]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rec["vocab_size"]
    assert _ids(out, RECORD["text"]) == rec["ids"]


def test_published_twins_merge_to_the_same_model(tmp_path):
    models = tmp_path / "models"
    fast = make_tiny_models(models, models=["swallow", "tulu"])
    pub = make_tiny_models(models / "published", models=["swallow", "tulu"], published=True)
    assert Checkpoint(pub["tulu"]).format == "pytorch" and Checkpoint(pub["swallow"]).format == "safetensors"
    assert not (pub["tulu"] / "tokenizer.json").exists() and (pub["tulu"] / "tokenizer.model").is_file()
    text = (ROOT / "configs" / "superswallow-tiny-published.yaml").read_text().replace("models/", f"{models}/")
    digests = []
    for cfg_text in (text, text.replace("/published/", "/")):
        out = tmp_path / f"out-{len(digests)}"
        run_merge(parse_config(cfg_text), out, MergeOptions(seed=0, fsync=False))
        digests.append(json.loads((out / "merge_manifest.json").read_text())["model_digest"])
    assert digests[0] == digests[1] and fast["swallow"] != pub["swallow"]


def _hub_cache(root: Path, repo: str, folder: Path) -> None:
    """``folder`` stored the way huggingface_hub stores a download: blobs and snapshot symlinks."""
    org, name = repo.split("/")
    base = root / f"models--{org}--{name}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    (base / "blobs").mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, base / "blobs" / blob)
        os.symlink(f"../../blobs/{blob}", snap / f.name)


def test_published_recipe_runs_unchanged_from_a_hub_cache(tmp_path, monkeypatch):
    pub = make_tiny_models(tmp_path / "pub", models=["swallow", "tulu"], published=True)
    hub = tmp_path / "hub"
    _hub_cache(hub, "tokyotech-llm/Swallow-70b-instruct-hf", pub["swallow"])
    _hub_cache(hub, "allenai/tulu-2-dpo-70b", pub["tulu"])
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.delenv("SUPERSWALLOW_MODEL_CACHE", raising=False)
    out = tmp_path / "out"
    run_merge(load_config(ROOT / "configs" / "superswallow.yaml"), out, MergeOptions(seed=0, fsync=False))
    fast = make_tiny_models(tmp_path / "fast", models=["swallow", "tulu"])
    out2 = tmp_path / "out2"
    run_merge(parse_config((ROOT / "configs" / "superswallow-tiny.yaml").read_text()
                           .replace("models/", str(fast["swallow"].parent) + "/")), out2, MergeOptions(seed=0, fsync=False))
    m1 = json.loads((out / "merge_manifest.json").read_text())
    m2 = json.loads((out2 / "merge_manifest.json").read_text())
    assert m1["model_digest"] == m2["model_digest"]
    assert any(k.startswith("allenai/tulu-2-dpo-70b/pytorch_model-") for k in m1["input_files_sha256"])
    assert (out / "tokenizer.model").is_file() and json.loads((out / "tokenizer_config.json").read_text())["legacy"] is False
