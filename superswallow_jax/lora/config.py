"""A PEFT LoRA adapter's ``adapter_config.json`` -> a typed, frozen :class:`AdapterConfig`.

What the config decides when an adapter is merged into its base (PEFT's
``merge_and_unload``, which mergekit's ``--lora-merge-cache`` runs):

* **which modules** carry a LoRA: ``target_modules`` (a list: a module whose
  name is an entry or ends with ``.entry``; a string: a regular expression
  matching the whole name; ``all-linear``: every module but the output
  layer), minus ``exclude_modules`` (same forms) and ``modules_to_save``, and
  only in ``layers_to_transform`` (the first ``<layers_pattern>.N.`` of the
  name) when that is set;
* **the scale** of each: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with
  ``use_rslora``, where ``r`` and ``lora_alpha`` may be overridden per module
  by ``rank_pattern`` / ``alpha_pattern`` (the first key, in file order,
  that is a regular expression matching the end of the module name after a
  ``.``);
* **modules_to_save**: whole modules stored in the adapter, replacing the
  base's (a module whose name ends with an entry, as PEFT matches them).

Options that change the merged weights in ways not implemented here (DoRA,
LoRA biases, QA-LoRA, layer replication, trainable tokens, ...) are refused
in one line naming the option; options that only matter for training
(dropout, initialisation) are ignored. An option this module does not know
is refused when it is set, since it might change the weights.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import ModelError, short

CONFIG_NAME = "adapter_config.json"
MAX_CONFIG_BYTES = 4 << 20
#: Longest regular expression accepted from a config (target_modules, rank_pattern keys, ...).
MAX_PATTERN_CHARS = 1000

#: Options read here, and options that only matter for training or are informative (ignored).
KNOWN = frozenset({
    "alpha_pattern", "rank_pattern", "auto_mapping", "base_model_name_or_path", "corda_config", "eva_config",
    "inference_mode", "init_lora_weights", "loftq_config", "lora_dropout", "lora_ga_config", "megatron_core",
    "peft_version", "qalora_group_size", "revision", "task_type", "fan_in_fan_out", "r", "lora_alpha",
    "use_rslora", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "modules_to_save", "peft_type", "bias",
})
#: Options that change the merged weights and are not implemented: refused when set.
UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA biases (lora_bias)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "megatron_config": "Megatron layers (megatron_config)",
    "ensure_weight_tying": "tied adapter weights (ensure_weight_tying)",
}


@dataclass(frozen=True)
class AdapterConfig:
    """A validated LoRA adapter config (the fields that decide a merge)."""

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str | None  # a list, a regex, "all-linear"
    exclude_modules: tuple[str, ...] | str | None
    modules_to_save: tuple[str, ...]
    layers_to_transform: tuple[int, ...] | None
    layers_pattern: tuple[str, ...]
    rank_pattern: tuple[tuple[str, int], ...]  # in file order
    alpha_pattern: tuple[tuple[str, float], ...]
    fan_in_fan_out: bool
    path: Path

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """``(r, lora_alpha)`` of ``module`` (a full module name, ``model.layers.0.self_attn.q_proj``)."""
        r = next((v for k, v in self.rank_pattern if _ends_with(k, module)), self.r)
        alpha = next((v for k, v in self.alpha_pattern if _ends_with(k, module)), self.lora_alpha)
        return r, alpha

    def scale(self, module: str) -> float:
        """The factor of ``B @ A`` for ``module`` (a Python float; PEFT's ``scaling``)."""
        r, alpha = self.rank_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def saved_module(self, module: str) -> bool:
        """Whether ``module`` is one of ``modules_to_save``: its name ends with an entry (PEFT's test,
        without a ``.`` boundary: ``norm`` covers ``input_layernorm``)."""
        return any(module.endswith(m) for m in self.modules_to_save)

    def targets(self, module: str) -> bool:
        """Whether PEFT puts a LoRA on ``module``."""
        if _listed(self.exclude_modules, module):
            return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in self.modules_to_save):
            return False  # PEFT never puts a LoRA inside a module it saves whole
        t = self.target_modules
        if t is None:
            return False
        if t == "all-linear":
            return module.rsplit(".", 1)[-1] != "lm_head"
        if isinstance(t, str):
            return re.fullmatch(t, module) is not None
        if module in t:
            return True
        return any(module.endswith("." + x) for x in t) and self._in_layers(module)

    def _in_layers(self, module: str) -> bool:
        """``layers_to_transform``: the layer index is the first ``<layers_pattern>.N.`` (any ``X.N.``) of the name."""
        if not self.layers_to_transform:
            return True
        if self.layers_pattern:
            found = (re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", module) for p in self.layers_pattern)
            m = next((x for x in found if x is not None), None)
        else:
            m = re.match(r".*?\.[^.]*\.(\d+)\.", module)
        return m is not None and int(m.group(1)) in self.layers_to_transform


def _ends_with(pattern: str, module: str) -> bool:
    return re.match(rf"(.*\.)?({pattern})$", module) is not None


def _listed(spec: tuple[str, ...] | str | None, module: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return module in spec or any(module.endswith("." + x) for x in spec)


def _pattern(v: str, where: str) -> str:
    if len(v) > MAX_PATTERN_CHARS:
        raise ModelError(f"{where}: a pattern of {len(v)} characters (at most {MAX_PATTERN_CHARS})")
    try:
        re.compile(v)
    except re.error as e:
        raise ModelError(f"{where}: {short(v)} is not a valid regular expression ({e})") from None
    return v


def _names(v: Any, where: str, allow_none: bool = True) -> tuple[str, ...] | str | None:
    """A list of module names (a tuple), a regular expression (a str), or None."""
    if v is None and allow_none:
        return None
    if isinstance(v, str):
        return _pattern(v, where)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise ModelError(f"{where}: must be a list of module names or a regular expression, got {short(v)}")


def _number(v: Any, where: str, integer: bool) -> Any:
    ok = type(v) is int if integer else (type(v) in (int, float) and math.isfinite(v))
    if not ok or v <= 0:
        raise ModelError(f"{where}: must be a positive {'integer' if integer else 'number'}, got {short(v)}")
    return v


def _pattern_map(v: Any, where: str, integer: bool) -> tuple:
    if v is None:
        return ()
    if not isinstance(v, dict):
        raise ModelError(f"{where}: must map module name patterns to numbers, got {short(v)}")
    return tuple((_pattern(k, f"{where}.{k}"), _number(x, f"{where}.{k}", integer)) for k, x in v.items())


def _refuse_unsupported(data: Mapping[str, Any], file: str) -> None:
    if data.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{file}: peft_type {short(data.get('peft_type'))}: only LoRA adapters (LORA) are supported")
    for key, what in UNSUPPORTED.items():
        if data.get(key):
            raise ModelError(f"{file}: {key}: {what} is not supported")
    if data.get("bias", "none") != "none":
        raise ModelError(f"{file}: bias: {short(data['bias'])}: trained biases are not supported (only \"none\")")
    for key, v in data.items():
        if key not in KNOWN and key not in UNSUPPORTED and v not in (None, False, {}, [], ""):
            raise ModelError(f"{file}: {key}: an option this version does not know is set ({short(v)}); "
                             "it might change the merged weights")


def parse_adapter_config(data: Any, path: Path) -> AdapterConfig:
    """Validate a parsed ``adapter_config.json`` (``path``: for messages)."""
    file = str(path)
    if not isinstance(data, dict):
        raise ModelError(f"{file}: must be a JSON object")
    _refuse_unsupported(data, file)
    if "r" not in data or "target_modules" not in data:
        raise ModelError(f"{file}: {'r' if 'r' not in data else 'target_modules'}: missing")
    lp = data.get("layers_pattern")
    ltt = data.get("layers_to_transform")
    if isinstance(ltt, int) and not isinstance(ltt, bool):
        ltt = [ltt]
    if ltt is not None and not (isinstance(ltt, list) and all(type(x) is int and x >= 0 for x in ltt)):
        raise ModelError(f"{file}: layers_to_transform: must be a layer index or a list of them, got {short(ltt)}")
    mts = data.get("modules_to_save") or []
    if not (isinstance(mts, list) and all(isinstance(x, str) and x for x in mts)):
        raise ModelError(f"{file}: modules_to_save: must be a list of module names, got {short(mts)}")
    for m in mts:
        _pattern(m, f"{file}: modules_to_save")
    return AdapterConfig(
        r=_number(data["r"], f"{file}: r", True),
        lora_alpha=_number(data.get("lora_alpha", 8), f"{file}: lora_alpha", False),
        use_rslora=bool(data.get("use_rslora", False)),
        target_modules=_names(data["target_modules"], f"{file}: target_modules"),
        exclude_modules=_names(data.get("exclude_modules"), f"{file}: exclude_modules"),
        modules_to_save=tuple(mts),
        layers_to_transform=tuple(ltt) if ltt else None,
        layers_pattern=(() if not lp else (lp,) if isinstance(lp, str) else tuple(_names(lp, f"{file}: layers_pattern") or ())),
        rank_pattern=_pattern_map(data.get("rank_pattern"), f"{file}: rank_pattern", True),
        alpha_pattern=_pattern_map(data.get("alpha_pattern"), f"{file}: alpha_pattern", False),
        fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
        path=Path(path),
    )


def read_adapter_config(folder: Path) -> AdapterConfig:
    """``folder/adapter_config.json``, read (at most :data:`MAX_CONFIG_BYTES`) and validated."""
    path = Path(folder) / CONFIG_NAME
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ModelError(f"{path}: larger than the {MAX_CONFIG_BYTES:,}-byte limit for an adapter config")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: missing (a PEFT adapter folder holds adapter_config.json)") from None
    except (ValueError, RecursionError) as e:
        raise ModelError(f"{path}: not valid JSON ({type(e).__name__})") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read: {e.strerror or e}") from None
    return parse_adapter_config(data, path)
