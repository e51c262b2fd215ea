"""``base+adapter`` model references (mergekit's form): a model, optionally with a LoRA adapter to apply."""

from __future__ import annotations

from ..errors import ConfigError, short


def split_reference(ref: str, where: str = "model") -> tuple[str, str | None]:
    """``"base+adapter"`` -> ``("base", "adapter")``; ``"base"`` -> ``("base", None)``.

    Each part may carry an ``@revision``. More than one ``+``, or an empty
    part, is a ConfigError naming ``where``.
    """
    parts = ref.split("+")
    if len(parts) > 2:
        raise ConfigError(f"{where}: {short(ref)}: at most one '+' (base+adapter)")
    if any(not p.strip() for p in parts):
        raise ConfigError(f"{where}: {short(ref)}: base+adapter needs a model and an adapter on either side of '+'")
    return (parts[0].strip(), parts[1].strip()) if len(parts) == 2 else (parts[0].strip(), None)
