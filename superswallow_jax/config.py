"""mergekit YAML -> typed, frozen :class:`MergeConfig`, validated at load time.

Every error names the config file and the key path (``slices[0].sources[1].
layer_range``). Parameters are checked against the method's parameter list:
an unknown parameter name is an error, since a typo would otherwise silently
fall back to a default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from .dtypes import config_code
from .errors import ConfigError, short
from .lora.reference import split_reference
from .registry import ALL_PARAMS, METHODS, MethodSpec, get_method
from .params import Setting, coerce, literals, parse_setting



@dataclass(frozen=True)
class SourceSpec:
    """One input model (or one layer range of it) with its own parameters."""

    model: str
    layer_range: tuple[int, int] | None
    parameters: Mapping[str, Setting]
    where: str


@dataclass(frozen=True)
class SliceSpec:
    """One output slice: its sources, optional slice base model and parameters."""

    sources: tuple[SourceSpec, ...]
    base_model: str | None
    parameters: Mapping[str, Setting]
    where: str


@dataclass(frozen=True)
class TokenOverrideSpec:
    """A ``tokenizer.tokens`` entry: where the token's embedding comes from."""

    token: str
    source: Any  # model ref string, {"kind": "zero"} or {"kind": "model_token", ...}
    force: bool


@dataclass(frozen=True)
class TokenizerSpec:
    source: str  # "base", "union" or a model reference
    tokens: tuple[TokenOverrideSpec, ...] = ()
    pad_to_multiple_of: int | None = None


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge configuration."""

    merge_method: str
    method: MethodSpec
    slices: tuple[SliceSpec, ...] | None
    models: tuple[SourceSpec, ...] | None
    base_model: str | None
    parameters: Mapping[str, Setting]
    dtype: str | None  # safetensors code
    out_dtype: str | None
    tokenizer: TokenizerSpec | None
    chat_template: str | None
    text: str
    path: Path | None = None
    warnings: tuple[str, ...] = ()
    #: the config as canonical JSON (comments, key order and spacing removed);
    #: its sha256 identifies the merge in shard headers and the manifest
    normalized: str = "{}"

    def referenced_models(self) -> tuple[str, ...]:
        """All model references in config order (base first if set), unique."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for s in self.models or ():
            seen[s.model] = None
        for sl in self.slices or ():
            if sl.base_model:
                seen[sl.base_model] = None
            for s in sl.sources:
                seen[s.model] = None
        return tuple(seen)


TOP_KEYS = {
    "models", "slices", "modules", "merge_method", "base_model", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "parameters",
}


def _model_ref(raw: object, where: str) -> str:
    if isinstance(raw, dict) and "model" in raw and isinstance(raw["model"], str):
        # mergekit's expanded ModelReference form {model: path, revision?: ...}
        raw = raw["model"]
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(f"{where}: model reference must be a non-empty string")
    if "+" in raw:
        split_reference(raw.strip(), where)  # base+adapter: checked now, opened when planned
    return raw.strip()


def _params(raw: object, where: str, method: MethodSpec, allowed: Mapping[str, Any], warn: list[str]) -> Mapping[str, Setting]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping of parameter names to values")
    out = {}
    for k, v in raw.items():
        if k not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            if k in ALL_PARAMS and k in method.params:
                pass  # a per-model parameter given at a shared level (or vice versa): fine
            elif k in ALL_PARAMS:
                warn.append(f"{where}.{k}: not a parameter of merge_method {method.name}; ignored")
                continue
            else:
                raise ConfigError(
                    f"{where}.{k}: unknown parameter for merge_method {method.name} (known: {known})"
                )
        out[k] = parse_setting(v, f"{where}.{k}")
        param = method.params.get(k)
        if param is not None:
            for x in literals(out[k]):  # types and ranges now, not when a later tensor or stage is planned
                param.check(coerce(x, param.type, f"{where}.{k}"), f"{where}.{k}")
    return out


def _dtype(raw: object, where: str) -> str | None:
    if raw is None:
        return None
    code = config_code(str(raw))
    if code is None:
        raise ConfigError(f"{where}: unsupported dtype {str(raw)[:80]!r} (use float32, float16 or bfloat16)")
    return code


def _layer_range(raw: object, where: str) -> tuple[int, int]:
    if (
        not isinstance(raw, list)
        or len(raw) != 2
        or not all(type(x) is int for x in raw)
        or raw[0] < 0
        or raw[1] <= raw[0]
    ):
        raise ConfigError(f"{where}: must be [start, end] with 0 <= start < end")
    return (raw[0], raw[1])


def _source(raw: object, where: str, method: MethodSpec, need_range: bool, warn: list[str]) -> SourceSpec:
    if isinstance(raw, str):
        raw = {"model": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping with 'model'")
    allowed = {"model", "parameters"} | ({"layer_range"} if need_range else set())
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key")
    if "model" not in raw:
        raise ConfigError(f"{where}.model: missing")
    lr = None
    if need_range:
        if "layer_range" not in raw:
            raise ConfigError(f"{where}.layer_range: missing")
        lr = _layer_range(raw["layer_range"], f"{where}.layer_range")
    params = _params(raw.get("parameters"), f"{where}.parameters", method, method.per_model, warn)
    return SourceSpec(_model_ref(raw["model"], f"{where}.model"), lr, params, where)


def _tokenizer(data: Mapping[str, Any], file: str) -> TokenizerSpec | None:
    ts = data.get("tokenizer_source")
    tb = data.get("tokenizer")
    if ts is not None and tb is not None:
        raise ConfigError(f"{file}: tokenizer_source and tokenizer cannot both be set")
    if ts is not None:
        return TokenizerSpec(_tok_source(ts, f"{file}: tokenizer_source"))
    if tb is None:
        return None
    if not isinstance(tb, dict):
        raise ConfigError(f"{file}: tokenizer: must be a mapping")
    unknown = set(tb) - {"source", "tokens", "pad_to_multiple_of"}
    if unknown:
        raise ConfigError(f"{file}: tokenizer.{sorted(unknown)[0]}: unknown key")
    source = _tok_source(tb.get("source", "union"), f"{file}: tokenizer.source")
    pad = tb.get("pad_to_multiple_of")
    if pad is not None and (type(pad) is not int or pad <= 0):
        raise ConfigError(f"{file}: tokenizer.pad_to_multiple_of: must be a positive integer")
    tokens = []
    raw_tokens = tb.get("tokens") or {}
    if not isinstance(raw_tokens, dict):
        raise ConfigError(f"{file}: tokenizer.tokens: must map token strings to {{source, force}}")
    for tok, spec in raw_tokens.items():
        w = f"{file}: tokenizer.tokens.{tok}"
        if not isinstance(spec, dict) or set(spec) - {"source", "force"}:
            raise ConfigError(f"{w}: must be a mapping with keys source and force")
        src = spec.get("source")
        if src is None:
            raise ConfigError(f"{w}.source: missing")
        if isinstance(src, dict):
            kind = src.get("kind")
            if kind == "zero":
                pass
            elif kind == "model_token":
                if "model" not in src or ("token_id" not in src and "token" not in src):
                    raise ConfigError(f"{w}.source: model_token needs model and token_id or token")
                src = {**src, "model": _model_ref(src["model"], f"{w}.source.model")}
            else:
                raise ConfigError(f"{w}.source.kind: expected zero or model_token, got {short(kind)}")
        else:
            src = _model_ref(src, f"{w}.source")
        force = spec.get("force", False)
        if not isinstance(force, bool):
            raise ConfigError(f"{w}.force: must be true or false")
        tokens.append(TokenOverrideSpec(str(tok), src, force))
    return TokenizerSpec(source, tuple(tokens), pad)


def _tok_source(raw: object, where: str) -> str:
    if raw in ("base", "union"):
        return str(raw)
    if isinstance(raw, str) and raw.startswith("model:"):
        raw = raw[len("model:"):]
    return _model_ref(raw, where)


def _single_module(data: Mapping[str, Any], file: str, method: MethodSpec, warn: list[str]):
    """The ``modules:`` form for a single-module (plain LLM) architecture.

    ``modules: {NAME: {models | slices, parameters?}}`` with one module is the
    same merge as the top-level form; module parameters rank between slice and
    global parameters. Several modules (vision-language models) are not supported.
    """
    mods = data["modules"]
    if not isinstance(mods, dict) or len(mods) != 1:
        raise ConfigError(f"{file}: modules: only a single module is supported (multi-module architectures are not)")
    name, mod = next(iter(mods.items()))
    where = f"{file}: modules.{name}"
    if not isinstance(mod, dict):
        raise ConfigError(f"{where}: must be a mapping with models or slices")
    unknown = set(mod) - {"models", "slices", "parameters"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key")
    inner = [k for k in ("models", "slices") if mod.get(k) is not None]
    if len(inner) != 1:
        raise ConfigError(f"{where}: exactly one of models or slices must be set")
    params = _params(mod.get("parameters"), f"{where}.parameters", method, method.params, warn)
    flat = {k: v for k, v in data.items() if k != "modules"}
    flat[inner[0]] = mod[inner[0]]
    return flat, inner, params


#: Largest normalized config accepted (it goes into the manifest): a config
#: beyond it is refused, naming its largest top-level key.
MAX_NORMALIZED_BYTES = 1 << 20
#: Largest config file read, and most values it may hold once YAML aliases are
#: expanded (a 1 KB alias bomb otherwise expands to gigabytes).
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 200_000


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key repeated in one mapping (the last would win silently)."""


def _no_duplicate_keys(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: {short(key)}: key given twice "
                                  f"(first at line {seen[key] + 1})")
            seen[key] = key_node.start_mark.line
        except TypeError:  # an unhashable key: SafeLoader reports it
            pass
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def _count_values(data: Any, limit: int) -> int:
    """Values in ``data`` with every alias expanded, counting up to ``limit`` (iterative, bounded)."""
    n, stack = 0, [data]
    while stack:
        x = stack.pop()
        n += 1
        if n > limit:
            return n
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return n


def load_yaml(text: str, file: str) -> Any:
    """One YAML document, strictly: no repeated keys, bounded depth and alias expansion."""
    try:
        docs = list(yaml.load_all(text, Loader=StrictLoader))
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{file}: invalid YAML{loc}") from None
    except RecursionError:
        raise ConfigError(f"{file}: the YAML is nested too deeply") from None
    docs = [d for d in docs if d is not None]
    if len(docs) > 1:
        raise ConfigError(f"{file}: {len(docs)} YAML documents: a multi-stage (mergekit-multi) recipe, not one "
                          "config; load it with superswallow_jax.recipe.load_recipe (superswallow merge does)")
    data = docs[0] if docs else None
    if _count_values(data, MAX_CONFIG_VALUES) > MAX_CONFIG_VALUES:
        raise ConfigError(f"{file}: the config holds more than {MAX_CONFIG_VALUES:,} values once its YAML aliases "
                          "are expanded")
    return data


def _normalized(data: Mapping[str, Any], file: str) -> str:
    """Canonical JSON of the parsed YAML, at most :data:`MAX_NORMALIZED_BYTES`."""
    def dump(x: Any) -> str:
        return json.dumps(x, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)

    text = dump(data)
    if len(text.encode("utf-8")) > MAX_NORMALIZED_BYTES:
        key = max(data, key=lambda k: len(dump(data[k])))
        raise ConfigError(f"{file}: {key}: the config is {len(text.encode('utf-8')):,} bytes as JSON, more than the "
                          f"{MAX_NORMALIZED_BYTES:,}-byte limit (this key is the largest part)")
    return text


def parse_config(text: str, path: Path | None = None, allow_name: bool = False) -> MergeConfig:
    """Parse and validate YAML text. ``path`` is only used in error messages;
    ``allow_name``: the document is a stage of a recipe (its ``name:`` key is allowed)."""
    warn: list[str] = []
    file = str(path) if path else "<config>"
    data = load_yaml(text, file)
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: top level must be a mapping")
    normalized = _normalized(data, file)
    unknown = set(data) - TOP_KEYS - ({"name"} if allow_name else set())
    if unknown:
        raise ConfigError(f"{file}: {sorted(unknown)[0]}: unknown top-level key")
    if "merge_method" not in data:
        raise ConfigError(f"{file}: merge_method: missing")
    method = get_method(data["merge_method"], f"{file}: merge_method")
    present = [k for k in ("models", "slices", "modules") if data.get(k) is not None]
    if len(present) != 1:
        raise ConfigError(f"{file}: exactly one of models, slices or modules must be set (found {present or 'none'})")
    module_params: Mapping[str, Setting] = {}
    if present[0] == "modules":
        data, present, module_params = _single_module(data, file, method, warn)
    base = data.get("base_model")
    base = _model_ref(base, f"{file}: base_model") if base is not None else None
    gparams = _params(data.get("parameters"), f"{file}: parameters", method, method.params, warn)
    for k, setting in module_params.items():  # module level sits between slices and global
        gparams = {**gparams, k: Setting(setting.rules + (gparams[k].rules if k in gparams else ()))}
    models = slices = None
    if present[0] == "models":
        raw = data["models"]
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{file}: models: must be a non-empty list")
        models = tuple(_source(m, f"{file}: models[{i}]", method, False, warn) for i, m in enumerate(raw))
    else:
        raw = data["slices"]
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{file}: slices: must be a non-empty list")
        out = []
        for i, sl in enumerate(raw):
            w = f"{file}: slices[{i}]"
            if not isinstance(sl, dict) or "sources" not in sl:
                raise ConfigError(f"{w}.sources: missing")
            unknown = set(sl) - {"sources", "base_model", "parameters", "residual_weight"}
            if unknown:
                raise ConfigError(f"{w}.{sorted(unknown)[0]}: unknown key")
            srcs = sl["sources"]
            if not isinstance(srcs, list) or not srcs:
                raise ConfigError(f"{w}.sources: must be a non-empty list")
            sources = tuple(_source(s, f"{w}.sources[{j}]", method, True, warn) for j, s in enumerate(srcs))
            spans = {s.layer_range[1] - s.layer_range[0] for s in sources}  # type: ignore[index]
            if len(spans) != 1:
                raise ConfigError(f"{w}.sources: all sources must span the same number of layers")
            sb = sl.get("base_model")
            sb = _model_ref(sb, f"{w}.base_model") if sb is not None else None
            out.append(SliceSpec(sources, sb, _params(sl.get("parameters"), f"{w}.parameters", method, method.params, warn), w))
        slices = tuple(out)
    chat = data.get("chat_template")
    if chat is not None and not isinstance(chat, str):
        raise ConfigError(f"{file}: chat_template: must be a string")
    return MergeConfig(
        merge_method=method.name,
        method=method,
        slices=slices,
        models=models,
        base_model=base,
        parameters=gparams,
        dtype=_dtype(data.get("dtype"), f"{file}: dtype"),
        out_dtype=_dtype(data.get("out_dtype"), f"{file}: out_dtype"),
        tokenizer=_tokenizer(data, file),
        chat_template=chat,
        text=text,
        path=path,
        warnings=tuple(warn),
        normalized=normalized,
    )


def read_config_text(path: Path) -> str:
    """A config file's text (at most MAX_CONFIG_BYTES, UTF-8), or a ConfigError naming the file."""
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size:,} bytes, larger than the {MAX_CONFIG_BYTES:,}-byte "
                              "limit for a config")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, expected a YAML config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config ({type(e).__name__})") from None


def load_config(path: Path) -> MergeConfig:
    """Read and validate a config file."""
    return parse_config(read_config_text(path), Path(path))


__all__ = ["MergeConfig", "SliceSpec", "SourceSpec", "TokenizerSpec", "TokenOverrideSpec", "load_config", "parse_config", "read_config_text", "METHODS"]
