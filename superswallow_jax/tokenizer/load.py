"""One input model's tokenizer, loaded as transformers v5 loads it.

Loading (:func:`load_model_tokenizer`)
    ``tokenizer.json`` (or, without one, a sentencepiece ``tokenizer.model``), plus ``tokenizer_config.json`` and
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

A folder with no ``tokenizer.json`` but a sentencepiece ``tokenizer.model``
is read through :mod:`.sentencepiece`, which builds the ``tokenizer.json``
transformers v5 would build from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from ..errors import TokenizerError
from ..io.model_dir import check_inside

__all__ = ["ModelTokenizer", "load_model_tokenizer"]

_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_LIST_ATTRS = ("additional_special_tokens", "extra_special_tokens")
_MODEL_TYPES = ("BPE", "WordPiece", "WordLevel", "Unigram")


# ------------------------------------------------------------------ helpers


#: Largest tokenizer file read (a 256K-token tokenizer.json is about 20 MB).
MAX_TOKENIZER_BYTES = 256 << 20


def _read_json(path: Path, what: str) -> Any:
    try:
        if path.stat().st_size > MAX_TOKENIZER_BYTES:
            raise TokenizerError(f"{path}: larger than the {MAX_TOKENIZER_BYTES:,}-byte limit for a tokenizer file")
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except RecursionError:
        raise TokenizerError(f"{path}: cannot read {what}: nested too deeply") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
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
    unknown (mergekit's fallbacks apply). ``sentencepiece`` is the
    ``tokenizer.model`` that ``tokenizer_json`` was built from, or ``None``
    when the folder has a ``tokenizer.json``.
    """

    model_dir: Path
    tokenizer_json: dict
    tokenizer_config: dict | None
    special_tokens_map: dict | None
    vocab: Mapping[str, int]
    added: Mapping[str, dict]
    config_vocab_size: int | None
    model_vocab: Mapping[str, int] = field(default_factory=dict)
    sentencepiece: Path | None = None

    @property
    def model_type(self) -> str:
        m = self.tokenizer_json.get("model", {})
        return m.get("type") or ("BPE" if "merges" in m else "?")

    def _state(self) -> _Vocab:
        return _Vocab(self.model_vocab, self.added.values())


def _optional_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    check_inside(path, path.parent)
    obj = _read_json(path, path.name)
    if not isinstance(obj, dict):
        raise TokenizerError(f"{path}: not a JSON object")
    return obj


def _tokenizer_json(model_dir: Path, cfg: dict | None) -> tuple[dict, Path | None]:
    """Parsed ``tokenizer.json``, or the one built from ``tokenizer.model``
    (then also that file's path)."""
    tj_path = model_dir / "tokenizer.json"
    for name in ("tokenizer.json", "tokenizer.model"):
        if (model_dir / name).is_file():
            check_inside(model_dir / name, model_dir)
    if tj_path.is_file():
        tj = _read_json(tj_path, "tokenizer.json")
        if not isinstance(tj, dict):
            raise TokenizerError(f"{tj_path}: not a JSON object")
        return tj, None
    sp_path = model_dir / "tokenizer.model"
    if sp_path.is_file():
        from .sentencepiece import tokenizer_json

        return tokenizer_json(sp_path, cfg), sp_path
    raise TokenizerError(f"{model_dir}: no tokenizer.json or sentencepiece tokenizer.model (needed for tokenizer merging)")


def load_model_tokenizer(model_dir: Path, config_vocab_size: int | None) -> ModelTokenizer:
    """Load ``model_dir``'s tokenizer files (see module docstring).

    Raises :class:`TokenizerError` naming the folder or file when both
    ``tokenizer.json`` and ``tokenizer.model`` are missing, or a file is
    unreadable or of an unsupported type.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise TokenizerError(f"{model_dir}: model folder not found")
    cfg = _optional_json(model_dir / "tokenizer_config.json")
    stm = _optional_json(model_dir / "special_tokens_map.json")
    tj, sp_path = _tokenizer_json(model_dir, cfg)
    where = sp_path or model_dir / "tokenizer.json"
    mv = _model_vocab(tj, where)
    raw_added = tj.get("added_tokens") or []
    if not isinstance(raw_added, list) or not all(
        isinstance(e, dict) and isinstance(e.get("content"), str) and type(e.get("id")) is int and e["id"] >= 0
        for e in raw_added
    ):
        raise TokenizerError(f"{where}: added_tokens must be a list of {{id, content, ...}} objects")
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
        sentencepiece=sp_path,
    )


def _json_copy(x: Any) -> Any:
    """A deep copy of parsed JSON (dicts, lists, scalars), faster than
    ``copy.deepcopy``, which keeps a memo for shared and cyclic objects that
    parsed JSON cannot have."""
    if type(x) is dict:
        return {k: _json_copy(v) for k, v in x.items()}
    if type(x) is list:
        return [_json_copy(v) for v in x]
    return x
