"""The small files of an output folder, as bytes: everything but the weight shards and the manifest.

``config.json`` (vocab size, dtype and layer count updated by the plan), the
tokenizer (built when the config merges tokenizers, else copied from the
donor: the base model, or the first model), ``generation_config.json``, the
model card (``README.md``) and the config itself (``mergekit_config.yml``).
Being bytes in memory, the same function serves the merge (written into the
staging folder) and ``verify`` (compared with a folder's files).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelError
from .io import model_dir as md
from .io.commit import json_bytes
from .plan import Plan

__all__ = ["COPY_FILES", "MAX_COPIED_BYTES", "TOKENIZER_FILES", "extra_files"]

COPY_FILES = md.COPY_FILES
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
TOKENIZER_FILES = md.TOKENIZER_FILES
#: A donor file larger than this is refused (tokenizer.json of a 256K vocabulary is about 20 MB).
MAX_COPIED_BYTES = 512 << 20


def _read(path: Path) -> bytes:
    md.check_inside(path, path.parent)
    try:
        size = path.stat().st_size
        if size > MAX_COPIED_BYTES:
            raise ModelError(f"{path}: {size:,} bytes, larger than the {MAX_COPIED_BYTES:,}-byte limit for a copied file")
        return path.read_bytes()
    except OSError as e:
        raise ModelError(f"{path}: cannot read: {e.strerror or e}") from None


def _tokenizer(plan: Plan, donor: Path) -> dict[str, bytes]:
    if plan.tokenizer is not None:
        from .tokenizer import tokenizer_files

        out = tokenizer_files(plan.tokenizer, plan.chat_template)
        for name in COPY_FILES:
            if (donor / name).is_file():
                out[name] = _read(donor / name)
        return out
    skip = CHAT_TEMPLATE_FILES if plan.chat_template is not None else ()
    out = {name: _read(donor / name) for name in TOKENIZER_FILES + COPY_FILES
           if name not in skip and (donor / name).is_file()}
    if plan.chat_template is not None and "tokenizer_config.json" in out:
        try:
            tcfg = json.loads(out["tokenizer_config.json"])
        except (ValueError, RecursionError):
            raise ModelError(f"{donor / 'tokenizer_config.json'}: not valid JSON") from None
        tcfg["chat_template"] = plan.chat_template
        out["tokenizer_config.json"] = json_bytes(tcfg)
    return out


def _card(plan: Plan, out_name: str) -> bytes:
    cfg = plan.config
    base = cfg.base_model
    show_base = plan.method.base != "none" and plan.method.card_names_base
    others = [m for m in cfg.referenced_models() if m != base or not show_base]
    return md.model_card(
        out_name, plan.method.pretty or plan.method.name, plan.method.reference, base, others, cfg.text,
        show_base=show_base,
    ).encode("utf-8")


def extra_files(plan: Plan, out_name: str) -> dict[str, bytes]:
    """The output folder's small files by name (``out_name`` titles the model card)."""
    donor = plan.models[plan.base_model if plan.base_model is not None else 0].dir
    files = {"config.json": json_bytes(dict(plan.out_config))}
    files.update(_tokenizer(plan, donor))
    files["README.md"] = _card(plan, out_name)
    files["mergekit_config.yml"] = plan.config.text.encode("utf-8")
    return files
