"""Sentencepiece-only tokenizers (superswallow_jax.tokenizer.sentencepiece).

The fixtures ``spm/base.model`` / ``spm/ext.model`` were trained and extended
by the real sentencepiece (``scripts/make_published_fixtures.py``); the
converted tokenizer must encode like sentencepiece itself, and like
transformers v5 (whose output for these files is pinned in
``tests/fixtures/published/mergekit.json`` through mergekit's tokenizers).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2 as pb

from superswallow_jax.errors import TokenizerError
from superswallow_jax.tiny import tokenizer_tokens
from superswallow_jax.tiny_published import sentencepiece_model
from superswallow_jax.tokenizer import build_output_tokenizer, load_model_tokenizer, write_tokenizer
from superswallow_jax.tokenizer.sentencepiece import make_portable, prepend_scheme, tokenizer_json

FIX = Path(__file__).parent / "fixtures" / "published"
TEXTS = [
    "Hello world. Merging models is fun",
    "日本語のテキストです。東京は日本の首都です。",
    "def f(x):\n    return x ** 2  # code\t tabs 123456",
    "🙂🚀 café naïve Ω≈ç√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 trailing  ",
]
# Not here: runs of spaces at the very start, where transformers' conversion
# (and so mergekit's output) and sentencepiece itself merge "▁" pieces differently.


def _tok(tj: dict) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_str(json.dumps(tj))


@pytest.mark.parametrize("model", ["base.model", "ext.model"])
@pytest.mark.parametrize("text", TEXTS)
def test_converted_model_encodes_like_sentencepiece(model, text):
    sp = spm.SentencePieceProcessor(model_file=str(FIX / "spm" / model))
    tok = _tok(tokenizer_json(FIX / "spm" / model, {"legacy": False}))
    assert tok.encode(text).ids == [sp.bos_id()] + sp.encode(text)
    assert tok.get_vocab_size() == sp.get_piece_size()
    assert tok.decode(tok.encode(text).ids) == text.lstrip(" ") or text.startswith(" ")


def test_converted_added_tokens_and_pipeline():
    tj = tokenizer_json(FIX / "spm" / "ext.model", {"legacy": False})
    assert [(a["id"], a["content"], a["special"], a["normalized"]) for a in tj["added_tokens"]] == [
        (0, "<unk>", True, False), (1, "<s>", True, False), (2, "</s>", True, False)]
    assert tj["normalizer"] is None
    assert tj["pre_tokenizer"] == {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    assert tj["model"]["byte_fallback"] and tj["model"]["fuse_unk"] and tj["model"]["unk_token"] is None
    vocab = tj["model"]["vocab"]
    assert len(vocab) == 429 and vocab["日本語"] == 420
    # merges are every two-piece split, ordered by the piece's id, then by the left part's length
    merges = [tuple(m) for m in tj["model"]["merges"]]
    keys = [(vocab[a + b], len(a)) for a, b in merges]
    assert keys == sorted(keys) and all(a in vocab and b in vocab for a, b in merges)


@pytest.mark.parametrize("cfg, scheme", [
    ({}, "first"), ({"legacy": False}, "first"), ({"legacy": True}, "always"),
    ({"legacy": True, "add_prefix_space": True}, "always"), ({"add_prefix_space": False}, "never"),
    ({"add_prefix_space": False, "legacy": True}, "never"),
])
def test_prepend_scheme_follows_transformers_v5(cfg, scheme):
    assert prepend_scheme(cfg) == scheme
    tj = tokenizer_json(FIX / "spm" / "base.model", cfg)
    assert tj["pre_tokenizer"]["prepend_scheme"] == scheme
    strip = [d for d in tj["decoder"]["decoders"] if d["type"] == "Strip"]
    assert bool(strip) == (scheme != "never")


def test_post_processor_follows_add_bos_and_eos():
    tok = _tok(tokenizer_json(FIX / "spm" / "base.model", {"add_bos_token": False, "add_eos_token": True}))
    ids = tok.encode("Hello").ids
    assert ids[0] != 1 and ids[-1] == 2


def test_make_portable_writes_v5_defaults():
    cfg = {"legacy": True, "add_prefix_space": True, "tokenizer_class": "LlamaTokenizer"}
    tj = tokenizer_json(FIX / "spm" / "base.model", cfg)
    assert tj["pre_tokenizer"]["prepend_scheme"] == "always"
    make_portable(tj, cfg)
    assert cfg == {"legacy": False, "tokenizer_class": "LlamaTokenizer"}
    assert tj["pre_tokenizer"]["prepend_scheme"] == "first"
    cfg = {"add_prefix_space": False}
    make_portable(tj, cfg)
    assert cfg == {"add_prefix_space": False, "legacy": False} and tj["pre_tokenizer"]["prepend_scheme"] == "never"


def test_tiny_published_model_matches_its_conversion():
    v = tokenizer_tokens("tiny", "swallow")
    path = Path(__import__("tempfile").mkdtemp()) / "tokenizer.model"
    path.write_bytes(sentencepiece_model(v["tokens"]))
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert [sp.id_to_piece(i) for i in range(sp.get_piece_size())] == v["tokens"]
    tok = _tok(tokenizer_json(path, {"legacy": False}))
    for text in ["the world is new", "日本語のテキストです。", "Hello 123", "🙂"]:
        assert tok.encode(text).ids == [1] + sp.encode(text), text
    shutil.rmtree(path.parent)


def _proto(**changes) -> bytes:
    m = pb.ModelProto()
    m.ParseFromString((FIX / "spm" / "base.model").read_bytes())
    if "model_type" in changes:
        m.trainer_spec.model_type = changes["model_type"]
    if changes.get("duplicate"):
        m.pieces[10].piece = m.pieces[11].piece
    return m.SerializeToString()


@pytest.mark.parametrize("data, cfg, needle", [
    (b"\x00\xff garbage", None, "not a sentencepiece model"),
    (_proto(model_type=1), None, "is not BPE"),
    (_proto(duplicate=True), None, "appears twice"),
    (None, {"tokenizer_class": "T5Tokenizer"}, "tokenizer_class 'T5Tokenizer'"),
])
def test_unsupported_models_one_line(tmp_path, data, cfg, needle):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(data if data is not None else (FIX / "spm" / "base.model").read_bytes())
    with pytest.raises(TokenizerError) as ei:
        tokenizer_json(path, cfg)
    msg = str(ei.value)
    assert needle in msg and str(path) in msg and "\n" not in msg


def _model_dir(tmp_path: Path, name: str, cfg_changes: dict | None = None) -> Path:
    d = tmp_path / name
    shutil.copytree(FIX / "models" / name, d, ignore=shutil.ignore_patterns("*.bin", "*.safetensors"))
    if cfg_changes is not None:
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg.update(cfg_changes)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_load_sentencepiece_only_folder(tmp_path):
    mt = load_model_tokenizer(_model_dir(tmp_path, "swallow"), 429)
    assert mt.sentencepiece == tmp_path / "swallow" / "tokenizer.model"
    assert len(mt.vocab) == 429 and mt.vocab["東京"] == mt.model_vocab["東京"]
    assert {c: (e["id"], e["special"]) for c, e in mt.added.items()} == {
        "<unk>": (0, True), "<s>": (1, True), "</s>": (2, True)}


@pytest.mark.parametrize("cfg_changes", [None, {"legacy": True, "add_prefix_space": True}])
def test_union_output_is_portable_and_keeps_the_sentencepiece_model(tmp_path, cfg_changes):
    base = load_model_tokenizer(_model_dir(tmp_path, "swallow", cfg_changes), 429)
    other = load_model_tokenizer(_model_dir(tmp_path, "tulu"), 420)
    out = build_output_tokenizer("union", base, [other], ["s", "t"], {}, None)
    assert len(out.tokens) == 429 and out.sentencepiece_model == base.sentencepiece
    assert out.tokenizer_config["legacy"] is False and "add_prefix_space" not in out.tokenizer_config
    d = tmp_path / "out"
    d.mkdir()
    names = sorted(p.name for p in write_tokenizer(d, out, None))
    assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert (d / "tokenizer.model").read_bytes() == (FIX / "models" / "swallow" / "tokenizer.model").read_bytes()
    tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    for text in TEXTS:
        assert tok.encode(text).ids == [1] + sp.encode(text)


def test_stripped_base_writes_no_sentencepiece_model(tmp_path):
    base = load_model_tokenizer(_model_dir(tmp_path, "swallow"), 425)  # the last 4 pieces have no rows
    out = build_output_tokenizer("base", base, [], ["s"], {}, None)
    assert len(out.tokens) == 425 and out.sentencepiece_model is None
    d = tmp_path / "out"
    d.mkdir()
    assert "tokenizer.model" not in [p.name for p in write_tokenizer(d, out, None)]
