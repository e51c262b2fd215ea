"""``tokenizer.tokens``: the configured vectors of single tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..errors import ConfigError

__all__ = ["TokenOverride", "overrides_from_config"]


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

