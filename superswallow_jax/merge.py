"""One merge, end to end: config -> plan -> streamed execution -> complete model folder.

Everything is written into a hidden staging folder inside the output folder and
renamed into place at the end (the weight index last). If anything fails, the
staging folder is removed and the output folder holds no partial model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import jax

from . import __version__, prng
from .config import MergeConfig
from .execute import ExecOptions, execute
from .io import model_dir as md
from .io.reader import INDEX_NAME
from .io.writer import ShardedWriter, TensorSpec, plan_layout, write_index
from .plan import Plan, build_plan

COPY_FILES = ("generation_config.json",)
TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json",
)


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    files: tuple[Path, ...]
    tensors: int
    bytes_written: int


def output_metadata(plan: Plan, seed: int) -> dict[str, str]:
    """safetensors ``__metadata__`` recorded in every output shard."""
    return {
        "format": "pt",
        "superswallow_jax": __version__,
        "jax": jax.__version__,
        "prng_scheme": prng.PRNG_SCHEME,
        "seed": str(seed),
        "merge_method": plan.method.name,
    }


def _input_dirs(plan: Plan) -> dict[str, Path]:
    return {m.key: m.dir for m in plan.models}


def write_extras(plan: Plan, staging: Path, out_name: str) -> list[Path]:
    """config.json, tokenizer, generation config, model card and config YAML into ``staging``."""
    cfg = plan.config
    written = []
    md.write_json(staging / "config.json", dict(plan.out_config))
    written.append(staging / "config.json")
    donor = plan.models[plan.base_model if plan.base_model is not None else 0]
    if plan.tokenizer is not None:
        from .tokenizer import write_tokenizer

        written += write_tokenizer(staging, plan.tokenizer, cfg.chat_template)
        for name in COPY_FILES:
            if (donor.dir / name).is_file():
                shutil.copyfile(donor.dir / name, staging / name)
                written.append(staging / name)
    else:
        for name in TOKENIZER_FILES + COPY_FILES:
            if (donor.dir / name).is_file():
                shutil.copyfile(donor.dir / name, staging / name)
                written.append(staging / name)
    base = cfg.base_model
    others = [m for m in cfg.referenced_models() if m != base]
    card = md.model_card(
        out_name, plan.method.pretty or plan.method.name, plan.method.reference, base, others, cfg.text,
        show_base=plan.method.base != "none",
    )
    (staging / "README.md").write_text(card, encoding="utf-8")
    (staging / "mergekit_config.yml").write_text(cfg.text, encoding="utf-8")
    written += [staging / "README.md", staging / "mergekit_config.yml"]
    return written


def run_merge(
    cfg: MergeConfig,
    out_dir: Path,
    *,
    seed: int = 0,
    shard_size: int = 5_000_000_000,
    out_dtype: str | None = None,
    force: bool = False,
    chunk_elems: int | None = None,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    order: Sequence[int] | None = None,
    fsync: bool = True,
) -> MergeResult:
    """Merge ``cfg`` into ``out_dir``. Raises SuperswallowError on user errors."""
    plan = build_plan(cfg, shard_size=shard_size, out_dtype=out_dtype)
    if on_plan is not None:
        on_plan(plan)
    out = md.prepare_output_dir(out_dir, _input_dirs(plan), force)
    staging = md.make_staging_dir(out)
    writer = None
    try:
        specs = [TensorSpec(s.name, s.out_dtype, s.shape) for s in plan.steps]
        by_name = {s.name: s for s in specs}
        meta = output_metadata(plan, seed)
        layouts = plan_layout([[by_name[n] for n in shard] for shard in plan.shards], meta)
        writer = ShardedWriter(out, staging, layouts, specs)
        opts = ExecOptions(seed=seed, **({"chunk_elems": chunk_elems} if chunk_elems else {}))
        execute(plan, writer, opts, progress, order)
        extras = write_extras(plan, staging, out.name)
        write_index(staging / INDEX_NAME, layouts, specs, {"superswallow_jax": __version__})
        if fsync:
            for p in extras + [staging / INDEX_NAME]:
                md.fsync_file(p)
        if force:
            md.clear_previous_merge(out)
        shard_paths = writer.commit(fsync=fsync)
        final = list(shard_paths)
        for p in extras:
            dst = out / p.name
            p.replace(dst)
            final.append(dst)
        (staging / INDEX_NAME).replace(out / INDEX_NAME)  # last: its presence marks a complete folder
        final.append(out / INDEX_NAME)
        bytes_written = writer.bytes_written()
    finally:
        if writer is not None:
            writer.abort()
        shutil.rmtree(staging, ignore_errors=True)
        for m in plan.models:
            m.checkpoint.close()
    return MergeResult(out, tuple(final), len(plan.steps), bytes_written)


def plan_summary(plan: Plan) -> dict:
    """A JSON-able description of the plan (used by ``superswallow plan --json``)."""
    return {
        "merge_method": plan.method.name,
        "architecture": plan.arch.name,
        "models": [{"key": m.key, "dir": str(m.dir)} for m in plan.models],
        "base_model": plan.models[plan.base_model].key if plan.base_model is not None else None,
        "vocab_size": plan.out_config.get("vocab_size"),
        "shards": [list(s) for s in plan.shards],
        "steps": [
            {
                "name": s.name, "shape": list(s.shape), "dtype": s.out_dtype, "work_dtype": s.work_dtype,
                "t": s.t, "embed": s.embed, "params": dict(s.params),
                "sources": [
                    {"model": plan.models[x.model].key, "tensor": x.tensor.name, "file": x.tensor.path.name,
                     "offsets": [x.tensor.begin, x.tensor.end], "params": dict(x.params), "base": i == s.base}
                    for i, x in enumerate(s.sources)
                ],
            }
            for s in plan.steps
        ],
    }


def dumps_plan(plan: Plan) -> str:
    return json.dumps(plan_summary(plan), indent=2, default=str)
