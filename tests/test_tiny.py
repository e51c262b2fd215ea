"""Tests for superswallow_jax.tiny, the generator of tiny Llama checkpoints.

Self-contained: safetensors files are read with a minimal header parser here
(not with the project's reader), so these tests check the generator alone.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from superswallow_jax import tiny
from superswallow_jax.tiny import (
    HERMES_ADDED_SPECIAL,
    HERMES_EXTRA_TOKENS,
    PRESETS,
    llama_tensor_shapes,
    make_tiny_models,
    tokenizer_tokens,
)

P = PRESETS["tiny"]
BF16 = np.dtype(ml_dtypes.bfloat16)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ---------------------------------------------------------------- helpers

def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """{name: bf16 array} of one .safetensors file (header parsed by hand)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        assert info["dtype"] == "BF16", (path, name, info["dtype"])
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], BF16).reshape(info["shape"])
    return out


def read_model(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        part = read_safetensors(f)
        assert not set(part) & set(out), f"tensor in two files: {set(part) & set(out)}"
        out.update(part)
    return out


def load_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def vocab_list(folder: Path) -> list[str]:
    vocab = load_json(folder / "tokenizer.json")["model"]["vocab"]
    inv = sorted(vocab.items(), key=lambda kv: kv[1])
    assert [i for _, i in inv] == list(range(len(inv))), "vocab ids must be 0..N-1"
    return [t for t, _ in inv]


def f32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("tiny")
    messages: list[str] = []
    made = make_tiny_models(out, seed=0, progress=messages.append)
    assert messages and all(isinstance(m, str) for m in messages)
    return made


@pytest.fixture(scope="module")
def weights(family) -> dict[str, dict[str, np.ndarray]]:
    return {name: read_model(folder) for name, folder in family.items()}


# ---------------------------------------------------------------- layout

def test_folders_and_files(family):
    assert list(family) == ["llama", "swallow", "tulu", "hermes"]
    assert len({folder.parent for folder in family.values()}) == 1
    for name, folder in family.items():
        assert folder.name == name
        for f in ("config.json", "generation_config.json", *TOKENIZER_FILES):
            assert (folder / f).is_file(), f"{name}/{f} missing"
        if name == "tulu":
            assert not (folder / "model.safetensors").exists()
        else:
            assert [p.name for p in folder.glob("*.safetensors")] == ["model.safetensors"]


def test_config_is_llama(family):
    for name, folder in family.items():
        cfg = load_json(folder / "config.json")
        assert cfg["model_type"] == "llama"
        assert cfg["architectures"] == ["LlamaForCausalLM"]
        assert cfg["torch_dtype"] == "bfloat16"
        assert cfg["tie_word_embeddings"] is False
        assert cfg["num_key_value_heads"] < cfg["num_attention_heads"], "expected GQA"
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "rms_norm_eps",
                    "max_position_embeddings", "rope_theta", "bos_token_id", "eos_token_id"):
            assert key in cfg, key
        assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)


def test_shapes_match_config(family, weights):
    expected_rows = {"llama": 500, "swallow": 600, "tulu": 500,
                     "hermes": 500 + len(HERMES_EXTRA_TOKENS) + len(HERMES_ADDED_SPECIAL)}
    for name, folder in family.items():
        cfg = load_json(folder / "config.json")
        w = weights[name]
        v, h = cfg["vocab_size"], cfg["hidden_size"]
        assert v == expected_rows[name]
        head_dim = h // cfg["num_attention_heads"]
        kv = cfg["num_key_value_heads"] * head_dim
        names = [n for n, _ in llama_tensor_shapes(P, v)]
        assert sorted(w) == sorted(names)
        assert w["model.embed_tokens.weight"].shape == (v, h)
        assert w["lm_head.weight"].shape == (v, h)
        assert w["model.norm.weight"].shape == (h,)
        for i in range(cfg["num_hidden_layers"]):
            pre = f"model.layers.{i}."
            assert w[pre + "self_attn.q_proj.weight"].shape == (h, h)
            assert w[pre + "self_attn.k_proj.weight"].shape == (kv, h)
            assert w[pre + "self_attn.v_proj.weight"].shape == (kv, h)
            assert w[pre + "self_attn.o_proj.weight"].shape == (h, h)
            assert w[pre + "mlp.gate_proj.weight"].shape == (cfg["intermediate_size"], h)
            assert w[pre + "mlp.up_proj.weight"].shape == (cfg["intermediate_size"], h)
            assert w[pre + "mlp.down_proj.weight"].shape == (h, cfg["intermediate_size"])
            assert w[pre + "input_layernorm.weight"].shape == (h,)
            assert w[pre + "post_attention_layernorm.weight"].shape == (h,)
        # tokenizer size == embedding rows
        tok = load_json(folder / "tokenizer.json")
        ids = set(tok["model"]["vocab"].values()) | {t["id"] for t in tok["added_tokens"]}
        assert ids == set(range(v))


def test_safetensors_headers_are_only_8_byte_padded(family):
    # Files as written by other tools: header length padded to 8, not more;
    # "format": "pt" metadata as transformers expects.
    for folder in family.values():
        for f in folder.glob("*.safetensors"):
            raw = f.read_bytes()
            (n,) = struct.unpack("<Q", raw[:8])
            assert n % 8 == 0
            header = json.loads(raw[8:8 + n])
            assert header["__metadata__"] == {"format": "pt"}
            end = max(info["data_offsets"][1] for k, info in header.items() if k != "__metadata__")
            assert len(raw) == 8 + n + end


def test_tulu_is_sharded_with_valid_index(family):
    folder = family["tulu"]
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    n = len(shards)
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors"
                                        for i in range(1, n + 1)]
    index = load_json(folder / "model.safetensors.index.json")
    wm = index["weight_map"]
    assert set(wm.values()) == {s.name for s in shards}
    total = 0
    for s in shards:
        part = read_safetensors(s)
        assert sorted(part) == sorted(k for k, v in wm.items() if v == s.name)
        total += sum(a.nbytes for a in part.values())
    assert index["metadata"]["total_size"] == total
    cfg = load_json(folder / "config.json")
    assert sorted(wm) == sorted(n for n, _ in llama_tensor_shapes(P, cfg["vocab_size"]))


# ---------------------------------------------------------------- tokenizers

def test_tokenizer_json_is_llama_style_bpe(family):
    for name, folder in family.items():
        tok = load_json(folder / "tokenizer.json")
        model = tok["model"]
        assert model["type"] == "BPE"
        assert model["byte_fallback"] is True and model["fuse_unk"] is True
        assert model["unk_token"] == "<unk>"
        vocab = model["vocab"]
        assert [vocab["<unk>"], vocab["<s>"], vocab["</s>"]] == [0, 1, 2]
        assert [vocab[f"<0x{b:02X}>"] for b in range(256)] == list(range(3, 259))
        assert vocab["\u2581"] == 259
        norms = tok["normalizer"]["normalizers"]
        assert norms[0] == {"type": "Prepend", "prepend": "\u2581"}
        assert norms[1]["type"] == "Replace" and norms[1]["content"] == "\u2581"
        assert [d["type"] for d in tok["decoder"]["decoders"]] == \
            ["Replace", "ByteFallback", "Fuse", "Strip"]
        specials = [(t["id"], t["content"], t["special"]) for t in tok["added_tokens"]]
        assert specials[:3] == [(0, "<unk>", True), (1, "<s>", True), (2, "</s>", True)]


def test_merges_consistent_with_vocab(family):
    for name, folder in family.items():
        model = load_json(folder / "tokenizer.json")["model"]
        vocab, merges = model["vocab"], model["merges"]
        assert merges, name
        seen = set()
        for m in merges:
            a, b = m.split(" ")
            assert a in vocab and b in vocab and a + b in vocab, (name, m)
            assert a + b not in seen, ("duplicate merge result", name, m)
            seen.add(a + b)
            # parts exist before the merged token (rank order is usable)
            assert vocab[a] < vocab[a + b] and vocab[b] < vocab[a + b], (name, m)


def test_swallow_vocab_extends_llama(family):
    llama, swallow = vocab_list(family["llama"]), vocab_list(family["swallow"])
    assert len(llama) == P.base_vocab == 500
    assert len(swallow) == P.base_vocab + P.ext_vocab == 600
    assert swallow[:500] == llama  # same ids for the shared prefix
    ext = swallow[500:]
    assert not set(ext) & set(llama)
    assert {"あ", "ん", "日本語", "です"} <= set(ext)
    lm = load_json(family["llama"] / "tokenizer.json")["model"]["merges"]
    sm = load_json(family["swallow"] / "tokenizer.json")["model"]["merges"]
    assert sm[:len(lm)] == lm and len(sm) > len(lm)
    assert vocab_list(family["tulu"]) == llama
    assert load_json(family["tulu"] / "tokenizer.json") == load_json(family["llama"] / "tokenizer.json")


def test_hermes_adds_tokens_some_shared_with_swallow(family):
    llama, hermes = vocab_list(family["llama"]), vocab_list(family["hermes"])
    swallow_ext = set(vocab_list(family["swallow"])[500:])
    assert hermes == llama + list(HERMES_EXTRA_TOKENS)
    tok = load_json(family["hermes"] / "tokenizer.json")
    added = {t["content"]: t["id"] for t in tok["added_tokens"] if t["id"] > 2}
    assert added == {t: len(hermes) + i for i, t in enumerate(HERMES_ADDED_SPECIAL)}
    extra = list(HERMES_EXTRA_TOKENS) + list(HERMES_ADDED_SPECIAL)
    shared = [t for t in extra if t in swallow_ext]
    new = [t for t in extra if t not in swallow_ext and t not in llama]
    assert len(shared) == 5 and len(new) == 5
    cfg = load_json(family["hermes"] / "tokenizer_config.json")
    assert cfg["additional_special_tokens"] == list(HERMES_ADDED_SPECIAL)
    assert set(cfg["added_tokens_decoder"]) == {"0", "1", "2", "508", "509"}


def test_tokenizer_config_and_special_map(family):
    for name, folder in family.items():
        cfg = load_json(folder / "tokenizer_config.json")
        assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
        assert (cfg["bos_token"], cfg["eos_token"], cfg["unk_token"]) == ("<s>", "</s>", "<unk>")
        assert cfg["add_bos_token"] is True
        assert "{% for message in messages %}" in cfg["chat_template"]
        dec = cfg["added_tokens_decoder"]
        assert dec["0"]["content"] == "<unk>" and dec["2"]["special"] is True
        smap = load_json(folder / "special_tokens_map.json")
        assert smap["bos_token"]["content"] == "<s>"


def test_1p3gb_preset_vocab_and_layout_without_generating():
    p = PRESETS["1.3gb"]
    llama = tokenizer_tokens("1.3gb", "llama")
    swallow = tokenizer_tokens("1.3gb", "swallow")
    assert len(llama["tokens"]) == 32000 and len(swallow["tokens"]) == 43176
    assert swallow["tokens"][:32000] == llama["tokens"]
    index = {t: i for i, t in enumerate(swallow["tokens"])}
    assert all(a in index and b in index and a + b in index for a, b in swallow["merges"])
    for model, rows in (("swallow", 43176), ("tulu", 32000)):
        shapes = llama_tensor_shapes(p, rows)
        nbytes = sum(int(np.prod(s)) * 2 for _, s in shapes)
        assert 1.1e9 < nbytes < 1.45e9
        shards = tiny._plan_shards(shapes, p.max_shard_bytes)
        assert len(shards) >= 3
        for names in shards:
            assert sum(int(np.prod(dict(shapes)[n])) * 2 for n in names) <= p.max_shard_bytes
    assert p.models == ("swallow", "tulu")


def test_7b_preset_has_llama2_7b_shapes_without_generating():
    p = PRESETS["7b"]
    for model, rows in (("swallow", 43176), ("tulu", 32000)):
        shapes = llama_tensor_shapes(p, rows)
        params = sum(int(np.prod(s)) for _, s in shapes)
        # Llama-2-7B has 6,738,415,616 parameters; Swallow adds 11176 rows to embed_tokens and lm_head
        assert params == 6_738_415_616 + 2 * (rows - 32000) * 4096
        shards = tiny._plan_shards(shapes, p.max_shard_bytes)
        assert len(shards) == 3
    assert dict(shapes)["model.layers.31.mlp.up_proj.weight"] == (11008, 4096)


# ---------------------------------------------------------------- values

def test_value_statistics(weights):
    w = weights["llama"]
    q = f32(w["model.layers.0.self_attn.q_proj.weight"])
    assert abs(q.mean()) < 2e-3 and 0.018 < q.std() < 0.022
    norm = f32(w["model.layers.0.input_layernorm.weight"])
    assert 0.9 < norm.mean() < 1.1
    for arr in w.values():
        assert np.isfinite(f32(arr)).all()


@pytest.mark.parametrize("model", ["swallow", "tulu", "hermes"])
def test_fine_tune_deltas_small_but_nonzero(weights, model):
    base, ft = weights["llama"], weights[model]
    for name, a in base.items():
        b = ft[name]
        if b.shape != a.shape:  # embed / lm_head: compare the shared rows
            assert b.shape[0] > a.shape[0]
            b = b[: a.shape[0]]
        a32, b32 = f32(a), f32(b)
        rel = np.linalg.norm(b32 - a32) / np.linalg.norm(a32)
        assert 1e-3 < rel < 0.05, (model, name, rel)
        assert np.mean(a32 != b32) > 0.5, (model, name)


def test_new_rows_are_not_copies(weights):
    for model, n_new in (("swallow", 100), ("hermes", 10)):
        emb = f32(weights[model]["model.embed_tokens.weight"])
        new = emb[500:]
        assert new.shape[0] == n_new
        assert 0.01 < new.std() < 0.03
        assert not np.any(np.all(new[:, None, :] == emb[None, :500, :], axis=-1))


def test_models_differ_from_each_other(weights):
    name = "model.layers.1.mlp.down_proj.weight"
    arrays = {m: f32(w[name]) for m, w in weights.items()}
    models = list(arrays)
    for i, m in enumerate(models):
        for n in models[i + 1:]:
            assert not np.array_equal(arrays[m], arrays[n]), (m, n)
    # deltas are independent (not the same noise scaled)
    d_tulu = arrays["tulu"] - arrays["llama"]
    d_hermes = arrays["hermes"] - arrays["llama"]
    corr = np.corrcoef(d_tulu.ravel(), d_hermes.ravel())[0, 1]
    assert abs(corr) < 0.2


# ---------------------------------------------------------------- determinism

def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_deterministic_for_seed(family, tmp_path):
    again = make_tiny_models(tmp_path / "same", seed=0, workers=1)
    for name in family:
        assert _file_bytes(again[name]) == _file_bytes(family[name]), name
    other = make_tiny_models(tmp_path / "other", seed=1, models=["llama", "tulu"])
    for name in other:
        a, b = _file_bytes(other[name]), _file_bytes(family[name])
        assert a.keys() == b.keys()
        for f in a:
            if f.endswith(".safetensors"):
                assert a[f] != b[f], (name, f)
            else:
                assert a[f] == b[f], (name, f)  # configs/tokenizers do not depend on seed


def test_regenerate_in_place_and_refuse_foreign_folder(tmp_path):
    made = make_tiny_models(tmp_path, models=["tulu"])
    stale = made["tulu"] / "model-00009-of-00009.safetensors"
    stale.write_bytes(b"stale")
    make_tiny_models(tmp_path, models=["tulu"])  # replaces our own folder
    assert not stale.exists()
    (tmp_path / "foreign" / "llama").mkdir(parents=True)
    (tmp_path / "foreign" / "llama" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        make_tiny_models(tmp_path / "foreign", models=["llama"])
    assert (tmp_path / "foreign" / "llama" / "notes.txt").read_text() == "keep me"


def test_bad_arguments(tmp_path):
    from superswallow_jax.errors import ConfigError

    with pytest.raises(ConfigError):
        make_tiny_models(tmp_path, preset="huge")
    with pytest.raises(ConfigError):
        make_tiny_models(tmp_path, seed=-1)
    with pytest.raises(ConfigError):
        make_tiny_models(tmp_path, models=["mistral"])


@pytest.mark.parametrize("args, needle", [(["--preset", "huge"], "unknown preset 'huge'"),
                                          (["--model", "mistral"], "unknown model(s) ['mistral']")])
def test_cli_bad_arguments_are_one_line_errors(tmp_path, args, needle):
    from typer.testing import CliRunner

    from superswallow_jax.cli import app

    res = CliRunner().invoke(app, ["tiny", str(tmp_path / "m"), *args])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]


def test_cli_builds_only_the_models_asked_for(tmp_path):
    from typer.testing import CliRunner

    from superswallow_jax.cli import app

    res = CliRunner().invoke(app, ["tiny", str(tmp_path / "m"), "--model", "hermes", "--model", "llama"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["hermes", "llama"]


# ---------------------------------------------------------------- optional oracle

_ORACLE = os.environ.get("SUPERSWALLOW_ORACLE_PYTHON", "/work/oracle/venv/bin/python")

_ORACLE_SCRIPT = r"""
import json, sys
from tokenizers import Tokenizer
root = sys.argv[1]
out = {}
for m in ("llama", "swallow", "tulu", "hermes"):
    t = Tokenizer.from_file(f"{root}/{m}/tokenizer.json")
    enc = t.encode("Hello the world です <|im_start|>")
    out[m] = {"size": t.get_vocab_size(), "tokens": enc.tokens,
              "roundtrip": t.decode(enc.ids, skip_special_tokens=False)}
print(json.dumps(out))
"""


@pytest.mark.skipif(not Path(_ORACLE).is_file(), reason="no oracle venv with `tokenizers`")
def test_tokenizers_package_loads_files(family):
    root = family["llama"].parent
    res = subprocess.run([_ORACLE, "-c", _ORACLE_SCRIPT, str(root)], capture_output=True,
                         text=True, timeout=120)
    if res.returncode != 0 and "No module named 'tokenizers'" in res.stderr:
        pytest.skip("oracle python lacks `tokenizers`")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert {m: o["size"] for m, o in out.items()} == \
        {"llama": 500, "swallow": 600, "tulu": 500, "hermes": 510}
    assert "です" in out["swallow"]["tokens"]
    assert "です" not in out["llama"]["tokens"] and "<0xE3>" in out["llama"]["tokens"]
    assert "<|im_start|>" in out["hermes"]["tokens"]
    assert out["llama"]["tokens"][:3] == ["<s>", "▁H", "e"]
    assert "▁the" in out["llama"]["tokens"]
