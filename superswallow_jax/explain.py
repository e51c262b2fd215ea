"""``plan``'s text: what a merge will do, readable on one screen.

:func:`plan_text` ends with the summary (method, models and their formats,
tokenizer, sizes, shards), the per-model parameters by layer as a compact
table (the Superswallow gradients: one row per layer, one column per group of
tensors that get the same values) and the warnings; ``tensors=True`` first
lists every output tensor with its sources and resolved parameters.
:func:`recipe_plan_text` does the same for each stage of a multi-stage
recipe, after the stage graph.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from .plan import Plan, Step, describe_params

__all__ = ["plan_text", "recipe_plan_text"]

_LAYER = re.compile(r"\.(\d+)\.")


def _kind(name: str) -> str:
    """A layer tensor's name without its layer prefix (``model.layers.3.mlp.up_proj.weight`` -> ``mlp.up_proj``)."""
    m = _LAYER.search(name)
    tail = name[m.end():] if m else name
    return tail.removesuffix(".weight").removesuffix(".bias")


def _head(kinds: list[str], width: int = 28) -> str:
    h = ",".join(k.split(".")[-1] for k in kinds)
    return h if len(h) <= width else h[: width - 3] + "..."


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _table(title: str, grid: dict[str, dict[int, Any]], layers: list[int], default: Any) -> list[str]:
    """``grid`` (tensor kind -> layer -> value) as layers x groups of kinds with the same values."""
    values = [v for col in grid.values() for v in col.values()]
    if not values or all(v is None or v == default for v in values):
        return []  # nothing set: the default everywhere
    groups: dict[tuple, list[str]] = {}
    for kind, col in grid.items():
        groups.setdefault(tuple(col.get(layer) for layer in layers), []).append(kind)
    cols = list(groups.items())
    heads = [_head(kinds) for _, kinds in cols]
    widths = [max(7, len(h)) for h in heads]
    lines = [f"{title}, by layer:", "  layer  " + "  ".join(h.ljust(w) for h, w in zip(heads, widths))]
    for i, layer in enumerate(layers):
        lines.append(f"  {layer:>5}  " + "  ".join(_fmt(vals[i]).ljust(w) for (vals, _), w in zip(cols, widths)))
    return lines


def _param_tables(plan: Plan) -> list[str]:
    """Per parameter (global, then each model's): layers x tensor groups, identical columns merged."""
    layers = sorted({s.layer for s in plan.steps if s.layer is not None})
    layer_steps = [s for s in plan.steps if s.layer is not None]
    lines: list[str] = []
    for pname, param in plan.method.global_.items():
        grid: dict[str, dict[int, Any]] = {}
        for s in layer_steps:
            grid.setdefault(_kind(s.name), {})[s.layer] = s.params.get(pname)
        lines += _table(f"{pname} (global)", grid, layers, param.default)
    for m, model in enumerate(plan.models):
        if m == plan.base_model and not plan.method.base_takes_model_params:
            continue
        for pname, param in plan.method.per_model.items():
            grid = {}
            for s in layer_steps:
                for src in s.sources:
                    if src.model == m and pname in src.params:
                        grid.setdefault(_kind(s.name), {})[s.layer] = src.params[pname]
            lines += _table(f"{pname} of {model.key}", grid, layers, param.default)
    return lines


def _tensor_lines(plan: Plan, s: Step, places: Mapping[str, Any]) -> list[str]:
    g = describe_params(s.params)
    at = places[s.name]
    out = [f"{s.name} {list(s.shape)} {s.out_dtype} t={s.t:.4f}{' embed' if s.embed else ''}{'  ' + g if g else ''}",
           f"    -> {at.file} bytes [{at.begin}, {at.end})" + (f" (process {at.owner})" if plan.layout.processes > 1 else "")]
    for i, src in enumerate(s.sources):
        role = "base " if i == s.base else ""
        d = src.adapt.delta if src.adapt is not None else None
        lora = f"  + LoRA r={d.rank} scale={d.scale:.6g}{' (transposed)' if d.transposed else ''}" if d else ""
        out.append(f"    <- {role}{plan.models[src.model].key}:{src.tensor.name}{lora}  {describe_params(src.params)}".rstrip())
    return out


def _summary(plan: Plan) -> list[str]:
    base = plan.models[plan.base_model].key if plan.base_model is not None else "none"
    out = [f"method: {plan.method.name}   architecture: {plan.arch.name}   base: {base}"]
    for i, m in enumerate(plan.models):
        files = m.checkpoint.files
        out.append(f"model[{i}]: {m.key} -> {m.dir} ({m.checkpoint.format}, {len(files)} file{'s' * (len(files) != 1)})")
        if m.adapter is not None:
            c = m.adapter.config
            out.append(f"    adapter: {m.adapter.dir} (LoRA r={c.r}, alpha={c.lora_alpha:g}{', rsLoRA' if c.use_rslora else ''}, "
                       f"{len(m.adapter.factors)} modules, {len(m.adapter.saved)} saved tensors; "
                       f"applied in {m.checkpoint.dtype})")
    if plan.tokenizer is not None:
        out.append(f"tokenizer: {plan.config.tokenizer.source}, output vocabulary {len(plan.tokenizer.tokens)} "
                   f"(padded {plan.tokenizer.padded_vocab_size})")
    out.append(f"{len(plan.steps)} tensors, {plan.total_input_bytes / 1e6:,.1f} MB in, "
               f"{plan.total_output_bytes / 1e6:,.1f} MB out, {len(plan.shards)} shard(s)")
    for lay in plan.layout.files:
        out.append(f"    {lay.filename}: {len(lay.offsets)} tensors, {lay.size:,} bytes ({len(lay.header):,} of header)")
    globals_: Mapping[str, Any] = plan.steps[0].params if plan.steps else {}
    if globals_:
        out.append(f"global parameters (first tensor): {describe_params(globals_)}")
    return out


def plan_text(plan: Plan, tensors: bool = False) -> list[str]:
    """The lines ``plan`` prints (see the module docstring)."""
    lines: list[str] = []
    if tensors:
        places = plan.layout.places()
        for s in plan.steps:
            lines += _tensor_lines(plan, s, places)
        lines.append("")
    lines += _summary(plan)
    lines += _param_tables(plan)
    lines += [f"warning: {w}" for w in plan.warnings]
    return lines


def recipe_plan_text(recipe, out, shard_size: int, as_json: bool, tensors: bool, hub=None) -> str:
    """``plan`` of a multi-stage recipe: the stage graph, then each stage's plan where its inputs exist.

    A stage reading an earlier stage is planned from that stage's finished
    output (beside ``out``, when given); otherwise its plan waits for that stage.
    ``hub``: how Hugging Face ids may reach the Hub (:class:`~superswallow_jax.io.hub.HubAccess`).
    """
    import json
    from pathlib import Path

    from .merge import dumps_plan
    from .plan import build_plan
    from .recipe import check_references, describe, stage_dirs

    check_references(recipe, hub)
    dirs = stage_dirs(recipe, Path(out), None) if out else {n: Path(".OUT.superswallow-stages", n)
                                                             for n in stage_dirs(recipe, Path("OUT"), None)}
    lines, doc = describe(recipe, dirs), []
    for s in recipe.stages:
        missing = [n for n in s.reads if not (out and (dirs[n] / "merge_manifest.json").is_file())]
        lines += ["", f"== stage {s.label} =="]
        if missing:
            why = f"it reads {', '.join(missing)}, not merged yet; its tensors are planned once that has run"
            lines.append(why)
            doc.append({"stage": s.name, "reads": list(s.reads), "plan": None, "why": why})
            continue
        with build_plan(s.config, shard_size=shard_size, aliases=dirs, hub=hub) as p:
            lines += plan_text(p, tensors)
            doc.append({"stage": s.name, "reads": list(s.reads), "plan": json.loads(dumps_plan(p))})
    return json.dumps({"stages": doc}, indent=1) if as_json else "\n".join(lines)
