"""The merged tokenizer: its vocabulary and the files written for it.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import OutputError, TokenizerError
from ..io.commit import json_bytes
from .load import _LIST_ATTRS, _SPECIAL_ATTRS, ModelTokenizer, _json_copy, _special_values, _Vocab
from .overrides import TokenOverride

__all__ = ["OutputTokenizer", "build_output_tokenizer", "tokenizer_files", "write_tokenizer"]


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


@dataclass(frozen=True, eq=False)
class OutputTokenizer:
    """The merged tokenizer.

    ``tokens[i]`` is the token with id ``i`` (``len(tokens)`` = output vocab
    before padding); ``padded_vocab_size`` is that rounded up to
    ``pad_to_multiple_of`` (config.json's ``vocab_size``; padding rows are not
    in the tokenizer). ``tokenizer_json`` / ``tokenizer_config`` /
    ``special_tokens_map`` are the file contents :func:`write_tokenizer`
    writes (``tokenizer_config`` without ``chat_template``).
    ``sentencepiece_model``: a ``tokenizer.model`` to copy beside them (the
    source's, when its vocabulary is the output's model vocabulary), or None.
    """

    tokens: tuple[str, ...]
    tokenizer_json: dict
    tokenizer_config: dict | None
    special_tokens_map: dict | None
    padded_vocab_size: int
    source: str = "union"
    sentencepiece_model: Path | None = None

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
    sp_model = None
    if owner.sentencepiece is not None:  # converted: same behaviour in transformers 4.x and 5.x
        from .sentencepiece import make_portable

        make_portable(tj, cfg)
        if tj["model"]["vocab"] == owner.model_vocab:
            sp_model = owner.sentencepiece
    return OutputTokenizer(tuple(tokens), tj, cfg, stm, padded, source, sp_model)  # type: ignore[arg-type]


def tokenizer_files(tok: OutputTokenizer, chat_template: str | None) -> dict[str, bytes]:
    """The files of the merged tokenizer, by name: ``tokenizer.json``,
    ``tokenizer_config.json`` (with ``chat_template`` when given),
    ``special_tokens_map.json`` (only if the source had one) and
    ``tokenizer.model`` (when :attr:`OutputTokenizer.sentencepiece_model` is
    set). ``tok`` is not modified."""
    cfg = _json_copy(tok.tokenizer_config) if tok.tokenizer_config is not None else {}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    out: dict[str, bytes] = {}
    if tok.sentencepiece_model is not None:
        try:
            out["tokenizer.model"] = Path(tok.sentencepiece_model).read_bytes()
        except OSError as e:
            raise TokenizerError(f"{tok.sentencepiece_model}: cannot read: {e.strerror or e}") from None
    out["tokenizer.json"] = json_bytes(tok.tokenizer_json)
    out["tokenizer_config.json"] = json_bytes(cfg)
    if tok.special_tokens_map is not None:
        out["special_tokens_map.json"] = json_bytes(tok.special_tokens_map)
    return out


def write_tokenizer(out_dir: Path, tok: OutputTokenizer, chat_template: str | None) -> list[Path]:
    """Write :func:`tokenizer_files` into ``out_dir``; returns the written paths."""
    written = []
    for name, data in tokenizer_files(tok, chat_template).items():
        path = Path(out_dir) / name
        try:
            path.write_bytes(data)
        except OSError as e:
            raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None
        written.append(path)
    return written
