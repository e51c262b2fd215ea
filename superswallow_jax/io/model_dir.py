"""Hugging Face model folders: finding them, reading config.json, the model card.

A model reference resolves to a local folder:

1. an existing directory path (absolute, or relative to the working directory)
   is used as is;
2. otherwise a reference of the form ``org/name`` (optionally ``@revision``) is
   looked up in ``$SUPERSWALLOW_MODEL_CACHE/org/name`` (or ``org--name``),
   plain folders kept by hand;
3. then it is a Hugging Face id, resolved by :mod:`.hub` through
   huggingface_hub: the Hugging Face cache first, else a download of the files
   a merge reads (unless offline).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelError, short

if TYPE_CHECKING:
    from .hub import HubAccess, HubSource


#: Files copied from the donor model into the output as they are (with the tokenizer's).
COPY_FILES = ("generation_config.json",)
#: The tokenizer files a merge reads or copies (the small files a download fetches besides config.json).
TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json",
)


def _cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("SUPERSWALLOW_MODEL_CACHE"):
        dirs.append(Path(os.environ["SUPERSWALLOW_MODEL_CACHE"]).expanduser())
    return dirs


def resolve_model(ref: str, hub: HubAccess | None = None, what: str = "model") -> tuple[Path, HubSource | None]:
    """Map a model (or LoRA adapter) reference to an existing local folder, or raise ModelError (one line).

    Returns the folder and, for a Hugging Face id, where it came from (repo,
    revision asked for, commit). ``hub``: how ids may reach the Hub (default:
    the cache, then downloads unless ``HF_HUB_OFFLINE``). ``what``: ``model``
    or ``adapter`` (an adapter id fetches ``adapter_config.json`` and its weights).
    """
    path = ref.partition("@")[0]
    p = Path(path).expanduser()
    if p.is_dir():
        return p.resolve(), None
    if p.exists():
        raise ModelError(f"{what} {short(ref)}: {p} is a file, expected a {what} folder")
    looked = [str(p)]
    parts = path.split("/")
    if len(parts) == 2 and all(parts):
        org, name = parts
        for c in _cache_dirs():
            for cand in (c / org / name, c / f"{org}--{name}"):
                looked.append(str(cand))
                if cand.is_dir():
                    return cand.resolve(), None
        if looks_like_hf_id(ref):
            from .hub import resolve_hub_adapter, resolve_hub_model

            return resolve_hub_adapter(ref, hub) if what == "adapter" else resolve_hub_model(ref, hub)
    raise ModelError(f"{what} {short(ref)} not found locally (looked in: {', '.join(looked)}); "
                     f"a {what} is a folder, or a Hugging Face id org/name[@revision]")


def resolve_model_dir(ref: str, hub: HubAccess | None = None, what: str = "model") -> Path:
    """The local folder of a model or adapter reference (:func:`resolve_model` without the source)."""
    return resolve_model(ref, hub, what)[0]


def check_inside(path: Path, model_dir: Path) -> Path:
    """``path`` (a file of ``model_dir``) if it resolves inside the model folder, else a ModelError.

    Symlinks are followed only within the folder, or, for a Hugging Face
    cache snapshot (``models--org--name/snapshots/<rev>``), within the repo's
    cache folder, whose ``blobs/`` hold the files the snapshot links to. A
    link anywhere else (another user's file, ``/etc/...``) is refused.
    """
    root = Path(model_dir).resolve()
    roots = [root, root.parent.parent] if root.parent.name == "snapshots" else [root]
    real = Path(path).resolve()
    if not any(real == r or r in real.parents for r in roots):
        raise ModelError(f"{path}: links to {real}, outside the model folder; copy the file into the folder")
    return Path(path)


#: config.json keys that, when present, must be positive integers (a string there would
#: otherwise make the planner guess the layer count from tensor names).
_POSITIVE_INTS = ("vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "n_layer", "num_layers")
MAX_CONFIG_JSON_BYTES = 16 << 20


def read_model_config(model_dir: Path) -> dict:
    """Parse ``config.json`` of a model folder (its size-related keys checked)."""
    path = Path(model_dir) / "config.json"
    try:
        check_inside(path, model_dir)
        if path.stat().st_size > MAX_CONFIG_JSON_BYTES:
            raise ModelError(f"{path}: larger than the {MAX_CONFIG_JSON_BYTES:,}-byte limit for a config.json")
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: missing (every model folder needs a config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ModelError(f"{path}: not valid JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: must be a JSON object")
    for key in _POSITIVE_INTS:
        v = obj.get(key)
        if key in obj and v is not None and (type(v) is not int or v <= 0):
            raise ModelError(f"{path}: {key}: must be a positive integer, got {short(v)}")
    return obj


def looks_like_hf_id(ref: str) -> bool:
    """A Hugging Face id: ``org/name`` (mergekit's rule: not starting with / ~ or ., one '/'),
    and not a folder that exists here (``models/swallow`` is a local path, not a repo)."""
    path = ref.partition("@")[0]
    if path.startswith(("/", "~", ".")) or path.count("/") != 1:
        return False
    return not Path(path).expanduser().exists()


def model_card(name: str, method_pretty: str, method_ref: str, base: str | None, others: list[str], config_text: str, show_base: bool) -> str:
    """A README.md model card holding the merge config (mergekit's layout)."""
    hf = [m for m in ([base] if base else []) + others if looks_like_hf_id(m)]
    front = ["---"]
    if hf:
        front.append("base_model:")
        front += [f"- {m}" for m in hf]
    front += ["library_name: transformers", "tags:", "- mergekit", "- merge", "- superswallow_jax", "---"]

    def link(m: str) -> str:
        return f"[{m}](https://huggingface.co/{m})" if looks_like_hf_id(m) else m

    method = f"[{method_pretty}]({method_ref})" if method_ref else method_pretty
    base_clause = f" using {link(base)} as a base" if (base and show_base) else ""
    lines = front + [
        f"# {name}",
        "",
        "This is a merge of pre-trained language models created with "
        "superswallow_jax, which reads "
        "[mergekit](https://github.com/arcee-ai/mergekit) configurations.",
        "",
        "## Merge Details",
        "### Merge Method",
        "",
        f"This model was merged using the {method} merge method{base_clause}.",
        "",
        "### Models Merged",
        "",
        "The following models were included in the merge:",
    ]
    lines += [f"* {link(m)}" for m in others]
    lines += [
        "",
        "### Configuration",
        "",
        "The following YAML configuration was used to produce this model:",
        "",
        "```yaml",
        config_text.rstrip("\n"),
        "```",
        "",
    ]
    return "\n".join(lines)
