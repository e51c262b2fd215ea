"""Tokenizer merging and embedding alignment (superswallow_jax.tokenizer).

The fixtures are tiny BPE tokenizers written into ``tmp_path``. The expected
union/base/model-key vocabularies, flags and every aligned embedding matrix of
the three-model fixture were checked against mergekit 0.1.5 (transformers 5.24,
torch 2.13 CPU); the tests below pin those results with hand-checkable values.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from superswallow_jax.errors import ConfigError, TokenizerError
from superswallow_jax.tokenizer import (
    OutputTokenizer,
    TokenOverride,
    align_embeddings,
    build_output_tokenizer,
    load_model_tokenizer,
    overrides_from_config,
    write_tokenizer,
)
from superswallow_jax.host.torch_sum import TorchDim0Sum

BF16 = ml_dtypes.bfloat16


# ------------------------------------------------------------------ fixtures


def _bpe_json(vocab: list[str], merges: list[tuple[str, str]], added: list[tuple[int, str, bool]]) -> dict:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": not sp, "special": sp}
            for i, c, sp in added
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(vocab)}, "merges": [list(m) for m in merges],
        },
    }


def _write_model(root: Path, name: str, vocab, merges, added, cfg_extra=None, stm=None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "tokenizer.json").write_text(json.dumps(_bpe_json(vocab, merges, added)))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 512,
        "added_tokens_decoder": {
            str(i): {"content": c, "single_word": False, "lstrip": False, "rstrip": False,
                     "normalized": not sp, "special": sp}
            for i, c, sp in added
        },
    }
    cfg.update(cfg_extra or {})
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    if stm is not None:
        (d / "special_tokens_map.json").write_text(json.dumps(stm))
    return d


BASE_V = ["<s>", "</s>", "<unk>", "a", "b", "c", "d", "e", "f", "g", "ab", "cd", "abc", "x", "PADX", "gx"]
BASE_M = [("a", "b"), ("c", "d"), ("ab", "c"), ("g", "x")]  # "g x" produces "gx" (id 15, stripped)
O1_V = ["<s>", "</s>", "<unk>", "a", "b", "c", "d", "h", "i", "ab", "hi", "cd", "ghost", "z", "PADX"]
O2_V = ["<unk>", "<s>", "</s>", "z", "y", "x", "a", "zy", "h", "i", "hi"]
SPECIAL3 = [(0, "<s>", True), (1, "</s>", True), (2, "<unk>", True)]
CVS = {"base": 14, "o1": 16, "o2": 14}  # config.json vocab sizes


@pytest.fixture()
def three(tmp_path):
    """base (stripped to 14: PADX, gx, <extra> go; pad_token PADX), o1, o2."""
    _write_model(
        tmp_path, "base", BASE_V, BASE_M, SPECIAL3 + [(14, "PADX", True), (16, "<extra>", True)],
        cfg_extra={"pad_token": "PADX"},
        stm={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "PADX"},
    )
    _write_model(tmp_path, "o1", O1_V, [("a", "b"), ("h", "i"), ("c", "d")],
                 SPECIAL3 + [(15, "<im>", True), (16, "<big>", True)])
    _write_model(tmp_path, "o2", O2_V, [("z", "y"), ("h", "i")],
                 [(0, "<unk>", True), (1, "<s>", True), (2, "</s>", True), (11, "<im>", False),
                  (12, "<o2tok>", False), (13, "ab", True)])
    return {k: load_model_tokenizer(tmp_path / k, CVS[k]) for k in CVS}


KEYS = ["base", "o1", "o2"]

# Union of the fixture in our documented order. mergekit 0.1.5 gives the same
# set with the same base ids (0..14) and flags; its appended order is random.
UNION = ["<s>", "</s>", "<unk>", "a", "b", "c", "d", "e", "f", "g", "ab", "cd", "abc", "x",
         "PADX",  # stripped, re-added by the save/reload (pad_token)
         "h", "i", "hi", "ghost", "z",  # o1 ordinary tokens, ascending o1 id
         "y", "zy",  # o2 ordinary tokens not yet present
         "<im>", "<o2tok>"]  # added tokens (o1's <im> definition wins); <big> id 16 >= 16 skipped


def _union(t, overrides=None, pad=None):
    return build_output_tokenizer("union", t["base"], [t["o1"], t["o2"]], KEYS, overrides or {}, pad)


def _added(out: OutputTokenizer) -> dict:
    return {e["content"]: e for e in out.tokenizer_json["added_tokens"]}


# ------------------------------------------------------------------ loading


def test_missing_tokenizer_json_names_folder(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(TokenizerError, match=str(d)) as ei:
        load_model_tokenizer(d, 10)
    assert "tokenizer.json" in str(ei.value) and "\n" not in str(ei.value)
    (d / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(TokenizerError, match="sentencepiece") as ei:
        load_model_tokenizer(d, 10)
    assert str(d) in str(ei.value)
    with pytest.raises(TokenizerError, match="not found"):
        load_model_tokenizer(tmp_path / "nope", 10)
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_model_tokenizer(d, 10)


def test_load_applies_transformers_v5_config_tokens(tmp_path):
    dec = {
        "0": {"content": "<s>", "special": True, "normalized": False, "lstrip": False, "rstrip": False, "single_word": False},
        "30": {"content": "<d30>", "special": False, "normalized": True, "lstrip": True, "rstrip": False, "single_word": False},
        "20": {"content": "<d20>", "special": True, "normalized": False, "lstrip": False, "rstrip": True, "single_word": False},
    }
    d = _write_model(tmp_path, "m", BASE_V[:14], [("a", "b")], SPECIAL3,
                     cfg_extra={"added_tokens_decoder": dec, "pad_token": "<pp>", "additional_special_tokens": ["b", "<ad>"]},
                     stm={"mask_token": "<ignored>"})
    mt = load_model_tokenizer(d, 14)
    # decoder entries in id order, then attributes, then additional; special_tokens_map ignored
    assert [mt.vocab[t] for t in ("<d20>", "<d30>", "<pp>", "<ad>")] == [14, 15, 16, 17]
    assert "<ignored>" not in mt.vocab
    assert mt.added["<d30>"]["lstrip"] and not mt.added["<d30>"]["special"]
    assert mt.added["b"]["id"] == 4 and mt.added["b"]["special"] and not mt.added["b"]["normalized"]
    assert len(mt.vocab) == 18 and mt.config_vocab_size == 14


# ------------------------------------------------------------------ building


def test_union_keeps_base_ids_and_documented_order(three):
    out = _union(three)
    assert list(out.tokens) == UNION
    assert out.padded_vocab_size == len(UNION)
    assert out.source == "union"
    for t, i in three["base"].vocab.items():
        if i < CVS["base"]:
            assert out.tokens[i] == t
    add = _added(out)
    assert add["h"] == {"id": 15, "content": "h", "single_word": False, "lstrip": False, "rstrip": False,
                        "normalized": True, "special": False}
    assert add["<im>"]["special"] and not add["<im>"]["normalized"]  # o1's definition, not o2's
    assert not add["<o2tok>"]["special"]
    assert add["ab"]["id"] == 10 and add["ab"]["special"]  # o2's special "ab" registered at the base id
    # PADX: re-added as special, then o1's ordinary PADX rewrites its flags (as add_tokens does)
    assert add["PADX"]["id"] == 14 and add["PADX"]["normalized"] and not add["PADX"]["special"]
    assert "<big>" not in out.tokens and "<extra>" not in out.tokens and "gx" not in out.tokens


def test_union_order_is_deterministic(three, tmp_path):
    first = _union(three).tokens
    assert _union(three).tokens == first
    # the order of entries inside the JSON files does not matter, only ids do
    src = tmp_path / "o1"
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["model"]["vocab"] = dict(reversed(list(tj["model"]["vocab"].items())))
    tj["added_tokens"].reverse()
    shuffled = _write_model(tmp_path / "s", "o1", O1_V, [], [])
    (shuffled / "tokenizer.json").write_text(json.dumps(tj))
    (shuffled / "tokenizer_config.json").write_text((src / "tokenizer_config.json").read_text())
    o1s = load_model_tokenizer(shuffled, CVS["o1"])
    out = build_output_tokenizer("union", three["base"], [o1s, three["o2"]], KEYS, {}, None)
    assert out.tokens == first
    # other models are walked in the given (config) order
    swapped = build_output_tokenizer("union", three["base"], [three["o2"], three["o1"]], ["base", "o2", "o1"], {}, None)
    assert list(swapped.tokens[15:]) == ["z", "y", "zy", "h", "i", "hi", "ghost", "<im>", "<o2tok>"]
    assert _added(swapped)["<im>"]["special"] is False  # now o2's definition wins


def test_stripping(three):
    out = build_output_tokenizer("base", three["base"], [three["o1"], three["o2"]], KEYS, {}, None)
    assert list(out.tokens) == BASE_V[:14]
    tj = out.tokenizer_json
    assert set(tj["model"]["vocab"]) == set(BASE_V[:14])
    assert [e["content"] for e in tj["added_tokens"]] == ["<s>", "</s>", "<unk>"]
    assert tj["model"]["merges"] == [["a", "b"], ["c", "d"], ["ab", "c"]]  # "g x" -> stripped "gx" dropped
    # base: the dangling pad_token reference is dropped so the files reload with exactly these tokens
    assert "pad_token" not in out.tokenizer_config and "pad_token" not in out.special_tokens_map
    assert set(out.tokenizer_config["added_tokens_decoder"]) == {"0", "1", "2"}
    # the input is untouched
    assert "PADX" in three["base"].tokenizer_json["model"]["vocab"]


def test_strip_non_bpe_raises(tmp_path):
    d = _write_model(tmp_path, "wl", ["<unk>", "a", "b", "c"], [], [], cfg_extra={"bos_token": None, "eos_token": None})
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["model"] = {"type": "WordLevel", "vocab": tj["model"]["vocab"], "unk_token": "<unk>"}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    mt = load_model_tokenizer(d, 3)
    with pytest.raises(TokenizerError, match="only BPE"):
        build_output_tokenizer("base", mt, [], ["wl"], {}, None)
    ok = load_model_tokenizer(d, 4)  # nothing to strip: fine
    assert build_output_tokenizer("base", ok, [], ["wl"], {}, None).tokens == ("<unk>", "a", "b", "c")


def test_model_key_source_and_override_tokens(three):
    ov = overrides_from_config({"NEW": {"source": {"kind": "zero"}}, "a": {"source": {"kind": "zero"}}}, KEYS)
    out = build_output_tokenizer("o1", three["base"], [three["o1"], three["o2"]], KEYS, ov, None)
    # o1 as is (not stripped: <big> stays), then the new override token only
    assert list(out.tokens) == O1_V + ["<im>", "<big>", "NEW"]
    assert _added(out)["NEW"]["normalized"] and not _added(out)["NEW"]["special"]
    u = _union(three, ov, pad=8)
    assert u.tokens[-1] == "NEW" and len(u.tokens) == len(UNION) + 1 and u.padded_vocab_size == 32
    with pytest.raises(TokenizerError, match="not one of the merged models"):
        build_output_tokenizer("o3", three["base"], [three["o1"], three["o2"]], KEYS, {}, None)


def test_overrides_from_config_errors():
    with pytest.raises(ConfigError, match="tokenizer.tokens.t.source"):
        overrides_from_config({"t": {"source": "nope"}}, KEYS)
    with pytest.raises(ConfigError, match="exactly one of token_id and token"):
        overrides_from_config({"t": {"source": {"kind": "model_token", "model": "o1"}}}, KEYS)
    with pytest.raises(ConfigError, match="kind"):
        overrides_from_config({"t": {"source": {"kind": "bogus"}}}, KEYS)
    ov = overrides_from_config({"t": {"source": {"kind": "model_token", "model": "o1", "token": "h"}, "force": True}}, KEYS)
    assert ov == {"t": TokenOverride("model_token", model="o1", token="h", force=True)}


# ------------------------------------------------------------------ alignment


def _mats(dtype=np.float32, hidden=4):
    """Row r of model k = [100*k_index + r, ...] (distinct, exact in bf16 for these sizes)."""
    out = {}
    for mi, k in enumerate(KEYS):
        rows = CVS[k]
        base = (np.arange(rows)[:, None] + 32 * mi + np.arange(hidden)[None, :] / 8).astype(np.float32)
        out[k] = base.astype(dtype)
    return out


def _reader(mats, order):
    return lambda j, ids: mats[order[j]][ids]


def test_permutation_values(three):
    out = _union(three)
    al = align_embeddings(out, [three[k] for k in KEYS], KEYS, 0, {})
    p = {k: dict(zip(out.tokens, al.permutation(i).tolist())) for i, k in enumerate(KEYS)}
    assert [p["base"][t] for t in UNION[:14]] == list(range(14))
    assert p["base"]["PADX"] == -1 and p["base"]["h"] == -1
    assert p["o1"]["PADX"] == 14 and p["o1"]["ghost"] == 12 and p["o1"]["e"] == -1 and p["o1"]["<im>"] == 15
    assert p["o2"]["<s>"] == 1 and p["o2"]["x"] == 5 and p["o2"]["<im>"] == 11 and p["o2"]["ab"] == 13
    assert al.permutation(0).dtype == np.int64 and not al.permutation(0).flags.writeable


def test_default_rules(three):
    out = _union(three)
    al = align_embeddings(out, [three[k] for k in KEYS], KEYS, 0, {})
    kinds = {t: al.default_kind(o) for o, t in enumerate(out.tokens)}
    assert kinds["a"] == "none"  # every model has it
    assert kinds["ghost"] == "row" and kinds["y"] == "row"  # single owner
    assert kinds["e"] == "row" and kinds["b"] == "row"  # e: base only; b: base + o1 -> base
    assert kinds["hi"] == "mean" and kinds["<im>"] == "mean"  # o1 + o2, base lacks
    assert kinds["<o2tok>"] == "row"
    mats = _mats()
    rr = _reader(mats, KEYS)
    rows = {k: al.aligned_rows(i, 0, al.rows, rr, np.float32) for i, k in enumerate(KEYS)}
    v = {t: o for o, t in enumerate(out.tokens)}
    for k in KEYS:  # a model's own rows are copied
        assert np.array_equal(rows[k][v["a"]], mats[k][three[k].vocab["a"]])
    np.testing.assert_array_equal(rows["base"][v["ghost"]], mats["o1"][12])
    np.testing.assert_array_equal(rows["o2"][v["ghost"]], mats["o1"][12])
    np.testing.assert_array_equal(rows["o2"][v["b"]], mats["base"][4])  # base's row, not o1's
    np.testing.assert_array_equal(rows["o1"][v["e"]], mats["base"][7])
    mean = (mats["o1"][10] + mats["o2"][10]) / np.float32(2)
    np.testing.assert_array_equal(rows["base"][v["hi"]], mean)
    np.testing.assert_array_equal(rows["o1"][v["hi"]], mats["o1"][10])  # o1 keeps its own
    # without a base the two-owner tokens are averaged
    al_nb = align_embeddings(out, [three[k] for k in KEYS], KEYS, None, {})
    assert al_nb.default_kind(v["b"]) == "mean"
    # a token in no model (o3-only override token) is zero
    ov = overrides_from_config({"NEW": {"source": {"kind": "zero"}}}, KEYS)
    out2 = _union(three, ov)
    al2 = align_embeddings(out2, [three[k] for k in KEYS], KEYS, 0, {})
    assert al2.default_kind(len(out2.tokens) - 1) == "zero"
    assert not al2.aligned_rows(1, len(out2.tokens) - 1, len(out2.tokens), rr, np.float32).any()


def test_mean_arithmetic_bf16_matches_torch_rules(tmp_path):
    """3 owners, no base: zeros + 1 + 2^-8 + 2^-8, each add rounded to bf16,
    then / 3 in f32 and rounded: bf16(1/3) = 0.333984375, not 0.3359375
    (what f32 accumulation would give)."""
    v = ["<unk>", "a", "t"]
    for name in ("m0", "m1", "m2", "b"):
        _write_model(tmp_path, name, v if name != "b" else v[:2], [], [], cfg_extra={"bos_token": None, "eos_token": None})
    mts = [load_model_tokenizer(tmp_path / n, 3 if n != "b" else 2) for n in ("b", "m0", "m1", "m2")]
    out = build_output_tokenizer("union", mts[0], mts[1:], ["b", "m0", "m1", "m2"], {}, None)
    assert out.tokens == ("<unk>", "a", "t")
    al = align_embeddings(out, mts, ["b", "m0", "m1", "m2"], 0, {})
    vals = {0: 0.0, 1: 1.0, 2: 2.0 ** -8, 3: 2.0 ** -8}
    mats = {j: np.full((3, 2), vals[j], np.float32).astype(BF16) for j in range(4)}
    rr = lambda j, ids: mats[j][ids]  # noqa: E731
    got = al.aligned_rows(0, 2, 3, rr, BF16)
    assert got.dtype == BF16 and got[0, 0] == np.float32(0.333984375)
    # model order matters: 2^-8 + 2^-8 + 1 = 1.0078125 exactly -> /3 -> bf16 0.3359375
    al_rev = align_embeddings(out, mts[::-1], ["m2", "m1", "m0", "b"], 3, {})
    mats_rev = {3 - j: m for j, m in mats.items()}
    got_rev = al_rev.aligned_rows(3, 2, 3, lambda j, ids: mats_rev[j][ids], BF16)
    assert got_rev[0, 0] == np.float32(0.3359375)
    # -0.0 rows come out +0.0 (the mean starts from a zero row)
    mats_z = {j: np.full((3, 2), -0.0 if j else 0.0, np.float32).astype(BF16) for j in range(4)}
    z = al.aligned_rows(0, 2, 3, lambda j, ids: mats_z[j][ids], BF16)
    assert not np.signbit(z.astype(np.float32)).any()


def test_overrides_incl_force(three):
    spec = {
        "a": {"source": {"kind": "zero"}, "force": True},
        "hi": {"source": "o2", "force": True},
        "c": {"source": {"kind": "model_token", "model": "o1", "token_id": 9}},
        "NEW": {"source": {"kind": "model_token", "model": "o1", "token": "ghost"}},
        "abc": {"source": {"kind": "zero"}},  # not forced: used only where a model lacks it (o1, o2)
        "<s>": {"source": {"kind": "zero"}},  # not forced and every model has it: no effect
    }
    ov = overrides_from_config(spec, KEYS)
    out = _union(three, ov)
    al = align_embeddings(out, [three[k] for k in KEYS], KEYS, 0, ov)
    v = {t: o for o, t in enumerate(out.tokens)}
    mats = _mats()
    rr = _reader(mats, KEYS)
    rows = {k: al.aligned_rows(i, 0, al.rows, rr, np.float32) for i, k in enumerate(KEYS)}
    for k in KEYS:
        assert not rows[k][v["a"]].any() and al.forced(v["a"])
        np.testing.assert_array_equal(rows[k][v["hi"]], mats["o2"][10])
        np.testing.assert_array_equal(rows[k][v["NEW"]], mats["o1"][12])
        np.testing.assert_array_equal(rows[k][v["<s>"]], mats[k][three[k].vocab["<s>"]])
    np.testing.assert_array_equal(rows["base"][v["c"]], mats["base"][5])  # has it, not forced
    np.testing.assert_array_equal(rows["o1"][v["c"]], mats["o1"][5])
    np.testing.assert_array_equal(rows["o2"][v["c"]], mats["o1"][9])  # lacks it: row 9 of o1's matrix
    assert not rows["o2"][v["abc"]].any()
    np.testing.assert_array_equal(rows["base"][v["abc"]], mats["base"][12])

    def err(s):
        o = overrides_from_config(s, KEYS)
        return align_embeddings(_union(three, o), [three[k] for k in KEYS], KEYS, 0, o)

    with pytest.raises(TokenizerError, match="not found in model 'o2'"):
        err({"e": {"source": "o2"}})
    with pytest.raises(TokenizerError, match="out of range"):
        err({"e": {"source": {"kind": "model_token", "model": "o2", "token_id": 14}}})
    with pytest.raises(TokenizerError, match="not found"):
        err({"e": {"source": {"kind": "model_token", "model": "base", "token": "PADX"}}})  # stripped from base
    err({"a": {"source": "o2"}})  # never needed: no error (as in 0.1.5)


def test_padding_rows(three):
    out = _union(three, pad=32)
    assert out.padded_vocab_size == 32 and len(out.tokens) == 24
    al = align_embeddings(out, [three[k] for k in KEYS], KEYS, 0, {})
    assert al.rows == 32
    mats = _mats(BF16, hidden=32)
    rr = _reader(mats, KEYS)
    full = al.aligned_rows(1, 0, 32, rr, BF16)
    body = full[:24].astype(np.float32)
    # torch's f32 cascade for 24 rows: rows 0..15 summed left to right, rows
    # 16..23 summed left to right, the two partial sums added; / 24; one rounding
    first = np.zeros(32, np.float32)
    for r in body[:16]:
        first = first + r
    second = np.zeros(32, np.float32)
    for r in body[16:]:
        second = second + r
    want = ((second + first) / np.float32(24)).astype(BF16)
    for r in range(24, 32):
        assert np.array_equal(full[r].view(np.uint16), want.view(np.uint16))
    # streaming blocks give the same rows; one padding pass per (model, dtype)
    calls = []
    counting = lambda j, ids: (calls.append(len(ids)), mats[KEYS[j]][ids])[1]  # noqa: E731
    cache: dict = {}
    blocks = np.concatenate([al.aligned_rows(1, a, min(32, a + 5), counting, BF16, pad_cache=cache)
                             for a in range(0, 32, 5)])
    assert np.array_equal(blocks.view(np.uint16), full.view(np.uint16))
    n_read = sum(calls)
    al.aligned_rows(1, 30, 32, counting, BF16, pad_cache=cache)
    assert sum(calls) == n_read + 2  # cache hit: only the two probe rows are read
    # a different tensor through the same cache is detected and recomputed
    other = {k: (m.astype(np.float32) * 2).astype(BF16) for k, m in mats.items()}
    pad2 = al.aligned_rows(1, 31, 32, _reader(other, KEYS), BF16, pad_cache=cache)
    np.testing.assert_array_equal(pad2.astype(np.float32), (want.astype(np.float32) * 2)[None])


def test_torch_cascade_sum_structure():
    """32 rows [2^24, 1 x 31]: a left-to-right f32 sum loses every 1 (2^24 + 1
    rounds to 2^24); torch sums rows in blocks of 16 and adds the block sums,
    keeping the second block's 16: 2^24 + 16."""
    x = np.ones((32, 64), np.float32)
    x[0] = 2.0 ** 24
    s = TorchDim0Sum(32, 64)
    s.feed(x[:7])
    s.feed(x[7:])
    assert (s.result() == np.float32(2 ** 24 + 16)).all()
    # columns past the last 32-block use row_sum: 4 interleaved partial sums
    x2 = np.ones((32, 33), np.float32)
    x2[0] = 2.0 ** 24
    s2 = TorchDim0Sum(32, 33)
    s2.feed(x2)
    r = s2.result()
    assert r[0] == np.float32(2 ** 24 + 16)
    # lane 0 holds 2^24 (its 7 ones are lost); lanes 1..3 hold 8 each: 2^24 + 24
    assert r[32] == np.float32(2 ** 24 + 24)


def test_aligned_rows_dtypes_and_no_mutation(three):
    ov = overrides_from_config({"a": {"source": {"kind": "zero"}, "force": True}}, KEYS)
    before = copy.deepcopy(three["o1"].tokenizer_json)
    ov_before = dict(ov)
    out = _union(three, ov, pad=16)
    al = align_embeddings(out, [three[k] for k in KEYS], KEYS, 0, ov)
    assert three["o1"].tokenizer_json == before and dict(ov) == ov_before
    for dt in (BF16, np.float16, np.float32):
        mats = _mats(dt, hidden=3)
        res = al.aligned_rows(2, 0, al.rows, _reader(mats, KEYS), dt)
        assert res.dtype == np.dtype(dt) and res.shape == (32, 3)
    empty = al.aligned_rows(0, 5, 5, _reader(_mats(), KEYS), np.float32)
    assert empty.shape == (0, 4)
    with pytest.raises(ValueError):
        al.aligned_rows(0, 0, 2, _reader(_mats(), KEYS), np.float64)
    with pytest.raises(IndexError):
        al.aligned_rows(0, 0, al.rows + 1, _reader(_mats(), KEYS), np.float32)


# ------------------------------------------------------------------ writing


def test_write_round_trip(three, tmp_path):
    out = _union(three, pad=8)
    (tmp_path / "out0").mkdir()
    files = write_tokenizer(tmp_path / "out0", out, None)
    assert [f.name for f in files] == ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    tj = json.loads(files[0].read_text())
    assert tj == out.tokenizer_json
    ids = {**tj["model"]["vocab"], **{e["content"]: e["id"] for e in tj["added_tokens"]}}
    assert ids == {t: i for i, t in enumerate(out.tokens)}
    assert [e["id"] for e in tj["added_tokens"]] == sorted(e["id"] for e in tj["added_tokens"])
    cfg = json.loads(files[1].read_text())
    assert "chat_template" not in cfg and cfg["pad_token"] == "PADX"
    assert cfg["added_tokens_decoder"]["22"] == {"content": "<im>", "lstrip": False, "normalized": False,
                                                 "rstrip": False, "single_word": False, "special": True}
    assert len(cfg["added_tokens_decoder"]) == len(tj["added_tokens"])
    (tmp_path / "out1").mkdir()
    tpl = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    o1 = build_output_tokenizer("o1", three["base"], [three["o1"], three["o2"]], KEYS, {}, None)
    files1 = write_tokenizer(tmp_path / "out1", o1, tpl)
    assert [f.name for f in files1] == ["tokenizer.json", "tokenizer_config.json"]  # o1 had no special_tokens_map
    assert json.loads(files1[1].read_text())["chat_template"] == tpl
    assert o1.tokenizer_config.get("chat_template") is None  # not mutated
    # the written folder loads back as a model tokenizer with the same vocabulary
    again = load_model_tokenizer(tmp_path / "out0", out.padded_vocab_size)
    assert dict(again.vocab) == out.vocab


def test_written_files_load_in_hf_tokenizers(three, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    ov = overrides_from_config({"NEW": {"source": {"kind": "zero"}}}, KEYS)
    for source in ("union", "base", "o1", "o2"):
        out = build_output_tokenizer(source, three["base"], [three["o1"], three["o2"]], KEYS, ov, 8)
        d = tmp_path / "written" / source
        d.mkdir(parents=True)
        write_tokenizer(d, out, None)
        tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        assert tok.get_vocab() == out.vocab
        try:
            import transformers  # noqa: F401
        except ImportError:
            continue
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": out.padded_vocab_size}))
        assert transformers.AutoTokenizer.from_pretrained(str(d)).get_vocab() == out.vocab


def test_torch_mean_dim0_under_several_threads_matches_torch():
    """The column split among torch's threads (hidden % 32 != 0), against torch 2.13's own results."""
    data = json.loads((Path(__file__).parent / "fixtures" / "published" / "torch" / "mean_dim0.json").read_text())
    assert len(data["cases"]) == 28 and {c["threads"] for c in data["cases"]} == {1, 2, 3, 4}
    for c in data["cases"]:
        n, h, t = c["n"], c["hidden"], c["threads"]
        x = np.random.default_rng(n * 1000 + h).standard_normal((n, h)).astype(np.float32)
        s = TorchDim0Sum(n, h, t)
        for i in range(0, n, 700):
            s.feed(x[i:i + 700])
        got = (s.result() / np.float32(n)).astype(np.float32)
        assert got.tobytes().hex() == c["mean_f32_hex"], (n, h, t)
