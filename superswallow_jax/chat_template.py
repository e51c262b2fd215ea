"""The config's ``chat_template``: ``auto``, a built-in name, or a literal Jinja template.

* ``auto`` -- the most common ``chat_template`` among the models'
  ``tokenizer_config.json`` (ties: the first in config order, base first);
  none found means no template is set.
* A built-in name (``alpaca``, ``chatml``, ``exaone``, ``llama3``,
  ``mistral``), as mergekit accepts them: the template of that well-known
  format, from ``superswallow_jax/chat_templates/<name>.jinja`` (written
  here from each format's public description, so its text is not mergekit's
  file byte for byte).
* Anything else is the template itself; like mergekit we require at least 20
  characters and a ``{`` so that a typo of a name is not taken as a template.
"""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Sequence

from .errors import ConfigError, short

BUILTIN = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def _model_template(model_dir: Path) -> str | None:
    path = Path(model_dir) / "tokenizer_config.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def resolve_chat_template(value: str | None, model_dirs: Sequence[Path]) -> str | None:
    """The template text to write, or None to keep the tokenizer's own."""
    if value is None:
        return None
    if value == "auto":
        found = [t for t in (_model_template(d) for d in model_dirs) if t is not None]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in BUILTIN:
        return resources.files(__package__).joinpath("chat_templates", f"{value}.jinja").read_text(encoding="utf-8")
    if len(value) < 20 or "{" not in value:
        raise ConfigError(f"chat_template: {short(value)} is neither 'auto', a built-in name nor a Jinja template")
    return value
