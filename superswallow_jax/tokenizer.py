"""Tokenizer merging and embedding alignment (``tokenizer_source`` / ``tokenizer:``).

Pure Python + NumPy (+ ``ml_dtypes``); it reads HF ``tokenizer.json`` files and
never imports ``tokenizers``, ``transformers`` or ``torch``. It reproduces
mergekit 0.1.5 running with transformers v5 (MERGE_SEMANTICS.md §3, §6):

Loading (:func:`load_model_tokenizer`)
    ``tokenizer.json`` (required; a folder with only a sentencepiece
    ``tokenizer.model`` is refused), plus ``tokenizer_config.json`` and
    ``special_tokens_map.json`` when present. The vocabulary is what
    ``AutoTokenizer.from_pretrained`` gives in transformers v5: the
    ``tokenizer.json`` vocab and added tokens, then, from
    ``tokenizer_config.json``, (1) the ``added_tokens_decoder`` entries in id
    order (their flags win), (2) the special-token attributes ``bos, eos, unk,
    sep, pad, cls, mask`` and (3) ``additional_special_tokens`` /
    ``extra_special_tokens``; (2) and (3) become special added tokens unless
    already added. A missing token gets the next id by the ``tokenizers`` rule
    (``max(added ids) + 1`` once that reaches the model vocab size, else the
    model vocab size). ``special_tokens_map.json`` is ignored for loading, as in
    transformers v5.

Output vocabulary (:func:`build_output_tokenizer`)
    * The base is *stripped*: tokens whose id is ``>= config vocab_size`` leave
      the model vocab and the added tokens; BPE merges that use or produce them
      are dropped (0.1.5 drops only merges that *use* them; one that produces a
      dropped token would make ``tokenizers`` refuse the file). Only BPE can be
      stripped; other types with something to strip raise :class:`TokenizerError`.
    * ``base``: the stripped base. ``<model key>``: that model's tokenizer, not
      stripped. ``union``: the stripped base, then, as mergekit's save/reload
      step does, the special tokens named in the base's ``tokenizer_config.json``
      that stripping removed are re-added (special, not normalized) in the order
      bos, eos, unk, sep, pad, cls, mask, additional/extra; then every ordinary
      token of the other models (ids below that model's config vocab size) that
      is not in the stripped base is appended as an added token (normalized,
      not special; a re-added special token met here keeps its id and becomes
      normalized/non-special, as ``add_tokens`` does); then the added tokens of
      all models (base first; first definition of a content wins) are added
      with their flags -- a content already present keeps its id and takes
      those flags.
    * **Deterministic order** (mergekit's is random per process): the other
      models are walked in config order (``others`` / ``model_keys[1:]``), each
      model's tokens in ascending id order, first occurrence wins. All base ids
      are unchanged.
    * Finally tokens of ``tokenizer.tokens`` not yet present are appended
      (normalized, not special) in config order, for every source.

Embedding alignment (:func:`align_embeddings`, :class:`EmbeddingAlignment`)
    ``p_M[o]`` = id of output token ``o`` in model ``M`` if present and below
    ``M``'s config vocab size, else ``-1``. Rows of a model whose ``p >= 0``
    (and not forced) are copied; other rows get the token's default vector:
    one owner -> its row; none -> zeros; ``>= 2`` and the base has it -> the
    base's row; otherwise the unweighted mean. ``tokenizer.tokens`` overrides
    (model row, ``model_token`` row of the *original* matrix, zeros) replace
    the default, and ``force`` applies them to every model. Padding rows are
    the mean of the model's first ``len(tokens)`` aligned rows.

    Arithmetic is torch-on-CPU bit-exact (checked against mergekit 0.1.5 with
    torch 2.13 on x86-64): the per-token mean starts from a zero row, adds the
    rows in model order in the working dtype (f32 compute, one rounding per
    add for bf16/f16) and divides by the count (f32 true division, one
    rounding). The padding mean is torch's ``mean(dim=0)``: f32 cascade sum
    (emulated by :class:`_TorchDim0Sum`), f32 division by ``len(tokens)``, one
    rounding. The cascade's column blocking depends on torch's intra-op
    thread count only when ``hidden % 32 != 0``; ``torch_threads`` selects it.

Deviations from 0.1.5 (all in cases where 0.1.5 crashes or is random):
    * appended-token order is deterministic (above);
    * a token present in a model at an id ``>=`` that model's vocab size counts
      as absent (``-1``) where 0.1.5 raises ``KeyError``; likewise new
      ``tokenizer.tokens`` with ``source: base`` (0.1.5 mutates the base
      tokenizer and then raises);
    * for ``base`` output, special-token attributes of ``tokenizer_config.json``
      naming a stripped token are dropped, so the written files reload with
      exactly :attr:`OutputTokenizer.tokens` (0.1.5 keeps them and HF's
      reload then appends them beyond ``vocab_size``);
    * a tokenizer that fails to load is an error (0.1.5 assumes the base's).

Not reproduced: the exact bytes of transformers' ``save_pretrained`` output
(v5 adds a post-processor and rewrites ``tokenizer_config.json``; ours keeps
the source files' content with updated vocab/added tokens); mergekit runs
with embeddings on a GPU (different reduction order); torch builds whose
f32 vector width is not 8 lanes in the sum kernel (non-x86); ``hidden == 1``
padding means with several torch threads and ``>= 32768`` tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np

from .errors import ConfigError, OutputError, TokenizerError

__all__ = [
    "ModelTokenizer",
    "TokenOverride",
    "OutputTokenizer",
    "EmbeddingAlignment",
    "load_model_tokenizer",
    "overrides_from_config",
    "build_output_tokenizer",
    "write_tokenizer",
    "align_embeddings",
]

_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_LIST_ATTRS = ("additional_special_tokens", "extra_special_tokens")
_MODEL_TYPES = ("BPE", "WordPiece", "WordLevel", "Unigram")
_F32 = np.dtype(np.float32)
_WORK_DTYPES = (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), _F32)


# ------------------------------------------------------------------ helpers


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerError(f"{path}: cannot read {what}: {msg}") from None


def _entry(content: str, id_: int, flags: Mapping[str, Any] | None = None, *, special: bool = False) -> dict:
    """An added-token entry in ``tokenizer.json`` form. Missing flags take the
    ``tokenizers`` defaults (``normalized = not special``, the rest false)."""
    flags = flags or {}
    sp = bool(flags.get("special", special))
    return {
        "id": int(id_),
        "content": content,
        "single_word": bool(flags.get("single_word", False)),
        "lstrip": bool(flags.get("lstrip", False)),
        "rstrip": bool(flags.get("rstrip", False)),
        "normalized": bool(flags.get("normalized", not sp)),
        "special": sp,
    }


def _model_vocab(tj: Mapping[str, Any], path: Path) -> dict[str, int]:
    model = tj.get("model")
    if not isinstance(model, dict):
        raise TokenizerError(f"{path}: no 'model' object")
    mtype = model.get("type")
    if mtype is None and "merges" in model:
        mtype = "BPE"  # older files omit the type
    if mtype not in _MODEL_TYPES:
        raise TokenizerError(f"{path}: unsupported tokenizer model type {mtype!r}")
    vocab = model.get("vocab")
    if mtype == "Unigram":
        if not isinstance(vocab, list) or not all(isinstance(v, list) and v and isinstance(v[0], str) for v in vocab):
            raise TokenizerError(f"{path}: Unigram vocab must be a list of [piece, score]")
        out: dict[str, int] = {}
        for i, v in enumerate(vocab):
            out.setdefault(v[0], i)
        return out
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in vocab.items()):
        raise TokenizerError(f"{path}: model vocab must map token strings to non-negative integer ids")
    return dict(vocab)


class _Vocab:
    """Mutable working state of one tokenizer: model vocab + added tokens.

    ``add`` follows ``tokenizers``' ``AddedVocabulary.add_tokens``: a content
    already known keeps its id and takes the new flags; a new one gets
    :meth:`next_id`.
    """

    def __init__(self, model_vocab: Mapping[str, int], added: Iterable[Mapping[str, Any]]):
        self.model_vocab = dict(model_vocab)
        self.added: dict[str, dict] = {}
        for e in added:
            self.added[e["content"]] = _entry(e["content"], e["id"], e)

    def copy(self) -> "_Vocab":
        return _Vocab(self.model_vocab, self.added.values())

    def token_to_id(self, tok: str) -> int | None:
        e = self.added.get(tok)
        return e["id"] if e is not None else self.model_vocab.get(tok)

    def next_id(self) -> int:
        size = len(self.model_vocab)
        if not self.added:
            return size
        top = max(e["id"] for e in self.added.values())
        return top + 1 if (top >= size or size == 0) else size

    def add(self, content: str, flags: Mapping[str, Any] | None = None, *, special: bool = False) -> None:
        if not content:
            return
        i = self.token_to_id(content)
        self.added[content] = _entry(content, self.next_id() if i is None else i, flags, special=special)

    def ensure_special(self, content: str, flags: Mapping[str, Any] | None = None) -> None:
        """transformers' special-token registration: no-op for added tokens."""
        if content and content not in self.added:
            self.add(content, flags, special=True)

    def get_vocab(self) -> dict[str, int]:
        v = dict(self.model_vocab)
        for c, e in self.added.items():
            v[c] = e["id"]
        return v

    def sorted_added(self) -> list[dict]:
        return [dict(e) for e in sorted(self.added.values(), key=lambda e: e["id"])]


def _special_values(cfg: Mapping[str, Any] | None) -> list[tuple[str, dict | None]]:
    """Special tokens named by a tokenizer_config: attributes, then lists."""
    if not cfg:
        return []
    out: list[tuple[str, dict | None]] = []

    def one(v: Any) -> None:
        if isinstance(v, str):
            out.append((v, None))
        elif isinstance(v, dict) and isinstance(v.get("content"), str):
            out.append((v["content"], v))

    for a in _SPECIAL_ATTRS:
        one(cfg.get(a))
    for a in _LIST_ATTRS:
        v = cfg.get(a)
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            for x in v:
                one(x)
    return out


def _apply_config_tokens(v: _Vocab, cfg: Mapping[str, Any] | None) -> None:
    """What transformers v5 adds while loading a fast tokenizer."""
    if not cfg:
        return
    dec = cfg.get("added_tokens_decoder")
    if isinstance(dec, dict):
        items = []
        for k, e in dec.items():
            try:
                items.append((int(k), e))
            except (TypeError, ValueError):
                continue
        for _, e in sorted(items, key=lambda t: t[0]):
            if isinstance(e, dict) and isinstance(e.get("content"), str):
                v.add(e["content"], e)
    for content, flags in _special_values(cfg):
        v.ensure_special(content, flags)


# ------------------------------------------------------------------ input tokenizers


@dataclass(frozen=True, eq=False)
class ModelTokenizer:
    """One input model's tokenizer, as transformers v5 would load it.

    ``tokenizer_json`` / ``tokenizer_config`` / ``special_tokens_map`` are the
    parsed files (``None`` when absent) and must not be mutated. ``vocab`` is
    ``get_vocab()``: ``model_vocab`` plus ``added`` (content -> id, an added
    token wins). ``added`` maps content -> ``{id, content, single_word, lstrip,
    rstrip, normalized, special}``. ``config_vocab_size`` is ``config.json``'s
    vocab size (embedding rows); ids ``>=`` it have no row. ``None`` means
    unknown (mergekit's fallbacks apply).
    """

    model_dir: Path
    tokenizer_json: dict
    tokenizer_config: dict | None
    special_tokens_map: dict | None
    vocab: Mapping[str, int]
    added: Mapping[str, dict]
    config_vocab_size: int | None
    model_vocab: Mapping[str, int] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        m = self.tokenizer_json.get("model", {})
        return m.get("type") or ("BPE" if "merges" in m else "?")

    def _state(self) -> _Vocab:
        return _Vocab(self.model_vocab, self.added.values())


def load_model_tokenizer(model_dir: Path, config_vocab_size: int | None) -> ModelTokenizer:
    """Load ``model_dir``'s tokenizer files (see module docstring).

    Raises :class:`TokenizerError` naming the folder or file when
    ``tokenizer.json`` is missing (with a hint when only a sentencepiece
    ``tokenizer.model`` exists), unreadable or of an unsupported type.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise TokenizerError(f"{model_dir}: model folder not found")
    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        if (model_dir / "tokenizer.model").is_file():
            raise TokenizerError(
                f"{model_dir}: only a sentencepiece tokenizer.model, no tokenizer.json; tokenizer merging needs a "
                "fast tokenizer (save it once with transformers to create tokenizer.json)"
            )
        raise TokenizerError(f"{model_dir}: no tokenizer.json (needed for tokenizer merging)")
    tj = _read_json(tj_path, "tokenizer.json")
    if not isinstance(tj, dict):
        raise TokenizerError(f"{tj_path}: not a JSON object")
    mv = _model_vocab(tj, tj_path)
    raw_added = tj.get("added_tokens") or []
    if not isinstance(raw_added, list) or not all(
        isinstance(e, dict) and isinstance(e.get("content"), str) and type(e.get("id")) is int and e["id"] >= 0
        for e in raw_added
    ):
        raise TokenizerError(f"{tj_path}: added_tokens must be a list of {{id, content, ...}} objects")
    cfg = stm = None
    if (model_dir / "tokenizer_config.json").is_file():
        cfg = _read_json(model_dir / "tokenizer_config.json", "tokenizer_config.json")
        if not isinstance(cfg, dict):
            raise TokenizerError(f"{model_dir / 'tokenizer_config.json'}: not a JSON object")
    if (model_dir / "special_tokens_map.json").is_file():
        stm = _read_json(model_dir / "special_tokens_map.json", "special_tokens_map.json")
        if not isinstance(stm, dict):
            raise TokenizerError(f"{model_dir / 'special_tokens_map.json'}: not a JSON object")
    if config_vocab_size is not None and (type(config_vocab_size) is not int or config_vocab_size <= 0):
        raise TokenizerError(f"{model_dir}: config vocab_size must be a positive integer, got {config_vocab_size!r}")
    state = _Vocab(mv, raw_added)
    _apply_config_tokens(state, cfg)
    return ModelTokenizer(
        model_dir=model_dir,
        tokenizer_json=tj,
        tokenizer_config=cfg,
        special_tokens_map=stm,
        vocab=MappingProxyType(state.get_vocab()),
        added=MappingProxyType({c: MappingProxyType(e) for c, e in state.added.items()}),
        config_vocab_size=config_vocab_size,
        model_vocab=MappingProxyType(dict(mv)),
    )


def _json_copy(x: Any) -> Any:
    """A deep copy of parsed JSON (dicts, lists, scalars): about 3x faster than
    ``copy.deepcopy``, which keeps a memo for shared and cyclic objects that
    parsed JSON cannot have (a 43K-token tokenizer.json: 16 -> 5 ms)."""
    if type(x) is dict:
        return {k: _json_copy(v) for k, v in x.items()}
    if type(x) is list:
        return [_json_copy(v) for v in x]
    return x


def _merge_parts(m: Any) -> tuple[str, str] | None:
    if isinstance(m, str):
        parts = m.split(" ")
        return (parts[0], parts[1]) if len(parts) == 2 else None
    if isinstance(m, (list, tuple)) and len(m) == 2 and all(isinstance(x, str) for x in m):
        return m[0], m[1]
    return None


def _strip(mt: ModelTokenizer) -> tuple[_Vocab, dict]:
    """The base's stripped state and tokenizer.json (new objects)."""
    state = mt._state()
    tj = _json_copy(mt.tokenizer_json)
    size = mt.config_vocab_size if mt.config_vocab_size is not None else len(mt.vocab)
    unused = {t for t, i in mt.vocab.items() if i >= size}
    if not unused:
        return state, tj
    if mt.model_type != "BPE":
        raise TokenizerError(
            f"{mt.model_dir}: tokenizer has {len(unused)} tokens with id >= vocab_size {size}, "
            f"but only BPE tokenizers can be stripped (type {mt.model_type})"
        )
    state.model_vocab = {t: i for t, i in state.model_vocab.items() if t not in unused}
    state.added = {c: e for c, e in state.added.items() if e["id"] < size}
    model = tj["model"]
    model["vocab"] = dict(state.model_vocab)
    prefix = model.get("continuing_subword_prefix") or ""
    plen = len(prefix.encode("utf-8"))
    kept = []
    for m in model.get("merges") or []:
        parts = _merge_parts(m)
        if parts is None:
            raise TokenizerError(f"{mt.model_dir / 'tokenizer.json'}: unexpected merge format {m!r}")
        a, b = parts
        product = a + b.encode("utf-8")[plen:].decode("utf-8", "ignore")
        if a in unused or b in unused or product in unused:
            continue
        kept.append(m)
    model["merges"] = kept
    return state, tj


# ------------------------------------------------------------------ overrides


@dataclass(frozen=True)
class TokenOverride:
    """One ``tokenizer.tokens`` entry (the token string is the mapping key).

    ``kind``: ``"model"`` (that model's row for this token; ``model`` is its
    key), ``"model_token"`` (row ``token_id``, or the id of ``token`` in the
    model's original vocab, of ``model``'s original matrix) or ``"zero"``.
    ``force``: every model uses this vector, even models that have the token.
    """

    kind: str
    model: str | None = None
    token_id: int | None = None
    token: str | None = None
    force: bool = False

    @classmethod
    def from_config(cls, source: Any, force: bool = False, where: str = "tokenizer.tokens") -> "TokenOverride":
        """Parse a ``source`` value (model ref string, ``{kind: zero}`` or
        ``{kind: model_token, model, token_id | token}``). Raises ConfigError."""
        if not isinstance(force, bool):
            raise ConfigError(f"{where}.force: must be true or false")
        if isinstance(source, str):
            return cls("model", model=source, force=force)
        if isinstance(source, Mapping):
            kind = source.get("kind")
            if kind == "zero":
                return cls("zero", force=force)
            if kind == "model_token":
                model = source.get("model")
                tid, tok = source.get("token_id"), source.get("token")
                if not isinstance(model, str):
                    raise ConfigError(f"{where}.source.model: must be a model reference")
                if (tid is None) == (tok is None):
                    raise ConfigError(f"{where}.source: give exactly one of token_id and token")
                if tid is not None and (type(tid) is not int or tid < 0):
                    raise ConfigError(f"{where}.source.token_id: must be a non-negative integer")
                if tok is not None and not isinstance(tok, str):
                    raise ConfigError(f"{where}.source.token: must be a string")
                return cls("model_token", model=model, token_id=tid, token=tok, force=force)
            raise ConfigError(f"{where}.source.kind: expected zero or model_token, got {kind!r}")
        raise ConfigError(f"{where}.source: missing or invalid (model reference, {{kind: zero}} or {{kind: model_token}})")


def overrides_from_config(tokens: Any, model_keys: Sequence[str] | None = None) -> dict[str, TokenOverride]:
    """``tokenizer.tokens`` -> ``{token: TokenOverride}`` in config order.

    ``tokens``: a mapping ``{token: {source, force}}``, or a sequence of objects
    with ``token``, ``source`` and ``force`` attributes (config.TokenOverrideSpec).
    With ``model_keys``, model references are checked against them (ConfigError).
    """
    out: dict[str, TokenOverride] = {}
    if not tokens:
        return out
    if isinstance(tokens, Mapping):
        items = []
        for tok, spec in tokens.items():
            if not isinstance(spec, Mapping):
                raise ConfigError(f"tokenizer.tokens.{tok}: must be a mapping with keys source and force")
            items.append((str(tok), spec.get("source"), spec.get("force", False)))
    else:
        items = [(str(s.token), s.source, s.force) for s in tokens]
    for tok, src, force in items:
        where = f"tokenizer.tokens.{tok}"
        ov = src if isinstance(src, TokenOverride) else TokenOverride.from_config(src, force, where)
        if model_keys is not None and ov.model is not None and ov.model not in model_keys:
            raise ConfigError(f"{where}.source: model {ov.model!r} is not one of the merged models")
        out[tok] = ov
    return out


# ------------------------------------------------------------------ output tokenizer


@dataclass(frozen=True, eq=False)
class OutputTokenizer:
    """The merged tokenizer.

    ``tokens[i]`` is the token with id ``i`` (``len(tokens)`` = output vocab
    before padding); ``padded_vocab_size`` is that rounded up to
    ``pad_to_multiple_of`` (config.json's ``vocab_size``; padding rows are not
    in the tokenizer). ``tokenizer_json`` / ``tokenizer_config`` /
    ``special_tokens_map`` are the file contents :func:`write_tokenizer`
    writes (``tokenizer_config`` without ``chat_template``).
    """

    tokens: tuple[str, ...]
    tokenizer_json: dict
    tokenizer_config: dict | None
    special_tokens_map: dict | None
    padded_vocab_size: int
    source: str = "union"

    @property
    def vocab(self) -> dict[str, int]:
        """token -> id (a new dict)."""
        return {t: i for i, t in enumerate(self.tokens)}


def _drop_dangling(d: dict | None, vocab: Mapping[str, int]) -> dict | None:
    """Remove special-token references to tokens not in ``vocab``."""
    if d is None:
        return None

    def content(v: Any) -> str | None:
        if isinstance(v, str):
            return v
        if isinstance(v, dict) and isinstance(v.get("content"), str):
            return v["content"]
        return None

    for a in _SPECIAL_ATTRS:
        c = content(d.get(a))
        if c is not None and c not in vocab:
            del d[a]
    for a in _LIST_ATTRS:
        v = d.get(a)
        if isinstance(v, list):
            d[a] = [x for x in v if content(x) is None or content(x) in vocab]
        elif isinstance(v, dict):
            d[a] = {k: x for k, x in v.items() if content(x) is None or content(x) in vocab}
    return d


def build_output_tokenizer(
    source: str,
    base: ModelTokenizer,
    others: Sequence[ModelTokenizer],
    model_keys: Sequence[str],
    overrides: Mapping[str, TokenOverride],
    pad_to_multiple_of: int | None,
) -> OutputTokenizer:
    """Build the output tokenizer (rules and order in the module docstring).

    ``source``: ``"base"``, ``"union"`` or one of ``model_keys`` (index 0 is
    ``base``, then ``others`` in config order). ``overrides``: the
    ``tokenizer.tokens`` map (only its keys are used here). Arguments are not
    modified. Raises TokenizerError when the result's ids are not exactly
    ``0..n-1`` or the base cannot be stripped.
    """
    if len(model_keys) != 1 + len(others):
        raise ValueError("model_keys must name the base and then every other model")
    if pad_to_multiple_of is not None and (type(pad_to_multiple_of) is not int or pad_to_multiple_of < 0):
        raise TokenizerError(f"tokenizer.pad_to_multiple_of: must be a positive integer, got {pad_to_multiple_of!r}")
    models = [base, *others]
    if source in ("base", "union"):
        state, tj = _strip(base)
        cfg, stm = _json_copy(base.tokenizer_config), _json_copy(base.special_tokens_map)
        owner = base
        if source == "union":
            stripped_base = state.copy()
            base_vocab = stripped_base.get_vocab()
            # mergekit saves the stripped base and reloads it: transformers
            # re-adds the special tokens its tokenizer_config names.
            for content, _flags in _special_values(base.tokenizer_config):
                state.ensure_special(content)
            ordinary: dict[str, None] = {}
            added: dict[str, dict] = {}
            walk = [(stripped_base.get_vocab(), stripped_base.added, base.config_vocab_size, len(stripped_base.model_vocab))]
            walk += [(m.vocab, m.added, m.config_vocab_size, len(m.model_vocab)) for m in others]
            for vocab, m_added, cvs, model_size in walk:
                limit = cvs if cvs is not None else model_size
                for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
                    if idx < limit:
                        ordinary.setdefault(tok, None)
                for e in sorted(m_added.values(), key=lambda e: e["id"]):
                    if e["id"] < limit and e["content"] not in added:
                        added[e["content"]] = dict(e)
            for tok in ordinary:
                if tok not in added and tok not in base_vocab:
                    state.add(tok, {"normalized": True, "special": False})
            for e in added.values():
                state.add(e["content"], e)
    else:
        if source not in model_keys:
            raise TokenizerError(f"tokenizer source: {source!r} is not one of the merged models")
        owner = models[list(model_keys).index(source)]
        state = owner._state()
        tj = _json_copy(owner.tokenizer_json)
        cfg, stm = _json_copy(owner.tokenizer_config), _json_copy(owner.special_tokens_map)
    present = state.get_vocab()
    for tok in overrides:
        if tok not in present:
            state.add(tok, {"normalized": True, "special": False})
            present[tok] = state.added[tok]["id"]

    vocab = state.get_vocab()
    n = len(vocab)
    tokens: list[str | None] = [None] * n
    for tok, i in vocab.items():
        if i >= n or tokens[i] is not None:
            raise TokenizerError(
                f"{owner.model_dir}: output token ids are not contiguous 0..{n - 1} (token {tok!r} has id {i})"
            )
        tokens[i] = tok
    tj["added_tokens"] = state.sorted_added()
    if cfg is None:
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast"}
    cfg["added_tokens_decoder"] = {
        str(e["id"]): {k: e[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for e in state.sorted_added()
    }
    cfg = _drop_dangling(cfg, vocab)
    stm = _drop_dangling(stm, vocab)
    padded = n
    if pad_to_multiple_of and n % pad_to_multiple_of:
        padded = (n // pad_to_multiple_of + 1) * pad_to_multiple_of
    return OutputTokenizer(tuple(tokens), tj, cfg, stm, padded, source)  # type: ignore[arg-type]


def write_tokenizer(out_dir: Path, tok: OutputTokenizer, chat_template: str | None) -> list[Path]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` (with ``chat_template``
    when given) and ``special_tokens_map.json`` (only if the source had one)
    into ``out_dir``. Returns the written paths. ``tok`` is not modified."""
    out_dir = Path(out_dir)
    cfg = _json_copy(tok.tokenizer_config) if tok.tokenizer_config is not None else {}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    files = [("tokenizer.json", tok.tokenizer_json), ("tokenizer_config.json", cfg)]
    if tok.special_tokens_map is not None:
        files.append(("special_tokens_map.json", tok.special_tokens_map))
    written = []
    for name, data in files:
        path = out_dir / name
        try:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, ensure_ascii=False)
                f.write("\n")
        except OSError as e:
            raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None
        written.append(path)
    return written


# ------------------------------------------------------------------ torch CPU mean(dim=0) emulation


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else (x - 1).bit_length()


class _Cascade:
    """torch's ``multi_row_sum`` (aten/native/cpu/SumKernel.cpp) over ``size``
    rows of shape ``shape``, in float32: 4 accumulator levels,
    ``2**level_power`` rows per level-0 block, rows fed in order."""

    def __init__(self, size: int, shape: tuple[int, ...]):
        self.lp = max(4, _ceil_log2(size) // 4)
        self.step = 1 << self.lp
        self.mask = self.step - 1
        self.acc = [np.zeros(shape, _F32) for _ in range(4)]
        self.count = 0

    def add_rows(self, x: np.ndarray) -> None:
        """Add rows ``x[0], x[1], ...`` (float32 ``[k, *shape]``) one after the other."""
        acc = self.acc
        i, k = 0, x.shape[0]
        while i < k:
            n = min(k - i, self.step - self.count % self.step)
            # acc0 + x[i] + x[i+1] + ... strictly left to right (accumulate is sequential)
            seg = np.concatenate([acc[0][None], x[i:i + n]])
            np.add.accumulate(seg, axis=0, out=seg)
            acc[0] = seg[-1].copy()
            i += n
            self.count += n
            if self.count % self.step == 0:
                for j in range(1, 4):
                    np.add(acc[j], acc[j - 1], out=acc[j])
                    acc[j - 1].fill(0)
                    if self.count & (self.mask << (j * self.lp)):
                        break

    def result(self) -> np.ndarray:
        r = self.acc[0].copy()
        for j in range(1, 4):
            np.add(r, self.acc[j], out=r)
        return r


class _TorchDim0Sum:
    """Bit-exact float32 ``x.sum(dim=0)`` of a contiguous ``[n, hidden]`` matrix
    as torch 2.x computes it on x86-64 CPUs (also the sum inside
    ``mean(dim=0)`` for bf16/f16/f32, whose inputs are upcast to f32 first).

    Columns are split into thread chunks (``parallel_dim_reduction``: only when
    ``n * hidden >= 32768`` and ``threads > 1``; chunk bounds rounded down to 32
    columns). In a chunk of width ``w >= 8``, blocks of 32 columns use the
    cascade over all rows and the rest ``row_sum`` (4 interleaved cascades over
    ``n // 4`` rows, leftovers into lane 0, lanes folded); for ``w < 8`` groups
    of 4 columns use the cascade. ``hidden == 1`` uses the contiguous inner
    reduction (8 lanes). Not emulated: ``hidden == 1`` with several threads
    and ``n >= 32768`` (two-pass reduction). Rows are fed in order by
    :meth:`feed`; only O(hidden) state is kept.
    """

    def __init__(self, n: int, hidden: int, threads: int = 1):
        self.n, self.hidden, self.seen = n, hidden, 0
        self.inner = hidden == 1 and n >= 8
        multi: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        for b, e in self._chunks(n, hidden, threads):
            w = e - b
            blk = 32 if w >= 8 else 4
            k = (w // blk) * blk
            multi.append(np.arange(b, b + k))
            rows.append(np.arange(b + k, e))
        self.multi_cols = np.concatenate(multi) if multi else np.zeros(0, np.int64)
        self.row_cols = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        self.multi_sel = self._selector(self.multi_cols)
        self.row_sel = self._selector(self.row_cols)
        self.multi = _Cascade(n, (len(self.multi_cols),))
        self.n4 = n // 4
        self.rowc = _Cascade(self.n4, (4, len(self.row_cols)))
        self.pending: np.ndarray | None = None
        self.leftover: list[np.ndarray] = []
        self.inner_vals: list[np.ndarray] = []

    @staticmethod
    def _selector(cols: np.ndarray) -> slice | np.ndarray:
        """A slice (no copy when indexing) for a contiguous column range."""
        if len(cols) and cols[-1] - cols[0] + 1 == len(cols):
            return slice(int(cols[0]), int(cols[-1]) + 1)
        return cols

    @staticmethod
    def _chunks(n: int, hidden: int, threads: int) -> list[tuple[int, int]]:
        if threads <= 1 or n * hidden < 32768 or hidden == 1:
            return [(0, hidden)]
        nt = min(threads, hidden)
        cs = -(-hidden // nt)
        out = []
        for t in range(nt):
            b = t * cs
            if b >= hidden:
                continue
            e = min(hidden, b + cs)
            b -= b % 32
            if e != hidden:
                e -= e % 32
            if b < e:
                out.append((b, e))
        return out

    def feed(self, block: np.ndarray) -> None:
        """Add the next rows (``[k, hidden]``, any float dtype; upcast to f32)."""
        x = np.asarray(block).astype(_F32, copy=False)
        k = x.shape[0]
        if self.seen + k > self.n:
            raise ValueError(f"fed more than {self.n} rows")
        if self.inner:
            self.inner_vals.append(x[:, 0].copy())
            self.seen += k
            return
        if len(self.multi_cols):
            self.multi.add_rows(x[:, self.multi_sel])
        if len(self.row_cols):
            xr = x[:, self.row_sel]
            n_main = max(0, min(k, 4 * self.n4 - self.seen))  # rows that belong to super-rows
            main = xr[:n_main]
            if self.pending is not None:
                main = np.concatenate([self.pending, main])
            full = (main.shape[0] // 4) * 4
            if full:
                self.rowc.add_rows(main[:full].reshape(full // 4, 4, len(self.row_cols)))
            self.pending = main[full:].copy() if full < main.shape[0] else None
            for r in xr[n_main:]:
                self.leftover.append(r.copy())
        self.seen += k

    def result(self) -> np.ndarray:
        """float32 ``[hidden]``; all ``n`` rows must have been fed."""
        if self.seen != self.n:
            raise ValueError(f"fed {self.seen} rows, expected {self.n}")
        out = np.zeros(self.hidden, _F32)
        if self.inner:
            v = np.concatenate(self.inner_vals)
            vs = self.n // 8
            lanes_c = _Cascade(vs // 4, (4, 8))
            lanes_c.add_rows(v[: 32 * (vs // 4)].reshape(vs // 4, 4, 8))
            parts = lanes_c.result()
            for s in range((vs // 4) * 4, vs):
                parts[0] += v[8 * s: 8 * s + 8]
            lanes = parts[0]
            for k in range(1, 4):
                lanes = lanes + parts[k]
            acc = np.float32(0)
            for k in range(vs * 8, self.n):
                acc = np.float32(acc + v[k])
            for k in range(8):
                acc = np.float32(acc + lanes[k])
            out[0] = acc
            return out
        if len(self.multi_cols):
            out[self.multi_cols] = self.multi.result()
        if len(self.row_cols):
            parts = self.rowc.result()
            p0 = parts[0].copy()
            for r in self.leftover:
                np.add(p0, r, out=p0)
            for k in range(1, 4):
                np.add(p0, parts[k], out=p0)
            out[self.row_cols] = p0
        return out


# ------------------------------------------------------------------ embedding alignment

_K_NONE, _K_ROW, _K_ZERO, _K_MEAN = 0, 1, 2, 3
_PAD_BLOCK_ROWS = 1024


def _ro(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _work_dtype(dtype: Any) -> np.dtype:
    d = np.dtype(dtype)
    if d not in _WORK_DTYPES:
        raise ValueError(f"embedding work dtype must be bfloat16, float16 or float32, got {d}")
    return d


def _add(a: np.ndarray, b: np.ndarray, d: np.dtype) -> np.ndarray:
    """``a + b`` as torch does it in dtype ``d`` (f32 compute, one rounding)."""
    if d == _F32:
        return a + b
    return (a.astype(_F32) + b.astype(_F32)).astype(d)


def _div(a: np.ndarray, n: int, d: np.dtype) -> np.ndarray:
    """``a / n`` (torch true division by a Python int: f32, one rounding)."""
    return (a.astype(_F32) / np.float32(n)).astype(d)


@dataclass(frozen=True, eq=False)
class EmbeddingAlignment:
    """Row mapping from the models' embedding matrices to the output vocabulary.

    ``rows`` = ``padded_vocab_size``; ``num_tokens`` = ``len(tokens)``;
    ``model_keys[m]`` names model ``m`` (the order given to
    :func:`align_embeddings`, which is also the order in which default means
    are accumulated). Immutable except for a private cache of padding means
    keyed by ``(m, dtype, tensor)`` and checked against two probe rows. One
    instance per output tensor (or a distinct ``tensor`` key per tensor)
    avoids recomputing the mean when tensors alternate.
    """

    rows: int
    num_tokens: int
    model_keys: tuple[str, ...]
    base_index: int | None
    torch_threads: int
    _perm: tuple[np.ndarray, ...] = field(repr=False)
    _forced: np.ndarray = field(repr=False)
    _kind: np.ndarray = field(repr=False)
    _src_model: np.ndarray = field(repr=False)
    _src_row: np.ndarray = field(repr=False)
    _pad_cache: dict = field(default_factory=dict, repr=False)

    def permutation(self, m: int) -> np.ndarray:
        """int64 ``[num_tokens]`` (read-only): row of output token ``o`` in model
        ``m``'s original matrix, or ``-1`` when the model lacks it."""
        return self._perm[m]

    def default_kind(self, o: int) -> str:
        """How token ``o``'s default vector is made: ``"none"`` (not needed),
        ``"row"``, ``"zero"`` or ``"mean"``."""
        return ("none", "row", "zero", "mean")[int(self._kind[o])]

    def forced(self, o: int) -> bool:
        """Whether every model uses token ``o``'s configured vector."""
        return bool(self._forced[o])

    def for_tensor(self) -> "EmbeddingAlignment":
        """A copy with an empty padding cache (shares the read-only arrays)."""
        return EmbeddingAlignment(
            self.rows, self.num_tokens, self.model_keys, self.base_index, self.torch_threads,
            self._perm, self._forced, self._kind, self._src_model, self._src_row,
        )

    # -- row reading

    @staticmethod
    def _read(read_rows: Callable[[int, np.ndarray], np.ndarray], m: int, ids: np.ndarray, d: np.dtype,
              hidden: int | None) -> np.ndarray:
        x = np.asarray(read_rows(m, np.ascontiguousarray(ids, dtype=np.int64)))
        if x.ndim != 2 or x.shape[0] != len(ids) or (hidden is not None and x.shape[1] != hidden):
            raise ValueError(f"read_rows({m}, ...) returned shape {x.shape} for {len(ids)} rows")
        return x.astype(d, copy=False)

    def aligned_rows(
        self,
        m: int,
        r0: int,
        r1: int,
        read_rows: Callable[[int, np.ndarray], np.ndarray],
        dtype: Any,
        *,
        tensor: Hashable = None,
    ) -> np.ndarray:
        """Model ``m``'s aligned embedding rows ``[r0, r1)``.

        Returns a new array ``[r1 - r0, hidden]`` of ``dtype`` (``ml_dtypes.bfloat16``,
        ``np.float16`` or ``np.float32``; the working dtype of the merge).
        ``read_rows(j, ids)`` must return rows ``ids`` (int64 ``[k]``, ``k`` may
        be 0) of model ``j``'s ORIGINAL matrix of this tensor as ``[k, hidden]``
        in any float dtype; it is called for other models too (default vectors).
        Rows ``>= num_tokens`` are padding: the first request computes the
        model's padding mean with one full pass over its ``num_tokens`` aligned
        rows (the one non-streaming step), cached per ``(m, dtype, tensor)``.
        """
        d = _work_dtype(dtype)
        if not (0 <= m < len(self._perm)):
            raise IndexError(f"model index {m} out of range")
        if not (0 <= r0 <= r1 <= self.rows):
            raise IndexError(f"rows [{r0}, {r1}) out of range [0, {self.rows})")
        T = self.num_tokens
        a, b = min(r0, T), min(r1, T)
        hidden: int | None = None
        parts: list[tuple[np.ndarray, np.ndarray]] = []  # (positions in block, rows)

        p = self._perm[m][a:b]
        use = (p >= 0) & ~self._forced[a:b]
        pos = np.nonzero(use)[0]
        if len(pos):
            x = self._read(read_rows, m, p[pos], d, hidden)
            hidden = x.shape[1]
            parts.append((pos, x))
        need = np.nonzero(~use)[0]
        kinds = self._kind[a:b][need]
        # model-row defaults, one read per source model
        rowpos = need[kinds == _K_ROW]
        if len(rowpos):
            src_m = self._src_model[a:b][rowpos]
            src_r = self._src_row[a:b][rowpos]
            for j in np.unique(src_m):
                sel = src_m == j
                x = self._read(read_rows, int(j), src_r[sel], d, hidden)
                hidden = x.shape[1]
                parts.append((rowpos[sel], x))
        # means: accumulate in model order from a zero row, then divide
        meanpos = need[kinds == _K_MEAN]
        mean_rows = None
        if len(meanpos):
            toks = meanpos + a
            acc = None
            count = np.zeros(len(toks), np.int64)
            for j in range(len(self._perm)):
                pj = self._perm[j][toks]
                sel = np.nonzero(pj >= 0)[0]
                if not len(sel):
                    continue
                x = self._read(read_rows, j, pj[sel], d, hidden)
                hidden = x.shape[1]
                if acc is None:
                    acc = np.zeros((len(toks), hidden), d)
                acc[sel] = _add(acc[sel], x, d)
                count[sel] += 1
            assert acc is not None and (count >= 2).all()
            mean_rows = np.empty_like(acc)
            for c in np.unique(count):
                sel = count == c
                mean_rows[sel] = _div(acc[sel], int(c), d)
            parts.append((meanpos, mean_rows))
        if hidden is None:
            hidden = self._read(read_rows, m, np.zeros(0, np.int64), d, None).shape[1]
        out = np.zeros((r1 - r0, hidden), d)  # zero defaults stay zero
        for where, x in parts:
            out[where] = x
        if r1 > T:
            out[max(r0, T) - r0:] = self.padding_row(m, read_rows, d, tensor=tensor)
        return out

    def padding_row(
        self, m: int, read_rows: Callable[[int, np.ndarray], np.ndarray], dtype: Any, *, tensor: Hashable = None
    ) -> np.ndarray:
        """``[hidden]`` of ``dtype`` (read-only): torch ``mean(dim=0)`` of model
        ``m``'s first ``num_tokens`` aligned rows. Streams the rows in blocks
        (a full pass over the model's matrix). Cached per ``(m, dtype, tensor)``;
        a hit is only used if two probe rows read through ``read_rows`` still
        match, so an instance shared by several tensors stays correct."""
        d = _work_dtype(dtype)
        key = (m, d.name, tensor)
        present = np.nonzero(self._perm[m] >= 0)[0]
        probe = self._perm[m][present[[0, -1]]] if len(present) else np.zeros(0, np.int64)
        fp = np.ascontiguousarray(np.asarray(read_rows(m, probe))).tobytes()
        hit = self._pad_cache.get(key)
        if hit is not None and hit[0] == fp:
            return hit[1]
        T = self.num_tokens
        if T == 0:
            raise TokenizerError("output vocabulary is empty; cannot compute padding rows")
        acc: _TorchDim0Sum | None = None
        for s in range(0, T, _PAD_BLOCK_ROWS):
            blk = self.aligned_rows(m, s, min(T, s + _PAD_BLOCK_ROWS), read_rows, d)
            if acc is None:
                acc = _TorchDim0Sum(T, blk.shape[1], self.torch_threads)
            acc.feed(blk)
        assert acc is not None
        row = _ro((acc.result() / np.float32(T)).astype(d))
        self._pad_cache[key] = (fp, row)
        return row


def align_embeddings(
    out: OutputTokenizer,
    models: Sequence[ModelTokenizer],
    model_keys: Sequence[str],
    base_index: int | None,
    overrides: Mapping[str, TokenOverride],
    *,
    torch_threads: int = 1,
) -> EmbeddingAlignment:
    """Permutations and default-vector plan for the models of one embedding tensor.

    ``models[i]`` / ``model_keys[i]``: the models that have this tensor, in
    mergekit's tensor order (slice-source order); default means accumulate in
    this order. ``base_index``: position of the base model in ``models`` or
    ``None``. ``overrides``: ``tokenizer.tokens``. ``torch_threads``: torch's
    intra-op thread count of the reference run (only matters for padding when
    ``hidden % 32 != 0``). Raises TokenizerError when a needed override cannot
    be resolved (unknown model, token missing from that model, id out of range).
    Cost: one dict lookup per (token, model); no weights are read.
    """
    if len(models) != len(model_keys):
        raise ValueError("models and model_keys must have the same length")
    if base_index is not None and not (0 <= base_index < len(models)):
        raise ValueError(f"base_index {base_index} out of range")
    toks = out.tokens
    T = len(toks)
    perms = []
    for mt in models:
        limit = mt.config_vocab_size if mt.config_vocab_size is not None else len(mt.vocab)
        get = mt.vocab.get
        p = np.fromiter((get(t, -1) for t in toks), dtype=np.int64, count=T)
        p[p >= limit] = -1
        perms.append(_ro(p))
    present = np.stack(perms) >= 0 if perms else np.zeros((0, T), bool)
    n_present = present.sum(axis=0) if perms else np.zeros(T, np.int64)
    forced = np.zeros(T, bool)
    kind = np.full(T, _K_NONE, np.int8)
    src_m = np.full(T, -1, np.int64)
    src_r = np.full(T, -1, np.int64)
    missing = n_present < len(models)

    one = missing & (n_present == 1)
    kind[one] = _K_ROW
    src_m[one] = np.argmax(present[:, one], axis=0) if one.any() else src_m[one]
    src_r[one] = [perms[j][o] for j, o in zip(src_m[one], np.nonzero(one)[0])]
    kind[missing & (n_present == 0)] = _K_ZERO
    many = missing & (n_present >= 2)
    if base_index is not None:
        from_base = many & present[base_index]
        kind[from_base] = _K_ROW
        src_m[from_base] = base_index
        src_r[from_base] = perms[base_index][from_base]
        many &= ~from_base
    kind[many] = _K_MEAN

    index = {k: i for i, k in enumerate(model_keys)}
    vocab_ids = out.vocab
    for tok, ov in overrides.items():
        o = vocab_ids.get(tok)
        if o is None:
            raise TokenizerError(f"tokenizer.tokens: {tok!r} is not in the output vocabulary")
        forced[o] = ov.force
        if not (ov.force or missing[o]):
            kind[o] = _K_NONE
            continue
        if ov.kind == "zero":
            kind[o], src_m[o], src_r[o] = _K_ZERO, -1, -1
            continue
        j = index.get(ov.model)  # type: ignore[arg-type]
        if j is None:
            raise TokenizerError(
                f"tokenizer.tokens.{tok}: needs a row from model {ov.model!r}, which is not among this tensor's models"
            )
        mt = models[j]
        if ov.kind == "model":
            row = int(perms[j][o])
            if row < 0:
                raise TokenizerError(f"tokenizer.tokens.{tok}: token {tok!r} not found in model {ov.model!r}")
        elif ov.kind == "model_token":
            if ov.token_id is not None:
                row = int(ov.token_id)
            else:
                row = mt.vocab.get(ov.token, -1)  # type: ignore[arg-type]
                if j == base_index and mt.config_vocab_size is not None and row >= mt.config_vocab_size:
                    row = -1  # the base's vocabulary is the stripped one
                if row < 0:
                    raise TokenizerError(f"tokenizer.tokens.{tok}: token {ov.token!r} not found in model {ov.model!r}")
            if row < 0 or (mt.config_vocab_size is not None and row >= mt.config_vocab_size):
                raise TokenizerError(f"tokenizer.tokens.{tok}: token id {row} out of range for model {ov.model!r}")
        else:
            raise TokenizerError(f"tokenizer.tokens.{tok}: unknown source kind {ov.kind!r}")
        kind[o], src_m[o], src_r[o] = _K_ROW, j, row
    return EmbeddingAlignment(
        rows=out.padded_vocab_size,
        num_tokens=T,
        model_keys=tuple(model_keys),
        base_index=base_index,
        torch_threads=int(torch_threads),
        _perm=tuple(perms),
        _forced=_ro(forced),
        _kind=_ro(kind),
        _src_model=_ro(src_m),
        _src_row=_ro(src_r),
    )
