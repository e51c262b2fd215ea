"""Tensor names <-> layers, kept as data.

Known architectures are JSON tables in this folder (``llama.json`` covers Llama,
Mistral, Qwen2/3; ``gemma.json`` Gemma). A table lists the pre-layer weights,
one layer's weight templates (``${layer_index}`` is substituted) and the
post-layer weights, with ``is_embed`` (rows indexed by the vocabulary),
``optional`` and ``tied_names`` flags.

Anything else falls back to :func:`generic_architecture`: the first
``layers.N.``/``h.N.``/``blocks.N.`` in a name marks a layer tensor; the layer
count comes from ``config.json`` (``num_hidden_layers``, ``n_layer`` or
``num_layers``), else from the largest index seen.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Iterable, Mapping, Sequence

from ..errors import ModelError


@dataclass(frozen=True)
class WeightTemplate:
    """One weight of the architecture (name may contain ``${layer_index}``)."""

    name: str
    is_embed: bool = False
    optional: bool = False
    tied_names: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()

    def at(self, layer: int) -> "WeightTemplate":
        sub = lambda s: s.replace("${layer_index}", str(layer))  # noqa: E731
        return WeightTemplate(
            sub(self.name), self.is_embed, self.optional,
            tuple(sub(t) for t in self.tied_names), tuple(sub(a) for a in self.aliases),
        )


@dataclass(frozen=True)
class Architecture:
    name: str
    pre_weights: tuple[WeightTemplate, ...]
    layer_templates: tuple[WeightTemplate, ...]
    post_weights: tuple[WeightTemplate, ...]
    num_layers_key: str | None

    def num_layers(self, config: Mapping, names: Iterable[str] = ()) -> int:
        for key in (self.num_layers_key, "num_hidden_layers", "n_layer", "num_layers"):
            if key and isinstance(config.get(key), int):
                return config[key]
        idx = [layer_index(n) for n in names]
        found = [i for i in idx if i is not None]
        return max(found) + 1 if found else 0

    def layer_weights(self, layer: int) -> tuple[WeightTemplate, ...]:
        return tuple(t.at(layer) for t in self.layer_templates)


def _template(d: Mapping) -> WeightTemplate:
    return WeightTemplate(
        d["name"], bool(d.get("is_embed", False)), bool(d.get("optional", False)),
        tuple(d.get("tied_names", ())), tuple(d.get("aliases", ())),
    )


def _load_tables() -> dict[str, Architecture]:
    out: dict[str, Architecture] = {}
    for entry in resources.files(__package__).iterdir():
        if not entry.name.endswith(".json"):
            continue
        d = json.loads(entry.read_text(encoding="utf-8"))
        arch = Architecture(
            entry.name[:-5],
            tuple(_template(w) for w in d["pre_weights"]),
            tuple(_template(w) for w in d["layer_templates"]),
            tuple(_template(w) for w in d["post_weights"]),
            d.get("num_layers_config_key"),
        )
        for a in d["architectures"]:
            out[a] = arch
    return out


TABLES: Mapping[str, Architecture] = _load_tables()

_LAYER_RE = re.compile(r"^(.*?(?:^|\.)(?:layers|h|blocks|layer))\.(\d+)\.(.+)$")
_EMBED_HINTS = ("embed_tokens", "wte", "word_embeddings", "lm_head", "embed_out", "output.weight")


def layer_index(name: str) -> int | None:
    """The layer number in a tensor name (first ``layers.N.``-style match), or None."""
    m = _LAYER_RE.match(name)
    return int(m.group(2)) if m else None


def generic_architecture(names: Sequence[Iterable[str]]) -> Architecture:
    """Infer an architecture from the tensor names of all models."""
    all_names: dict[str, None] = {}
    for ns in names:
        for n in ns:
            all_names[n] = None
    layer: dict[str, None] = {}
    pre: list[str] = []
    post: list[str] = []
    prefix = None
    for n in sorted(all_names):
        m = _LAYER_RE.match(n)
        if m:
            if prefix is None:
                prefix = m.group(1)
            if m.group(1) == prefix:
                layer[f"{prefix}.${{layer_index}}.{m.group(3)}"] = None
                continue
        (pre if "embed" in n or "wte" in n or "wpe" in n else post).append(n)
    present_in_all = set.intersection(*(set(ns) for ns in names)) if names else set()

    def opt(n: str) -> bool:
        return n not in present_in_all

    layer_t = []
    for t in layer:
        # optional if any model lacks it at layer 0
        layer_t.append(WeightTemplate(t, optional=opt(t.replace("${layer_index}", "0"))))
    return Architecture(
        "generic",
        tuple(WeightTemplate(n, is_embed=any(h in n for h in _EMBED_HINTS), optional=opt(n)) for n in pre),
        tuple(layer_t),
        tuple(WeightTemplate(n, is_embed=any(h in n for h in _EMBED_HINTS), optional=opt(n)) for n in post),
        None,
    )


def resolve_architecture(configs: Sequence[Mapping], names: Sequence[Iterable[str]], where: Sequence[str]) -> Architecture:
    """Pick the architecture shared by all models (``architectures[0]`` in config.json).

    Models of different known architectures are an error; if any model is of
    an unknown architecture the generic fallback is used for all.
    """
    found = []
    for cfg, w in zip(configs, where):
        archs = cfg.get("architectures")
        name = archs[0] if isinstance(archs, list) and archs else None
        found.append((name, w))
    if all(n in TABLES for n, _ in found):
        tables = {TABLES[n].name for n, _ in found}
        if len(tables) > 1:
            detail = ", ".join(f"{w}: {n}" for n, w in found)
            raise ModelError(f"models have different architectures ({detail})")
        return TABLES[found[0][0]]
    return generic_architecture([list(n) for n in names])
