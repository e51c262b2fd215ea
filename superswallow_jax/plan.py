"""Config + file headers -> an immutable list of per-tensor steps (what to do).

Planning reads only ``config.json``, tokenizer files and safetensors headers;
no tensor data. Each :class:`Step` names its output tensor, the source tensors
(file and byte offsets), the resolved per-model and global parameters, and its
output shard. :func:`build_plan` follows mergekit 0.1.5:

* ``models:`` becomes one output slice over all layers; a ``base_model`` not in
  the list is appended as a source without parameters.
* Pre-layer weights come from the first slice's sources, post-layer weights
  from the last slice's; layer tensors are renumbered 0, 1, 2, ... across slices.
* Parameters resolve source > output slice > global > method default. Per-model
  parameters are matched against that model's *input* tensor name, global ones
  against the output name. Gradients are evaluated at ``t = j / (n - 1)`` for
  layer offset ``j`` in a slice of ``n`` layers (``t = 1`` if ``n == 1``) and at
  ``t = 0`` for non-layer tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping, Sequence


from .architecture import Architecture, WeightTemplate, resolve_architecture
from .chat_template import resolve_chat_template
from .config import MergeConfig, SliceSpec, SourceSpec
from .dtypes import BY_CODE, FLOAT_CODES
from .errors import ConfigError, PlanError, short
from .io.model_dir import read_model_config, resolve_model
from .io.checkpoint import Checkpoint
from .io.reader import TensorInfo
from .io.writer import TensorSpec, assign_shards
from .layout import OutputLayout, layout_output, output_metadata
from .manifest import config_hash
from .lora.adapted import AdaptedCheckpoint, Adaptation
from .lora.adapter import Adapter
from .registry import MethodSpec
from .lora.reference import split_reference
from .params import Setting, coerce, numeric_string

if TYPE_CHECKING:  # types only: importing the tokenizer costs start-up time
    from .io.hub import HubAccess, HubSource
    from .tokenizer import EmbeddingAlignment, OutputTokenizer



@dataclass(frozen=True)
class ModelInput:
    """One referenced model: its config key, folder, config.json (read-only) and open weights.

    A ``base+adapter`` reference has the base's folder and config and an
    :class:`~superswallow_jax.lora.adapted.AdaptedCheckpoint` (the adapter
    applied as tensors are read). The :class:`Plan` holding it closes the
    checkpoint (``with plan:``).
    """

    key: str
    dir: Path
    config: Mapping[str, Any]
    checkpoint: Checkpoint | AdaptedCheckpoint
    hub: HubSource | None = None  # for a Hugging Face id: repo, revision asked for, commit
    adapter_hub: HubSource | None = None  # the same for a ``base+adapter`` reference's adapter given by id

    @property
    def adapter(self) -> Adapter | None:
        """The LoRA adapter of a ``base+adapter`` reference, else None."""
        return self.checkpoint.adapter if isinstance(self.checkpoint, AdaptedCheckpoint) else None

    def adaptation(self, info: TensorInfo) -> Adaptation | None:
        """How tensor ``info`` of this model is made from what is stored (None: read as stored)."""
        return self.checkpoint.adaptation(info.name) if isinstance(self.checkpoint, AdaptedCheckpoint) else None


@dataclass(frozen=True)
class Source:
    """One input tensor of a step."""

    model: int  # index into Plan.models (stable: config order) -- also the PRNG key index
    tensor: TensorInfo  # what is stored (read)
    params: Mapping[str, Any]  # resolved per-model parameters
    adapt: Adaptation | None = None  # a base+adapter model's tensor: how it is made from ``tensor``

    @property
    def dtype(self) -> str:
        """The dtype code the merge sees (a base+adapter model's load dtype)."""
        return self.adapt.dtype if self.adapt is not None else self.tensor.dtype


@dataclass(frozen=True)
class Step:
    """One output tensor: where its inputs are and how to merge them."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str  # safetensors code written
    work_dtype: str  # dtype the math rounds to
    sources: tuple[Source, ...]
    base: int | None  # position in ``sources`` of the base model
    params: Mapping[str, Any]  # resolved global parameters
    embed: bool  # rows aligned to the output vocabulary
    t: float
    layer: int | None
    alignment: EmbeddingAlignment | None = None  # over ``sources`` (embed steps only)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * BY_CODE[self.out_dtype].itemsize

    @property
    def input_bytes(self) -> int:
        return sum(s.tensor.nbytes for s in self.sources)

    @property
    def donors(self) -> tuple[int, ...]:
        """Positions in ``sources`` of every model but the base, in order."""
        return tuple(i for i in range(len(self.sources)) if i != self.base)


@dataclass(frozen=True)
class Plan:
    config: MergeConfig
    method: MethodSpec
    models: tuple[ModelInput, ...]
    base_model: int | None  # index into models
    arch: Architecture
    steps: tuple[Step, ...]
    shards: tuple[tuple[str, ...], ...]  # tensor names per output shard
    out_config: Mapping[str, Any]
    tokenizer: OutputTokenizer | None = None
    chat_template: str | None = None  # resolved template text to write, or None
    warnings: tuple[str, ...] = ()  # the config's own (ignored keys) and the plan's (filters that match nothing)
    layout: OutputLayout | None = None  # every output file's name, header, offsets and owner process

    def close(self) -> None:
        """Close every model's open weight files."""
        for m in self.models:
            m.checkpoint.close()

    def __enter__(self) -> "Plan":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def total_input_bytes(self) -> int:
        return sum(s.input_bytes for s in self.steps)

    def step(self, name: str) -> Step:
        """The step writing output tensor ``name``."""
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def total_output_bytes(self) -> int:
        return sum(s.nbytes for s in self.steps)


# ---------------------------------------------------------------- parameters


def _eval_levels(levels: Sequence[tuple[Mapping[str, Setting], str]], pname: str, name: str, t: float):
    for params, where in levels:
        s = params.get(pname)
        if s is not None:
            v = s.evaluate(name, t)
            if v is not None:
                return v, f"{where}.{pname}"
    return None, None


def _resolve_model_params(
    method: MethodSpec, sl: SliceSpec | None, cfg: MergeConfig, src: SourceSpec | None,
    in_name: str, t: float, is_base: bool, label: str,
) -> dict[str, Any]:
    out = {}
    for pname, p in method.per_model.items():
        levels = []
        if src is not None:
            levels.append((src.parameters, src.where + ".parameters"))
        if sl is not None:
            levels.append((sl.parameters, sl.where + ".parameters"))
        levels.append((cfg.parameters, "parameters"))
        v, where = _eval_levels(levels, pname, in_name, t)
        if v is None:
            if p.required:
                if is_base and not method.base_takes_model_params:
                    continue
                raise ConfigError(f"missing required parameter {pname!r} for model {label} at tensor {in_name}")
            v, where = p.default, "default"
        out[pname] = v if v is None else coerce(v, p.type, f"{where} (model {label}, tensor {in_name})")
        p.check(out[pname], f"{where} (model {label}, tensor {in_name})")
    return out


def _resolve_global_params(method: MethodSpec, sl: SliceSpec | None, cfg: MergeConfig, out_name: str, t: float) -> dict[str, Any]:
    out = {}
    for pname, p in method.global_.items():
        levels = ([(sl.parameters, sl.where + ".parameters")] if sl is not None else []) + [(cfg.parameters, "parameters")]
        v, where = _eval_levels(levels, pname, out_name, t)
        if v is None:
            if p.required:
                raise ConfigError(f"missing required parameter {pname!r} at tensor {out_name}")
            v, where = p.default, "default"
        out[pname] = coerce(v, p.type, f"{where} (tensor {out_name})")
        p.check(out[pname], f"{where} (tensor {out_name})")
    return out


# ---------------------------------------------------------------- models


def _result_dtype(method: MethodSpec, work: str, n_sources: int, base_pos: int | None) -> str:
    """Dtype of a step's result without ``out_dtype``: the working dtype, or the
    method's promoted ``result_dtype`` when a non-base input takes part."""
    has_donor = n_sources > (1 if base_pos is not None else 0)
    return method.result_dtype if method.result_dtype and has_donor else work


def _check_inputs(method: MethodSpec, n: int, has_base: bool, where: str, err: type = ConfigError) -> None:
    """mergekit's input-count contract (``method.inputs``) for ``n`` inputs."""
    c = method.inputs
    assert c is not None

    def check(what: str, count: int, lo: int, hi: int | None) -> None:
        if count < lo or (hi is not None and count > hi):
            need = f"exactly {lo}" if hi == lo else (f"at least {lo}" if count < lo else f"at most {hi}")
            raise err(f"{where}: merge_method {method.name} takes {need} {what}, got {count}")

    check("input models (the base included)", n, c.min_inputs, c.max_inputs)
    if c.min_non_base is not None or c.max_non_base is not None:
        check("models besides the base", n - int(has_base and not c.base_ignored), c.min_non_base or 0, c.max_non_base)


def _optional_inputs(method: MethodSpec, present: Sequence[int], base: int | None, out_name: str) -> bool:
    """An optional tensor some models lack: merge what is there (True) or leave it out (False).

    A single remaining input that the policy passes through is merged as a
    one-source step (the chunk program copies it).
    """
    c = method.inputs
    assert c is not None
    base_in = base is not None and base in present
    single = len(present) == 1
    if single and (c.optional == "passthrough_singleton" or (c.optional == "passthrough_base_singleton" and base_in)):
        return True
    if c.optional == "base_or_skip" and len(present) < c.min_inputs:
        return single and base_in
    if base is not None and not base_in and not c.base_ignored:
        raise PlanError(f"tensor {out_name}: the base model lacks it, and merge_method {method.name} needs the base")
    _check_inputs(method, len(present), base_in, f"tensor {out_name}", PlanError)
    return True


def load_models(cfg: MergeConfig, aliases: Mapping[str, Path] | None = None,
                hub: HubAccess | None = None) -> tuple[ModelInput, ...]:
    """Resolve and open every referenced model (headers only). ``aliases``: model
    references that name folders directly (a recipe's earlier stages); ``hub``:
    how Hugging Face ids may reach the Hub (:class:`~superswallow_jax.io.hub.HubAccess`);
    a ``base+adapter`` reference opens the base and the adapter."""
    out: list[ModelInput] = []
    try:
        for ref in cfg.referenced_models():
            base, adapter = split_reference(ref, "model")
            d, src = (Path(aliases[base]), None) if aliases and base in aliases else resolve_model(base, hub)
            conf = read_model_config(d)
            ckpt: Checkpoint | AdaptedCheckpoint = Checkpoint(d)
            ad_src = None
            if adapter is not None:
                ad_dir, ad_src = resolve_model(adapter, hub, "adapter")
                ckpt = AdaptedCheckpoint(ckpt, Adapter(adapter, ad_dir), conf, f"model {ref}")
            out.append(ModelInput(ref, d, MappingProxyType(conf), ckpt, src, ad_src))
    except BaseException:
        for m in out:
            m.checkpoint.close()
        raise
    return tuple(out)


def _promote(codes: Sequence[str]) -> str:
    """torch-style promotion of float dtype codes (bf16 + f16 -> f32)."""
    s = set(codes)
    if len(s) == 1:
        return codes[0]
    if "F64" in s:
        return "F64"
    return "F32"


@dataclass(frozen=True)
class _SliceSources:
    slice: SliceSpec | None
    sources: tuple[tuple[int, SourceSpec | None, int], ...]  # (model index, spec, first layer)
    base: int | None  # model index
    num_layers: int


def _normalize(cfg: MergeConfig, models: Sequence[ModelInput], arch: Architecture) -> list[_SliceSources]:
    index = {m.key: i for i, m in enumerate(models)}
    nl = [arch.num_layers(m.config, m.checkpoint.tensors) for m in models]
    if cfg.models is not None:
        entries = [(index[s.model], s, 0) for s in cfg.models]
        base = index[cfg.base_model] if cfg.base_model else None
        if base is not None and base not in [e[0] for e in entries]:
            entries.append((base, None, 0))
        layers = {nl[e[0]] for e in entries}
        if len(layers) != 1:
            detail = ", ".join(f"{models[e[0]].key}: {nl[e[0]]}" for e in entries)
            raise PlanError(f"models: all models must have the same number of layers ({detail})")
        return [_SliceSources(None, tuple(entries), base, layers.pop())]
    out = []
    for sl in cfg.slices or ():
        entries = []
        for s in sl.sources:
            a, b = s.layer_range  # type: ignore[misc]
            m = index[s.model]
            if b > nl[m]:
                raise ConfigError(f"{s.where}.layer_range: [{a}, {b}) exceeds the {nl[m]} layers of {s.model}")
            entries.append((m, s, a))
        bref = sl.base_model or cfg.base_model
        base = index[bref] if bref else None
        if base is not None and base not in [e[0] for e in entries]:
            base = None  # base not among this slice's sources: the slice has no base
        n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]  # type: ignore[index]
        out.append(_SliceSources(sl, tuple(entries), base, n))
    return out


def _find(ckpt: Checkpoint, w: WeightTemplate) -> TensorInfo | None:
    for n in (w.name, *w.aliases, *w.tied_names):
        if n in ckpt.tensors:
            return ckpt.tensors[n]
    return None


def _has_direct(ckpt: Checkpoint, w: WeightTemplate) -> bool:
    return any(n in ckpt.tensors for n in (w.name, *w.aliases))


def _check_slices(cfg: MergeConfig, slices: Sequence[_SliceSources]) -> None:
    """The method's base and input contract against every slice (mergekit's plan-time checks)."""
    method = cfg.method
    if method.base == "required" and any(s.base is None for s in slices):
        if cfg.base_model is None:
            raise ConfigError(f"base_model: merge_method {method.name} needs a base model")
        raise ConfigError(f"base_model: {cfg.base_model} is not a source of every slice")
    for s in slices:
        where = s.slice.where if s.slice else "models"
        if method.one_source_per_slice and len(s.sources) != 1:
            raise ConfigError(f"{where}: {method.name} takes exactly one model per slice, got {len(s.sources)}")
        if method.inputs is not None:
            _check_inputs(method, len(s.sources), s.base is not None, where, ConfigError)


@dataclass(frozen=True)
class _Tokens:
    """The output tokenizer, each model's tokenizer (by model index) and ``tokenizer.tokens``."""

    output: Any = None  # tokenizer.OutputTokenizer
    models: Mapping[int, Any] = field(default_factory=dict)  # tokenizer.ModelTokenizer
    overrides: Mapping[str, Any] = field(default_factory=dict)


def _tokens(cfg: MergeConfig, models: Sequence[ModelInput], base_model: int | None) -> _Tokens:
    if cfg.tokenizer is None:
        return _Tokens()
    from . import tokenizer as tok_mod

    index = {m.key: i for i, m in enumerate(models)}
    tok_base = base_model if base_model is not None else 0
    order = [tok_base] + [i for i in range(len(models)) if i != tok_base]
    mtoks = {}
    for i in order:
        vs = models[i].config.get("vocab_size")
        mtoks[i] = tok_mod.load_model_tokenizer(models[i].dir, vs if isinstance(vs, int) else None)
    source = cfg.tokenizer.source
    if source not in ("base", "union") and source not in index:
        raise ConfigError(f"tokenizer source: {short(source)} is not base, union or one of the merged models "
                          f"({', '.join(m.key for m in models)})")
    overrides = tok_mod.overrides_from_config(cfg.tokenizer.tokens, [m.key for m in models])
    output = tok_mod.build_output_tokenizer(
        source, mtoks[order[0]], [mtoks[i] for i in order[1:]], [models[i].key for i in order], overrides,
        cfg.tokenizer.pad_to_multiple_of,
    )
    return _Tokens(output, mtoks, overrides)


@dataclass(frozen=True)
class _Planner:
    """What every step of one plan is made from."""

    cfg: MergeConfig
    models: tuple[ModelInput, ...]
    tokens: _Tokens
    forced_out: str | None

    def sources(self, w: WeightTemplate, sl: _SliceSources, layer_of: Mapping[int, int] | None, out_name: str):
        """(model, spec, TensorInfo) of the slice's models that have tensor ``w``; None to leave it out."""
        def at(m: int, first: int) -> WeightTemplate:
            return w.at(first + layer_of[m]) if layer_of is not None else w

        srcs: list[tuple[int, SourceSpec | None, TensorInfo]] = []
        for m, spec, first in sl.sources:
            info = _find(self.models[m].checkpoint, at(m, first))
            if info is None:
                if w.optional:
                    continue
                raise PlanError(f"model {self.models[m].key}: tensor {at(m, first).name} is missing ({self.models[m].dir})")
            srcs.append((m, spec, info))
        if not srcs:
            return None
        if w.optional and not any(_has_direct(self.models[m].checkpoint, at(m, first)) for m, _, first in sl.sources):
            return None
        method = self.cfg.method
        if method.inputs is not None and len(srcs) < len(sl.sources):
            if not _optional_inputs(method, [m for m, _, _ in srcs], sl.base, out_name):
                return None
        for m, _, info in srcs:
            if info.dtype not in FLOAT_CODES:
                raise PlanError(f"model {self.models[m].key}: tensor {info.name} has non-float dtype {info.dtype}")
        return srcs

    def dtype(self, m: int, info: TensorInfo) -> str:
        """The dtype model ``m``'s tensor ``info`` has for the merge (a base+adapter model's load dtype)."""
        ad = self.models[m].adaptation(info)
        return ad.dtype if ad is not None else info.dtype

    def shape(self, w: WeightTemplate, srcs, out_name: str, embed: bool) -> tuple[int, ...]:
        """The output shape: the common shape, or (output vocabulary, hidden) for aligned embeddings."""
        def detail() -> str:
            return ", ".join(f"{self.models[m].key}: {list(info.shape)}" for m, _, info in srcs)

        if embed:
            hidden = {info.shape[1:] for _, _, info in srcs}
            if len(hidden) != 1 or any(len(info.shape) != 2 for _, _, info in srcs):
                raise PlanError(f"tensor {out_name}: embedding shapes differ beyond the vocabulary axis ({detail()})")
            return (self.tokens.output.padded_vocab_size, *hidden.pop())
        shapes = {info.shape for _, _, info in srcs}
        if len(shapes) != 1:
            vocab_only = len({info.shape[1:] for _, _, info in srcs}) == 1
            hint = " (set tokenizer_source to align vocabularies)" if w.is_embed and vocab_only else ""
            raise PlanError(f"tensor {out_name}: shape mismatch between models ({detail()}){hint}")
        return tuple(shapes.pop())

    def step(self, out_name: str, w: WeightTemplate, sl: _SliceSources, layer_of: Mapping[int, int] | None,
             t: float, out_layer: int | None) -> Step | None:
        """One output tensor's step (None when the tensor is left out)."""
        cfg, method, models = self.cfg, self.cfg.method, self.models
        srcs = self.sources(w, sl, layer_of, out_name)
        if srcs is None:
            return None
        embed = w.is_embed and self.tokens.output is not None
        shape = self.shape(w, srcs, out_name, embed)
        base_pos = next((i for i, (m, _, _) in enumerate(srcs) if m == sl.base), None)
        if method.needs_base_tensor and base_pos is None:
            raise PlanError(f"tensor {out_name}: base model {models[sl.base].key if sl.base is not None else '?'} lacks it")
        work = cfg.dtype or _promote([self.dtype(m, info) for m, _, info in srcs])
        if work == "F64":
            raise ConfigError("dtype: float64 math is not supported; set dtype: float32")
        sources = tuple(
            Source(m, info, _resolve_model_params(method, sl.slice, cfg, spec, info.name, t, m == sl.base, models[m].key),
                   models[m].adaptation(info))
            for m, spec, info in srcs
        )
        gparams = _resolve_global_params(method, sl.slice, cfg, out_name, t)
        if method.validate is not None:
            method.validate(gparams, [(models[src.model].key, {**gparams, **src.params}, i == base_pos)
                                      for i, src in enumerate(sources)], out_name)
        alignment = None
        if embed:  # one alignment per tensor, over the models that have it, in source order
            from .tokenizer import align_embeddings

            alignment = align_embeddings(self.tokens.output, [self.tokens.models[m] for m, _, _ in srcs],
                                         [models[m].key for m, _, _ in srcs], base_pos, self.tokens.overrides)
        return Step(
            name=out_name, shape=shape, out_dtype=self.forced_out or _result_dtype(method, work, len(srcs), base_pos),
            work_dtype=work, sources=sources, base=base_pos, params=gparams, embed=embed, t=t,
            layer=out_layer, alignment=alignment,
        )


def _steps(planner: _Planner, arch: Architecture, slices: Sequence[_SliceSources]) -> tuple[list[Step], int]:
    """Every output tensor in HF order (pre-layer, layers renumbered across slices, post-layer), and the layer count."""
    steps: list[Step | None] = [planner.step(w.name, w, slices[0], None, 0.0, None) for w in arch.pre_weights]
    out_layer = 0
    for sl in slices:
        for j in range(sl.num_layers):
            t = j / (sl.num_layers - 1) if sl.num_layers > 1 else 1.0
            layer_of = {m: j for m, _, _ in sl.sources}
            steps += [planner.step(w.at(out_layer).name, w, sl, layer_of, t, out_layer) for w in arch.layer_templates]
            out_layer += 1
    steps += [planner.step(w.name, w, slices[-1], None, 0.0, None) for w in arch.post_weights]
    kept = [s for s in steps if s is not None]
    if not kept:
        raise PlanError("the plan is empty: no tensors matched the architecture")
    return kept, out_layer


def _out_config(cfg: MergeConfig, donor: ModelInput, arch: Architecture, dtype: str | None, layers: int,
                tokenizer: Any) -> dict:
    """config.json of the output: the donor's, with dtype, layer count and vocabulary size updated."""
    out_cfg = dict(donor.config)
    if dtype:
        # transformers v5 writes "dtype", 4.x "torch_dtype": update what the base uses
        keys = [k for k in ("dtype", "torch_dtype") if k in out_cfg] or ["torch_dtype"]
        for k in keys:
            out_cfg[k] = BY_CODE[dtype].name
    if cfg.slices is not None and arch.num_layers_key:
        out_cfg[arch.num_layers_key] = layers
    if tokenizer is not None:
        out_cfg["vocab_size"] = tokenizer.padded_vocab_size
    return out_cfg


def build_plan(cfg: MergeConfig, models: Sequence[ModelInput] | None = None, shard_size: int = 5_000_000_000,
               out_dtype: str | None = None, aliases: Mapping[str, Path] | None = None,
               hub: HubAccess | None = None, seed: int = 0, processes: int = 1) -> Plan:
    """Build the full plan. ``out_dtype`` (a dtype code) overrides the config's;
    ``aliases`` maps model references to folders (a recipe's earlier stages);
    ``hub``: how Hugging Face ids may reach the Hub (see :func:`load_models`);
    ``seed`` and ``processes``: what the output layout is made for (the seed is
    in every shard header; the shards are divided among the processes)."""
    models = tuple(models) if models is not None else load_models(cfg, aliases, hub)
    arch = resolve_architecture(
        [m.config for m in models], [list(m.checkpoint.tensors) for m in models], [m.key for m in models]
    )
    slices = _normalize(cfg, models, arch)
    _check_slices(cfg, slices)
    base_model = {m.key: i for i, m in enumerate(models)}[cfg.base_model] if cfg.base_model else None
    tokens = _tokens(cfg, models, base_model)
    forced_out = out_dtype or cfg.out_dtype
    steps, layers = _steps(_Planner(cfg, models, tokens, forced_out), arch, slices)
    specs = [TensorSpec(s.name, s.out_dtype, s.shape) for s in steps]
    shards = tuple(tuple(x.name for x in group) for group in assign_shards(specs, shard_size))
    donor = models[base_model if base_model is not None else 0]
    out_cfg = _out_config(cfg, donor, arch, forced_out or cfg.dtype, layers, tokens.output)
    chat = resolve_chat_template(cfg.chat_template, [m.dir for m in models])
    adapters = [w for m in models if m.adapter is not None for w in m.adapter.warnings]
    warnings = (*cfg.warnings, *adapters, *_unmatched_filters(cfg, steps))
    meta = output_metadata(cfg.method.name, config_hash(cfg.normalized), seed)
    layout = layout_output(specs, shards, meta, seed, processes)
    return Plan(cfg, cfg.method, models, base_model, arch, tuple(steps), shards, out_cfg, tokens.output, chat, warnings,
                layout)


def _settings(cfg: MergeConfig):
    """(where, parameter name, Setting) of every parameter the config sets."""
    levels = [("parameters", cfg.parameters)]
    levels += [(f"{s.where}.parameters", s.parameters) for s in cfg.models or ()]
    for sl in cfg.slices or ():
        levels.append((f"{sl.where}.parameters", sl.parameters))
        levels += [(f"{s.where}.parameters", s.parameters) for s in sl.sources]
    for where, params in levels:
        for pname, setting in params.items():
            yield where.split(": ", 1)[-1], pname, setting


def _unmatched_filters(cfg: MergeConfig, steps: Sequence[Step]) -> list[str]:
    """A warning per ``filter`` that no tensor name contains (a typo would otherwise pass unnoticed)."""
    names = {s.name for s in steps} | {src.tensor.name for s in steps for src in s.sources}
    out = []
    for where, pname, setting in _settings(cfg):
        for rule in setting.rules:
            f = rule.filter
            if f is not None and f != "*" and not any(f in n for n in names):
                out.append(f"{where}.{pname}: filter {short(f)} matches no tensor of these models")
    return out


def describe_params(p: Mapping[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v)

    return ", ".join(f"{k}={fmt(v)}" for k, v in p.items() if v is not None)


__all__ = ["Plan", "Step", "Source", "ModelInput", "build_plan", "load_models", "describe_params"]
