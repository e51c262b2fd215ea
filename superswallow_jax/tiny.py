"""Generator of tiny Llama-shaped Hugging Face checkpoints for demos and tests.

Nothing is downloaded and neither torch, transformers nor the ``tokenizers``
package is needed: weights are drawn with numpy, stored as bf16
(:data:`ml_dtypes.bfloat16`) through ``safetensors.numpy.save_file`` and the
tokenizer files are written as plain JSON.

:func:`make_tiny_models` creates a small family that mirrors the real
"superswallow" recipe (Swallow + a chat vector from other Llama fine-tunes)::

    out_dir/
      llama/    the common ancestor, Llama vocabulary (V = base_vocab)
      swallow/  llama continued; vocabulary EXTENDS llama's (same ids)
                with ext_vocab Japanese tokens: punctuation, hiragana, a few
                merged words (日本語, です, ...), katakana, kanji
                (V = base_vocab + ext_vocab)
      tulu/     llama fine-tune, llama vocabulary, always SHARDED
                (model-0000i-of-0000N.safetensors + model.safetensors.index.json)
      hermes/   llama fine-tune, llama vocabulary + 10 appended tokens
                (5 also in swallow's extension, 5 new; see HERMES_EXTRA_TOKENS
                and HERMES_ADDED_SPECIAL)

Every model folder holds ``config.json`` (LlamaForCausalLM, bf16, GQA),
``generation_config.json``, ``tokenizer.json`` (Llama-style byte-fallback
BPE), ``tokenizer_config.json`` and ``special_tokens_map.json``;
``config.json``'s ``vocab_size`` equals the number of embedding rows.

Values are deterministic for a given ``seed`` and are defined tensor by
tensor and row block by row block, so any model can be generated without the
others being in memory or on disk:

* ancestor matrices ~ N(0, 0.02), ancestor norm weights ~ 1 + N(0, 0.05);
  llama stores ``bf16(ancestor)``;
* a fine-tune stores ``bf16(f32(bf16(ancestor)) + delta)`` with
  ``delta ~ N(0, (delta_rel * scale)^2)`` from the model's own random
  stream, where ``scale`` is 0.02 for matrices and 1.0 for norms;
  ``delta_rel`` is 0.02 (swallow), 0.01 (tulu) and 0.008 (hermes), so every
  model differs and ``||delta|| / ||w||`` is about ``delta_rel``.  (With a
  relative delta of 1e-3 about 78% of the bf16 elements would round back to
  the ancestor's value; 0.01 changes about 83% of them, like a real
  fine-tune where most elements move.)
* embedding / lm_head rows of tokens that the ancestor does not have are
  fresh N(0, 0.02) draws from the model's own stream.

Random numbers come from ``numpy.random.Generator(PCG64(SeedSequence(...)))``
keyed by ``(seed, model stream, crc32(tensor name), part, row block)``; the
blocks are filled on a few threads (the bytes do not depend on how many).
Peak memory is one shard (<= ``max_shard_bytes``) plus 32 MiB per thread.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from .errors import ConfigError

__all__ = [
    "HERMES_ADDED_SPECIAL",
    "HERMES_EXTRA_TOKENS",
    "MODEL_NAMES",
    "PRESETS",
    "TinyPreset",
    "llama_tensor_shapes",
    "make_tiny_models",
    "tokenizer_tokens",
]

BF16 = np.dtype(ml_dtypes.bfloat16)

#: Marker written as ``_name_or_path`` prefix in every generated config.json.
_MARKER = "superswallow_jax.tiny/"

#: All models this module knows how to build, in generation order.
MODEL_NAMES: tuple[str, ...] = ("llama", "swallow", "tulu", "hermes")

#: Ordinary vocabulary entries hermes appends after llama's vocabulary:
#: "こ", "ん", "に", "ち", "は" are also in swallow's extension (at other ids),
#: the Korean "한", "국", "어" are in no other model.
HERMES_EXTRA_TOKENS: tuple[str, ...] = ("こ", "ん", "한", "に", "국", "ち", "어", "は")
#: ChatML special tokens hermes adds after its vocabulary (``added_tokens``
#: only, like real Hermes checkpoints; not part of ``model.vocab``).
HERMES_ADDED_SPECIAL: tuple[str, ...] = ("<|im_start|>", "<|im_end|>")

_BLOCK_ELEMS = 1 << 22  # elements per random block (16 MiB of float32 scratch)
_MATRIX_STD = 0.02
_NORM_STD = 0.05


@dataclass(frozen=True)
class TinyPreset:
    """Shape and layout of a generated model family.

    Attributes:
        hidden_size: H, width of the residual stream.
        intermediate_size: I, width of the SwiGLU MLP.
        num_hidden_layers: L.
        num_attention_heads: query heads; ``head_dim = H // num_attention_heads``.
        num_key_value_heads: key/value heads (GQA: fewer than query heads).
        base_vocab: llama's vocabulary size (tulu shares it).
        ext_vocab: number of tokens swallow appends to llama's vocabulary.
        max_shard_bytes: any model whose weights exceed this is sharded.
        tulu_shard_bytes: tulu is always sharded with shards of at most this
            many bytes (a tensor larger than it gets a shard of its own).
        models: the models :func:`make_tiny_models` builds by default.
        swallow_delta, tulu_delta, hermes_delta: relative size of each
            fine-tune's delta from the ancestor (see the module docstring).
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    base_vocab: int
    ext_vocab: int
    max_shard_bytes: int
    tulu_shard_bytes: int
    models: tuple[str, ...] = MODEL_NAMES
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    swallow_delta: float = 0.02
    tulu_delta: float = 0.01
    hermes_delta: float = 0.008

    @property
    def head_dim(self) -> int:
        """Per-head width ``hidden_size // num_attention_heads``."""
        return self.hidden_size // self.num_attention_heads

    def delta_rel(self, model: str) -> float:
        """Relative fine-tune delta of ``model`` (0.0 for the ancestor llama)."""
        return {"swallow": self.swallow_delta, "tulu": self.tulu_delta,
                "hermes": self.hermes_delta}.get(model, 0.0)


#: ``"tiny"`` (default, ~0.5 MB per model, for tests), ``"1.3gb"``
#: (TinyLlama-like width, 11 layers, real Llama-2 / Swallow vocabulary sizes:
#: swallow 1.32 GB and tulu 1.23 GB in bf16, both in shards of <= 400 MB;
#: llama and hermes are skipped unless asked for) and ``"7b"`` (Llama-2-7B's
#: shapes: swallow 13.7 GB, tulu 13.5 GB in bf16, in 5 GB / 4 GB shards).
PRESETS: dict[str, TinyPreset] = {
    "tiny": TinyPreset(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        base_vocab=500,
        ext_vocab=100,
        max_shard_bytes=1 << 30,
        tulu_shard_bytes=200_000,
    ),
    "1.3gb": TinyPreset(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=11,
        num_attention_heads=16,
        num_key_value_heads=4,
        base_vocab=32000,
        ext_vocab=11176,
        max_shard_bytes=400_000_000,
        tulu_shard_bytes=400_000_000,
        models=("swallow", "tulu"),
    ),
    "7b": TinyPreset(  # Llama-2-7B's shapes, for throughput on a big host (13.5 GB per model)
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        base_vocab=32000,
        ext_vocab=11176,
        max_shard_bytes=5_000_000_000,
        tulu_shard_bytes=4_000_000_000,
        models=("swallow", "tulu"),
    ),
}


# --------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------

_SPECIALS = ("<unk>", "<s>", "</s>")
_SPACE = "\u2581"  # "▁", SentencePiece's word-boundary marker
_ASCII_CHARS = "".join(chr(c) for c in range(33, 127))  # printable, no space

# Common English words / pieces; each becomes "▁word" (plus its sub-pieces).
_WORDS = (
    "the of and to in is that it for was on are as with be by at this have from "
    "or one had not but what all were when we there can an your which their said "
    "if do will each about how up out them then she many some so these would other "
    "into has more her two like him see time could no make than first been its who "
    "now people my made over did down only way find use may water long little very "
    "after words called just where most know get through back much before go good "
    "new write our used me man too any day same right look think also around another "
    "came come work three word must because does part even place well such here take "
    "why things help put years different away again off went old number great tell "
    "men say small every found still between name should home big give air line set "
    "own under read last never us left end along while might next sound below saw "
    "something thought both few those always looked show large often together asked "
    "house world going want school important until form food keep children feet land "
    "side without boy once animals life enough took sometimes four head above kind "
    "began almost live page got earth need far hand high year mother light parts "
    "country father let night following picture being study second eyes soon times "
    "story boys since white days ever paper hard near sentence better best across "
    "during today others however sure means knew it's try told young miles sun ways "
    "thing whole hear example heard several change answer room sea against top turned "
    "learn point city play toward five using himself usually money seen didn't car "
    "morning I'm body upon family later turn move face door cut done group true half "
    "red fish plants living black eat short United run book gave order open ground "
    "cold really table remember tree course front American space inside ago making "
    "Mr Mrs The This It In He She We They You A What And But"
).split()
_SUFFIXES = ("ing", "ed", "er", "ly", "tion", "es", "est", "ment", "ness", "able", "al", "s")
_LOWER = "abcdefghijklmnopqrstuvwxyz"
_UPPER = _LOWER.upper()

# Japanese extension (swallow).
_JA_PUNCT = "、。「」ー"
_HIRAGANA = "".join(chr(c) for c in range(0x3041, 0x3094))  # ぁ .. ん (83)
_KATAKANA = "".join(chr(c) for c in range(0x30A1, 0x30F7))  # ァ .. ヶ (86)
_JA_WORDS = (
    "です ます した こと ない して いる する ある から まし この ように ます。 "
    "これ それ という として また ので により でき られ"
).split()
_KANJI = (
    "日本語人年大一国中出十会子生分上時事見行地学者方自社二業同三東長明後高"
    "目作手月前新通部合内理間物意場気心法定文発外主世度家化力性開実相問"
)
_JA_COMPOUNDS = (
    "日本 日本語 人間 世界 会社 学生 時間 問題 社会 自分 言葉 大学 東京 今日 "
    "カタカナ ひらがな コンピュータ データ システム ユーザー"
).split()


class _VocabBuilder:
    """Grows a BPE vocabulary up to ``limit`` tokens, recording merges.

    Every merge ``(a, b)`` is appended only after ``a`` and ``b`` are in the
    vocabulary, and ``a + b`` becomes the next token, so the merges list is
    consistent with the vocabulary and ordered by creation (rank).
    """

    def __init__(self, tokens: Sequence[str], merges: Sequence[tuple[str, str]], limit: int):
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.merges = list(merges)
        self.limit = limit

    @property
    def full(self) -> bool:
        return len(self.tokens) >= self.limit

    def _append(self, tok: str) -> bool:
        if self.full:
            return False
        self.index[tok] = len(self.tokens)
        self.tokens.append(tok)
        return True

    def add(self, s: str) -> bool:
        """Make ``s`` a token (with any missing pieces). False when full."""
        if s in self.index:
            return True
        if len(s) == 1:
            return self._append(s)
        n = len(s)
        for k in sorted(range(1, n), key=lambda k: (abs(2 * k - n), k)):
            a, b = s[:k], s[k:]
            if a in self.index and b in self.index:
                break
        else:
            a, b = s[:-1], s[-1]
            if not (self.add(b) and self.add(a)):
                return False
        if not self._append(s):
            return False
        self.merges.append((a, b))
        return True

    def add_all(self, strings: Iterable[str]) -> None:
        for s in strings:
            if not self.add(s):
                return


def _english_candidates() -> Iterable[str]:
    """Strings added (in order) to fill llama's vocabulary after the chars."""
    for c in _LOWER + _UPPER:
        yield _SPACE + c
    for w in _WORDS:
        yield _SPACE + w
    for w in _WORDS[:120]:
        for suf in _SUFFIXES:
            yield w + suf
    for s in _SUFFIXES:
        yield s
    # systematic fill for large vocabularies
    for a in _LOWER:
        for b in _LOWER:
            yield a + b
    for a in _LOWER + _UPPER:
        for b in _LOWER:
            yield _SPACE + a + b
    for a in _LOWER:
        for b in _LOWER:
            for c in _LOWER:
                yield a + b + c
    for a in _LOWER + _UPPER:
        for b in _LOWER:
            for c in _LOWER:
                yield _SPACE + a + b + c
    for a in _LOWER:
        for b in _LOWER:
            for c in _LOWER:
                for d in _LOWER:
                    yield a + b + c + d


def _japanese_candidates() -> Iterable[str]:
    """Strings swallow appends to llama's vocabulary, in order."""
    yield from _JA_PUNCT
    yield from _HIRAGANA
    yield "日本語"  # adds 日, 本, 語, 日本 (or 本語) and 日本語
    yield from _JA_WORDS
    yield from _KATAKANA
    yield from _KANJI
    yield from _JA_COMPOUNDS
    for cp in range(0x4E00, 0xA000):  # CJK unified ideographs
        yield chr(cp)


def _llama_vocab(base_vocab: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Llama-style vocabulary of exactly ``base_vocab`` tokens and its merges.

    Layout: ``<unk>``=0, ``<s>``=1, ``</s>``=2, the byte tokens
    ``<0x00>``..``<0xFF>`` (ids 3..258), ``▁`` (259), the printable ASCII
    characters, then merged tokens.
    """
    head = list(_SPECIALS) + [f"<0x{b:02X}>" for b in range(256)] + [_SPACE] + list(_ASCII_CHARS)
    if base_vocab < len(head):
        raise ValueError(f"base_vocab must be >= {len(head)}, got {base_vocab}")
    vb = _VocabBuilder(head, [], base_vocab)
    vb.add_all(_english_candidates())
    if not vb.full:
        raise ValueError(f"base_vocab {base_vocab} is too large for the generator")
    return vb.tokens, vb.merges


def tokenizer_tokens(preset: str | TinyPreset, model: str) -> dict:
    """The vocabulary of one model of a preset.

    Returns a dict with ``tokens`` (list[str], ``model.vocab`` in id order),
    ``merges`` (list of ``(left, right)``), ``added_special`` (list[str],
    special tokens appended after ``tokens`` as added tokens only) and
    ``num_rows`` (embedding rows = ``len(tokens) + len(added_special)``).
    """
    p = PRESETS[preset] if isinstance(preset, str) else preset
    tokens, merges = _llama_vocab(p.base_vocab)
    added: list[str] = []
    if model == "swallow":
        vb = _VocabBuilder(tokens, merges, p.base_vocab + p.ext_vocab)
        vb.add_all(_japanese_candidates())
        if not vb.full:
            raise ValueError(f"ext_vocab {p.ext_vocab} is too large for the generator")
        tokens, merges = vb.tokens, vb.merges
    elif model == "hermes":
        clash = set(HERMES_EXTRA_TOKENS) & set(tokens)
        if clash:
            raise AssertionError(f"hermes extra tokens already in llama vocab: {clash}")
        tokens = tokens + list(HERMES_EXTRA_TOKENS)
        added = list(HERMES_ADDED_SPECIAL)
    elif model not in ("llama", "tulu"):
        raise ValueError(f"unknown model {model!r}; expected one of {MODEL_NAMES}")
    return {"tokens": tokens, "merges": merges, "added_special": added,
            "num_rows": len(tokens) + len(added)}


# --------------------------------------------------------------------------
# Tokenizer files
# --------------------------------------------------------------------------

_CHAT_TEMPLATES = {
    "llama": (
        "{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% endif %}{% endfor %}"
    ),
    "swallow": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '### 指示:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### 応答:\\n' + message['content'] + eos_token }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### 応答:\\n' }}{% endif %}"
    ),
    "tulu": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
    "hermes": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
        " + '<|im_end|>' + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}


def _added_token(i: int, content: str) -> dict:
    return {"id": i, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": True}


def _tokenizer_json(vocab: dict) -> dict:
    """HF ``tokenizer.json`` for a Llama-style byte-fallback BPE."""
    tokens, added = vocab["tokens"], vocab["added_special"]
    added_tokens = [_added_token(i, t) for i, t in enumerate(_SPECIALS)]
    added_tokens += [_added_token(len(tokens) + j, t) for j, t in enumerate(added)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": _SPACE},
            {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE},
        ]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": _SPACE}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": [f"{a} {b}" for a, b in vocab["merges"]],
        },
    }


def _tokenizer_config(model: str, vocab: dict, max_len: int) -> dict:
    tokens, added = vocab["tokens"], vocab["added_special"]
    decoder = {str(i): {k: v for k, v in _added_token(i, t).items() if k != "id"}
               for i, t in enumerate(_SPECIALS)}
    for j, t in enumerate(added):
        i = len(tokens) + j
        decoder[str(i)] = {k: v for k, v in _added_token(i, t).items() if k != "id"}
    cfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "chat_template": _CHAT_TEMPLATES[model],
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": max_len,
        "pad_token": None,
        "padding_side": "right",
        # transformers (4.x and 5.x) loads tokenizer.json verbatim for this
        # class; "LlamaTokenizerFast" makes 5.x rebuild the pre-tokenizer.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }
    if added:
        cfg["additional_special_tokens"] = list(added)
    return cfg


def _special_tokens_map(vocab: dict) -> dict:
    def tok(t: str) -> dict:
        return {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False}
    m = {"bos_token": tok("<s>"), "eos_token": tok("</s>"), "unk_token": tok("<unk>")}
    if vocab["added_special"]:
        m["additional_special_tokens"] = [tok(t) for t in vocab["added_special"]]
    return m


# --------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------

def _config_json(p: TinyPreset, model: str, vocab_size: int) -> dict:
    return {
        "_name_or_path": _MARKER + model,
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "hidden_size": p.hidden_size,
        "initializer_range": _MATRIX_STD,
        "intermediate_size": p.intermediate_size,
        "max_position_embeddings": p.max_position_embeddings,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": p.num_attention_heads,
        "num_hidden_layers": p.num_hidden_layers,
        "num_key_value_heads": p.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": p.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": p.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.0",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


_GENERATION = {
    "llama": {"do_sample": True, "temperature": 0.6, "top_p": 0.9},
    "swallow": {"do_sample": True, "temperature": 0.99, "top_p": 0.95, "repetition_penalty": 1.0},
    "tulu": {"do_sample": True, "temperature": 0.7, "top_p": 1.0},
    "hermes": {"do_sample": True, "temperature": 0.8, "top_p": 0.95},
}


def _generation_config(model: str) -> dict:
    g = {"_from_model_config": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    g.update(_GENERATION[model])
    g["transformers_version"] = "4.40.0"
    return g


# --------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------

def llama_tensor_shapes(p: TinyPreset, vocab_rows: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a LlamaForCausalLM checkpoint, in HF order.

    ``model.embed_tokens.weight`` and ``lm_head.weight`` are ``[V, H]`` with
    ``V = vocab_rows``; q/o projections ``[H, H]``; k/v projections
    ``[kv_heads * head_dim, H]``; gate/up ``[I, H]``; down ``[H, I]``; the
    RMSNorm weights ``[H]``. All are stored as bf16.
    """
    h, i, kv = p.hidden_size, p.intermediate_size, p.num_key_value_heads * p.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab_rows, h))]
    for layer in range(p.num_hidden_layers):
        pre = f"model.layers.{layer}."
        out += [
            (pre + "input_layernorm.weight", (h,)),
            (pre + "self_attn.q_proj.weight", (h, h)),
            (pre + "self_attn.k_proj.weight", (kv, h)),
            (pre + "self_attn.v_proj.weight", (kv, h)),
            (pre + "self_attn.o_proj.weight", (h, h)),
            (pre + "post_attention_layernorm.weight", (h,)),
            (pre + "mlp.gate_proj.weight", (i, h)),
            (pre + "mlp.up_proj.weight", (i, h)),
            (pre + "mlp.down_proj.weight", (h, i)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab_rows, h))]
    return out


_STREAMS = {"llama": 0, "swallow": 1, "tulu": 2, "hermes": 3}
_ANCESTOR_PART, _DELTA_PART, _NEW_ROWS_PART = 0, 1, 2


def _rng(seed: int, stream: int, name: str, part: int, block: int) -> np.random.Generator:
    key = [seed, stream, zlib.crc32(name.encode()), part, block]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))


class _Filler:
    """Fills the bf16 tensors of one model, block by block, on a few threads.

    A block is a run of whole rows (at most ``_BLOCK_ELEMS`` elements) with
    its own random streams and its own slice of the output, so the result
    does not depend on the number of threads or on scheduling. numpy's
    generators and casts release the GIL, so threads use several cores.
    Each thread keeps two float32 scratch buffers of ``_BLOCK_ELEMS``.
    """

    def __init__(self, seed: int, model: str, base_rows: int, delta_rel: float, workers: int):
        self.seed, self.stream, self.base_rows = seed, _STREAMS[model], base_rows
        self.delta_rel = delta_rel
        self.workers = workers
        self._local = threading.local()

    def _scratch(self) -> tuple[np.ndarray, np.ndarray]:
        loc = self._local
        if not hasattr(loc, "a"):
            loc.a = np.empty(_BLOCK_ELEMS, np.float32)
            loc.d = np.empty(_BLOCK_ELEMS, np.float32)
        return loc.a, loc.d

    def _blocks(self, name: str, dst: np.ndarray) -> list[tuple]:
        """Block tasks ``(name, out_rows_view, part, block, norm)`` for ``dst``.

        1-D tensors are RMSNorm weights (ancestor ~ 1 + N(0, 0.05)); 2-D ones
        are matrices (ancestor ~ N(0, 0.02)). For embed/lm_head only the first
        ``base_rows`` rows have an ancestor; the rest are the model's new rows.
        Block boundaries depend only on the row width, so the ancestor rows of
        embed/lm_head are the same whatever the vocabulary size.
        """
        norm = dst.ndim == 1
        m = dst.reshape(1, -1) if norm else dst
        rows, cols = m.shape
        per_block = max(1, _BLOCK_ELEMS // cols)
        has_new_rows = not norm and name.endswith(("embed_tokens.weight", "lm_head.weight"))
        anc_rows = min(rows, self.base_rows) if has_new_rows else rows
        tasks = [(name, m[r0:min(anc_rows, r0 + per_block)], _ANCESTOR_PART, b, norm)
                 for b, r0 in enumerate(range(0, anc_rows, per_block))]
        tasks += [(name, m[r0:min(rows, r0 + per_block)], _NEW_ROWS_PART, b, norm)
                  for b, r0 in enumerate(range(anc_rows, rows, per_block))]
        return tasks

    def _run(self, task: tuple) -> None:
        name, out, part, b, norm = task
        sa, sd = self._scratch()
        a = sa[: out.size].reshape(out.shape)
        if part == _NEW_ROWS_PART:
            _rng(self.seed, self.stream, name, part, b).standard_normal(dtype=np.float32, out=a)
            a *= _MATRIX_STD
            out[...] = a
            return
        _rng(self.seed, 0, name, _ANCESTOR_PART, b).standard_normal(dtype=np.float32, out=a)
        a *= _NORM_STD if norm else _MATRIX_STD
        if norm:
            a += 1.0
        out[...] = a  # bf16(ancestor)
        if self.stream:
            a[...] = out  # the fine-tune starts from the bf16 ancestor
            d = sd[: out.size].reshape(out.shape)
            _rng(self.seed, self.stream, name, _DELTA_PART, b).standard_normal(
                dtype=np.float32, out=d)
            d *= self.delta_rel * (1.0 if norm else _MATRIX_STD)
            a += d
            out[...] = a  # bf16(bf16(ancestor) + delta)

    def fill(self, tensors: dict[str, np.ndarray]) -> None:
        """Write the model's values into each bf16 array of ``{name: array}``."""
        tasks = [t for name, arr in tensors.items() for t in self._blocks(name, arr)]
        if self.workers <= 1 or len(tasks) <= 1:
            for t in tasks:
                self._run(t)
            return
        with ThreadPoolExecutor(self.workers) as ex:
            for _ in ex.map(self._run, tasks):
                pass


def _plan_shards(shapes: list[tuple[str, tuple[int, ...]]], max_bytes: int) -> list[list[str]]:
    """Greedy HF-style sharding in tensor order; each shard <= max_bytes unless
    a single tensor is larger."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes:
        n = int(np.prod(shape)) * BF16.itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _prepare_folder(folder: Path) -> None:
    """Create ``folder``; replace it only if it holds a model made here."""
    if folder.exists():
        cfg = folder / "config.json"
        ours = False
        if cfg.is_file():
            try:
                ours = str(json.loads(cfg.read_text()).get("_name_or_path", "")).startswith(_MARKER)
            except (ValueError, OSError):
                ours = False
        if not ours and any(folder.iterdir()):
            raise FileExistsError(f"{folder} exists and was not made by superswallow_jax.tiny")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


#: The weight format of each model with ``published=True``, like the repos they
#: stand in for (tulu-2-dpo-70b: ``.bin`` shards; Swallow: safetensors; tulu is
#: always sharded, the others when large). Their tokenizers are then
#: sentencepiece-only (``tokenizer.model``).
PUBLISHED_FORMS = {"llama": "bin", "swallow": "safetensors", "tulu": "bin"}


def _write_tokenizer_files(folder: Path, p: TinyPreset, model: str, vocab: dict, published: bool) -> None:
    if published and model in PUBLISHED_FORMS:
        from .tiny_published import sentencepiece_model, slow_tokenizer_config, special_tokens_map

        (folder / "tokenizer.model").write_bytes(sentencepiece_model(vocab["tokens"]))
        _write_json(folder / "tokenizer_config.json",
                    slow_tokenizer_config(_CHAT_TEMPLATES[model], p.max_position_embeddings))
        _write_json(folder / "special_tokens_map.json", special_tokens_map())
        return
    _write_json(folder / "tokenizer.json", _tokenizer_json(vocab))
    _write_json(folder / "tokenizer_config.json",
                _tokenizer_config(model, vocab, p.max_position_embeddings))
    _write_json(folder / "special_tokens_map.json", _special_tokens_map(vocab))


def _shard_name(fmt: str, k: int, n: int, sharded: bool) -> str:
    if fmt == "bin":
        return f"pytorch_model-{k + 1:05d}-of-{n:05d}.bin" if sharded else "pytorch_model.bin"
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors" if sharded else "model.safetensors"


def _write_model(folder: Path, p: TinyPreset, model: str, seed: int,
                 progress: Callable[[str], None], workers: int, published: bool = False) -> None:
    vocab = tokenizer_tokens(p, model)
    rows = vocab["num_rows"]
    _prepare_folder(folder)
    _write_json(folder / "config.json", _config_json(p, model, rows))
    _write_json(folder / "generation_config.json", _generation_config(model))
    _write_tokenizer_files(folder, p, model, vocab, published)

    fmt = PUBLISHED_FORMS.get(model, "safetensors") if published else "safetensors"
    shapes = llama_tensor_shapes(p, rows)
    shape_of = dict(shapes)
    max_bytes = p.tulu_shard_bytes if model == "tulu" else p.max_shard_bytes
    shards = _plan_shards(shapes, max_bytes)
    sharded = model == "tulu" or len(shards) > 1
    filler = _Filler(seed, model, p.base_vocab, p.delta_rel(model), workers)
    # One bf16 buffer, sized for the largest shard and reused for every shard.
    nbytes = {name: int(np.prod(shape)) * BF16.itemsize for name, shape in shapes}
    pool = np.empty(max(sum(nbytes[n] for n in names) for names in shards) // BF16.itemsize, BF16)
    weight_map: dict[str, str] = {}
    total = 0
    for k, names in enumerate(shards):
        fname = _shard_name(fmt, k, len(shards), sharded)
        arrays, off = {}, 0
        for name in names:
            n = nbytes[name] // BF16.itemsize
            arrays[name] = pool[off:off + n].reshape(shape_of[name])
            off += n
            weight_map[name] = fname
            total += nbytes[name]
        filler.fill(arrays)
        if fmt == "bin":
            from .tiny_published import write_torch_bin

            write_torch_bin(folder / fname, arrays)
        else:
            save_file(arrays, str(folder / fname), metadata={"format": "pt"})
        (folder / fname).chmod(0o644)  # safetensors creates files 0600
        del arrays
        progress(f"{model}: wrote {fname}")
    if sharded:
        index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
        _write_json(folder / index, {"metadata": {"total_size": total}, "weight_map": weight_map})


def make_tiny_models(
    out_dir: Path,
    preset: str = "tiny",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    *,
    models: Sequence[str] | None = None,
    workers: int | None = None,
    published: bool = False,
) -> dict[str, Path]:
    """Generate the tiny model family under ``out_dir``.

    Args:
        out_dir: parent folder; each model goes to ``out_dir / name``. A model
            folder that already exists is replaced only if it was made by this
            module (else :class:`FileExistsError`).
        preset: a key of :data:`PRESETS` (``"tiny"``, ``"1.3gb"`` or ``"7b"``).
        seed: non-negative int; the same seed gives byte-identical files.
        progress: optional callback receiving one-line progress messages.
        models: which of :data:`MODEL_NAMES` to build (default: the preset's
            ``models``: all four for ``"tiny"``, swallow and tulu for
            ``"1.3gb"``). Each model is defined independently of the others.
        workers: threads drawing random numbers (default: up to 4, bounded
            by the CPU count). The output does not depend on it.
        published: save llama, swallow and tulu as the real repos are
            published (:data:`PUBLISHED_FORMS`): pickled ``.bin`` weights for
            llama (one file) and tulu (sharded), safetensors for swallow, and
            only a sentencepiece ``tokenizer.model`` for all three. The tensors
            are the same bytes as without it.

    Returns:
        ``{name: folder}`` for the models built, in :data:`MODEL_NAMES` order.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
    p = PRESETS[preset]
    wanted = tuple(p.models if models is None else models)
    unknown = [m for m in wanted if m not in MODEL_NAMES]
    if unknown:
        raise ConfigError(f"unknown model(s) {unknown}; expected some of {MODEL_NAMES}")
    say = progress or (lambda _msg: None)
    n_workers = workers if workers is not None else max(1, min(4, os.cpu_count() or 1))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Path] = {}
    for model in MODEL_NAMES:
        if model not in wanted:
            continue
        t0 = time.perf_counter()
        _write_model(out_dir / model, p, model, int(seed), say, n_workers, published)
        say(f"{model}: done in {time.perf_counter() - t0:.1f}s")
        result[model] = out_dir / model
    return result


if __name__ == "__main__":  # python -m superswallow_jax.tiny OUT_DIR [PRESET] [SEED]
    import sys

    args = sys.argv[1:]
    if not args:
        sys.exit("usage: python -m superswallow_jax.tiny OUT_DIR [tiny|1.3gb] [SEED]")
    made = make_tiny_models(Path(args[0]), args[1] if len(args) > 1 else "tiny",
                            int(args[2]) if len(args) > 2 else 0, progress=print)
    for k, v in made.items():
        print(f"{k}\t{v}")
