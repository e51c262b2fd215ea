"""Sentencepiece ``tokenizer.model`` files, converted as transformers v5 converts them.

Llama-2 and its fine-tunes (``allenai/tulu-2-dpo-70b``,
``tokyotech-llm/Swallow-70b-instruct-hf``, ...) publish only a sentencepiece
model plus ``tokenizer_config.json``. transformers v5 loads such a folder as a
``LlamaTokenizer`` built on the ``tokenizers`` library; :func:`tokenizer_json`
builds the same thing with ``tokenizers`` (reading the model with
``sentencepiece``'s protobuf schema) and returns it as parsed
``tokenizer.json``, so the rest of :mod:`superswallow_jax.tokenizer` treats it
like any fast tokenizer:

* model: BPE over the pieces (id = position in the model); the merges are
  every split of a piece into two pieces of the vocabulary, ordered by the
  piece's id, then by the length of the left part; ``fuse_unk`` and
  ``byte_fallback`` on, no unknown token;
* no normalizer; pre-tokenizer ``Metaspace("▁", prepend_scheme, split=False)``
  with ``prepend_scheme`` ``"never"`` when ``add_prefix_space`` is false,
  else ``"first"``, or ``"always"`` when ``legacy`` is true
  (:func:`prepend_scheme`; transformers v5's defaults are
  ``add_prefix_space=True``, ``legacy=False``);
* decoder: ``Replace("▁", " ")``, ``ByteFallback``, ``Fuse``, then
  ``Strip(" ", 1, 0)`` when ``add_prefix_space``;
* post-processor: the bos token before each sequence (``add_bos_token``,
  default true) and the eos token after it (``add_eos_token``, default false);
* added tokens: the unknown and control pieces (special) and user-defined
  pieces (not special), none normalized, at their own ids.

Only BPE models of the Llama tokenizer classes are converted; others raise
:class:`~superswallow_jax.errors.TokenizerError` naming the file (save a
``tokenizer.json`` with transformers once). ``sentencepiece``, ``protobuf``
and ``tokenizers`` are imported only when a model is converted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ..errors import TokenizerError

__all__ = ["LLAMA_CLASSES", "MAX_MODEL_BYTES", "SPACE", "make_portable", "prepend_scheme", "tokenizer_json"]

SPACE = "\u2581"
MAX_MODEL_BYTES = 64 << 20
#: ``tokenizer_class`` values whose sentencepiece models convert as Llama's (absent also counts).
LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BPE = 2


def prepend_scheme(cfg: Mapping[str, Any] | None) -> str:
    """transformers v5's Metaspace ``prepend_scheme`` for a Llama ``tokenizer_config``."""
    cfg = cfg or {}
    if cfg.get("add_prefix_space") is False:
        return "never"
    return "always" if cfg.get("legacy") is True else "first"


def _load_proto(path: Path) -> Any:
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise TokenizerError(f"{path}: reading sentencepiece models needs the sentencepiece and protobuf packages ({e})") from None
    try:
        size = path.stat().st_size
        if size > MAX_MODEL_BYTES:
            raise TokenizerError(f"{path}: {size} bytes, larger than the {MAX_MODEL_BYTES}-byte limit for a sentencepiece model")
        m = pb.ModelProto()
        m.ParseFromString(path.read_bytes())
    except TokenizerError:
        raise
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read: {e.strerror or e}") from None
    except Exception as e:  # protobuf's DecodeError and friends
        raise TokenizerError(f"{path}: not a sentencepiece model ({type(e).__name__})") from None
    return m


def _check(path: Path, m: Any, cfg: Mapping[str, Any] | None) -> list[str]:
    cls = (cfg or {}).get("tokenizer_class")
    if cls is not None and cls not in LLAMA_CLASSES:
        raise TokenizerError(
            f"{path}: tokenizer_class {str(cls)[:80]!r} with only a sentencepiece model; only Llama-family models "
            f"({', '.join(LLAMA_CLASSES)}) are converted, save a tokenizer.json with transformers once"
        )
    if m.trainer_spec.model_type != _BPE:
        raise TokenizerError(f"{path}: sentencepiece model type {m.trainer_spec.model_type} is not BPE; only BPE "
                             "(Llama-family) models are converted, save a tokenizer.json with transformers once")
    pieces = [p.piece for p in m.pieces]
    if not pieces:
        raise TokenizerError(f"{path}: the sentencepiece model has no pieces")
    if len(set(pieces)) != len(pieces):
        dup = next(p for i, p in enumerate(pieces) if p in pieces[:i])
        raise TokenizerError(f"{path}: piece {dup[:80]!r} appears twice")
    return pieces


def _merges(vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces, by piece id, then left length."""
    out = []
    for piece, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                out.append((left, right))
    return out


def _template(cfg: Mapping[str, Any], pieces: list[str], m: Any) -> Any:
    from tokenizers import processors

    def special(key: str, spec_id: int) -> str | None:
        want = cfg.get(f"add_{key}_token", key == "bos")
        return pieces[spec_id] if want and 0 <= spec_id < len(pieces) else None

    bos, eos = special("bos", m.trainer_spec.bos_id), special("eos", m.trainer_spec.eos_id)
    single = " ".join(x for x in (f"{bos}:0" if bos else "", "$A:0", f"{eos}:0" if eos else "") if x)
    pair = single + " " + " ".join(x for x in (f"{bos}:1" if bos else "", "$B:1", f"{eos}:1" if eos else "") if x)
    specials = [(t, pieces.index(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def tokenizer_json(path: Path, cfg: Mapping[str, Any] | None) -> dict:
    """The parsed ``tokenizer.json`` transformers v5 builds from ``path`` and ``cfg``
    (the folder's ``tokenizer_config.json``, or None). Raises TokenizerError."""
    path = Path(path)
    m = _load_proto(path)
    pieces = _check(path, m, cfg)
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    cfg = cfg or {}
    vocab = {p: i for i, p in enumerate(pieces)}
    try:
        tok = Tokenizer(BPE(vocab=vocab, merges=_merges(vocab), fuse_unk=True, byte_fallback=True, dropout=None))
        scheme = prepend_scheme(cfg)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme=scheme, split=False)
        steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        if scheme != "never":
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        tok.decoder = decoders.Sequence(steps)
        tok.post_processor = _template(cfg, pieces, m)
        kinds = {_UNKNOWN: True, _CONTROL: True, _USER_DEFINED: False}
        tok.add_tokens([AddedToken(p.piece, special=kinds[p.type], normalized=False)
                        for p in m.pieces if p.type in kinds])
        return json.loads(tok.to_str())
    except Exception as e:  # tokenizers raises plain Exceptions for bad vocabularies
        raise TokenizerError(f"{path}: cannot convert the sentencepiece model ({type(e).__name__}: {str(e)[:200]})") from None


def make_portable(tj: dict, cfg: dict) -> None:
    """Make a converted Llama tokenizer load alike in transformers 4.x and 5.x (in place).

    ``tj``: parsed ``tokenizer.json`` built by :func:`tokenizer_json`; ``cfg``:
    the ``tokenizer_config.json`` to write with it. transformers v5 rebuilds a
    ``LlamaTokenizer``'s pre-tokenizer from ``add_prefix_space`` and ``legacy``
    (defaults true and false) and its ``save_pretrained`` drops ``legacy``, so
    mergekit's output reloads with ``legacy`` false. transformers 4.x reads
    ``tokenizer.json`` as written, unless ``add_prefix_space`` is set, which
    sends it to the slow tokenizer and its ``tokenizer.model``. So ``legacy``
    is written false, a true ``add_prefix_space`` is dropped, and the
    pre-tokenizer's scheme is what v5 derives from the result.
    """
    cfg["legacy"] = False
    if cfg.get("add_prefix_space") is True:
        del cfg["add_prefix_space"]
    pre = tj.get("pre_tokenizer")
    if isinstance(pre, dict) and pre.get("type") == "Metaspace":
        pre["prepend_scheme"] = prepend_scheme(cfg)
