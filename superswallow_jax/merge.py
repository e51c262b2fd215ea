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
import yaml

from . import __version__, prng
from . import manifest as mf
from . import devices as dv
from .config import MergeConfig
from .errors import ConfigError
from .devices import ProcessInfo
from .execute import ExecOptions, iter_results
from .io import model_dir as md
from .io.reader import INDEX_NAME
from .io.writer import ShardedWriter, TensorSpec, plan_layout, write_index
from .plan import Plan, build_plan


COPY_FILES = ("generation_config.json",)
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
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


def normalized_config(cfg: MergeConfig) -> str:
    """The config as canonical JSON (comments, key order and spacing removed)."""
    return json.dumps(yaml.safe_load(cfg.text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def output_metadata(plan: Plan, seed: int) -> dict[str, str]:
    """safetensors ``__metadata__`` recorded in every output shard.

    Only what is known before the first byte is written: versions, PRNG
    scheme, seed, method and the normalized config with its hash. Digests of
    inputs and outputs are in ``merge_manifest.json`` (a file cannot hold its
    own hash, and a final header lets the file hash be computed while writing).
    """
    norm = normalized_config(plan.config)
    return {
        "format": "pt",
        "superswallow_jax": __version__,
        "jax": jax.__version__,
        "prng_scheme": prng.PRNG_SCHEME,
        "seed": str(seed),
        "merge_method": plan.method.name,
        "config_sha256": mf.config_hash(norm),
        "config": norm,
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

        written += write_tokenizer(staging, plan.tokenizer, plan.chat_template)
        for name in COPY_FILES:
            if (donor.dir / name).is_file():
                shutil.copyfile(donor.dir / name, staging / name)
                written.append(staging / name)
    else:
        skip = CHAT_TEMPLATE_FILES if plan.chat_template is not None else ()
        for name in TOKENIZER_FILES + COPY_FILES:
            if name not in skip and (donor.dir / name).is_file():
                shutil.copyfile(donor.dir / name, staging / name)
                written.append(staging / name)
        if plan.chat_template is not None and (staging / "tokenizer_config.json").is_file():
            tcfg = json.loads((staging / "tokenizer_config.json").read_text(encoding="utf-8"))
            tcfg["chat_template"] = plan.chat_template
            md.write_json(staging / "tokenizer_config.json", tcfg)
    base = cfg.base_model
    # mergekit's card: slerp names no base and lists every model as merged
    show_base = plan.method.base != "none" and plan.method.name != "slerp"
    others = [m for m in cfg.referenced_models() if m != base or not show_base]
    card = md.model_card(
        out_name, plan.method.pretty or plan.method.name, plan.method.reference, base, others, cfg.text,
        show_base=show_base,
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
    pass_cache_bytes: int | None = None,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    order: Sequence[int] | None = None,
    fsync: bool = True,
    hash_inputs: bool = True,
    digests: bool = True,
    file_digests: bool = False,
    procs: ProcessInfo = ProcessInfo(0, 1),
) -> MergeResult:
    """Merge ``cfg`` into ``out_dir``. Raises SuperswallowError on user errors.

    Also writes ``merge_manifest.json`` (see :mod:`superswallow_jax.manifest`).
    Input files are hashed on a background thread while the merge runs (and
    cached); output tensors are hashed as they are written, which gives the
    sharding-independent model digest. ``file_digests=True`` also records the
    sha256 of each weight shard file (one more sha256 pass over the output:
    about a fifth of a 1.3 GB merge on two cores, so it is off by default; the
    tensor digests already cover every data byte). ``digests=False`` skips all
    hashing (the manifest then records no digests) for the fastest merge.
    ``pass_cache_bytes`` bounds what a multi-pass step keeps between its
    passes (default by backend, see :mod:`superswallow_jax.passcache`; 0 keeps
    nothing); it changes memory and speed, never the output bytes.

    With several processes (``procs``, see :mod:`superswallow_jax.devices`)
    the output shards are divided among them by bytes; each process merges
    and writes its own shards, and process 0 writes the index, config,
    tokenizer, card and manifest after all shards are in place. The files are
    the same bytes as a single-process merge.
    """
    if pass_cache_bytes is not None and pass_cache_bytes < 0:
        raise ConfigError(f"pass cache budget must be >= 0 bytes, got {pass_cache_bytes} (--pass-cache-mb)")
    plan = build_plan(cfg, shard_size=shard_size, out_dtype=out_dtype)
    if on_plan is not None:
        on_plan(plan)
    multi = procs.count > 1
    if procs.is_main:
        out = md.prepare_output_dir(out_dir, _input_dirs(plan), force)
        if force and multi:
            md.clear_previous_merge(out)
    else:
        out = Path(out_dir).expanduser().resolve()
        out.mkdir(parents=True, exist_ok=True)
    if multi:
        dv.barrier("superswallow/output-ready")
    staging = md.make_staging_dir(out, tag=f"p{procs.index}" if multi else "")
    writer = None
    final: list[Path] = []
    try:
        specs = [TensorSpec(s.name, s.out_dtype, s.shape) for s in plan.steps]
        by_name = {s.name: s for s in specs}
        groups = [[by_name[n] for n in shard] for shard in plan.shards]
        layouts = plan_layout(groups, output_metadata(plan, seed))
        owners = dv.assign_shards_to_processes([lay.size for lay in layouts], procs.count)
        mine = [i for i, o in enumerate(owners) if o == procs.index]
        my_names = {n for i in mine for n in plan.shards[i]}
        writer = ShardedWriter(out, staging, [layouts[i] for i in mine], specs, hash_files=digests and file_digests, writeback=fsync)
        hasher = mf.StreamHasher({s.name: (s.dtype, s.shape) for s in specs if s.name in my_names}) if digests else None
        inputs = mf.InputHasher(input_files(plan)).start() if (digests and hash_inputs and procs.is_main) else None
        opts = ExecOptions(seed=seed, chunk_elems=chunk_elems or None, pass_cache_bytes=pass_cache_bytes)
        steps = list(order) if order is not None else list(range(len(plan.steps)))
        steps = [i for i in steps if plan.steps[i].name in my_names]

        def sink(name, offset, data, _w=writer):
            _w.write(name, offset, data)
            if hasher is not None:
                hasher.feed(name, offset, data)

        for _ in iter_results(plan, opts, progress, steps, sink=sink):
            pass
        tensor_digests = hasher.digests() if hasher is not None else {}
        input_hashes = inputs.join() if inputs is not None else {}
        if multi:
            dv.kv_publish(f"superswallow/digests/{procs.index}", {d.name: [d.dtype, list(d.shape), d.sha256] for d in tensor_digests.values()})
            if procs.is_main:
                dv.kv_publish("superswallow/inputs/0", input_hashes)
            tensor_digests = {
                n: mf.TensorDigest(n, v[0], tuple(v[1]), v[2])
                for part in dv.kv_gather("superswallow/digests", procs.count) for n, v in part.items()
            }
            input_hashes = dv.kv_gather("superswallow/inputs", 1)[0]
        meta = output_metadata(plan, seed)
        writer.finish(fsync)
        file_hashes = writer.file_sha256() if digests and file_digests else {}
        if force and not multi:
            md.clear_previous_merge(out)
        final += writer.commit(fsync=fsync)
        bytes_written = writer.bytes_written()
        if multi:
            dv.kv_publish(f"superswallow/files/{procs.index}", file_hashes)
            file_hashes = {k: v for part in dv.kv_gather("superswallow/files", procs.count) for k, v in part.items()}
        if procs.is_main:
            extras = write_extras(plan, staging, out.name)
            write_index(staging / INDEX_NAME, layouts, specs, {"superswallow_jax": __version__})
            manifest = build_manifest(plan, seed, meta, input_hashes, tensor_digests, file_hashes,
                                      extras + [staging / INDEX_NAME] if digests else [])
            manifest["digests"] = digests
            manifest["file_digests"] = digests and file_digests
            md.write_json(staging / mf.MANIFEST_NAME, manifest)
            extras.append(staging / mf.MANIFEST_NAME)
            if fsync:
                for p in extras + [staging / INDEX_NAME]:
                    md.fsync_file(p)
            for p in extras:
                dst = out / p.name
                p.replace(dst)
                final.append(dst)
            (staging / INDEX_NAME).replace(out / INDEX_NAME)  # last: its presence marks a complete folder
            final.append(out / INDEX_NAME)
    finally:
        if writer is not None:
            writer.abort()
        shutil.rmtree(staging, ignore_errors=True)
        for m in plan.models:
            m.checkpoint.close()
    return MergeResult(out, tuple(final), len(my_names), bytes_written)


def input_files(plan: Plan) -> dict[str, Path]:
    """Every weight file and config.json of every input model, labelled ``<model ref>/<file name>``."""
    files = {}
    for m in plan.models:
        for f in [*m.checkpoint.files, m.dir / "config.json"]:
            files[f"{m.key}/{f.name}"] = f
    return files


def build_manifest(plan: Plan, seed: int, meta: dict, input_hashes: dict, tensor_digests: dict,
                   shard_hashes: dict, other_files: list[Path]) -> dict:
    """The content of ``merge_manifest.json`` (``shard_hashes``: file name -> sha256)."""
    out_files = dict(shard_hashes)
    for p in other_files:
        out_files[p.name] = mf.file_sha256(p)
    return {
        "superswallow_jax": __version__,
        "jax": jax.__version__,
        "prng_scheme": prng.PRNG_SCHEME,
        "seed": seed,
        "merge_method": plan.method.name,
        "config": json.loads(meta["config"]),
        "config_sha256": meta["config_sha256"],
        "input_files_sha256": dict(sorted(input_hashes.items())),
        "model_digest": mf.model_digest(tensor_digests.values()) if tensor_digests else None,
        "tensors": {d.name: {"dtype": d.dtype, "shape": list(d.shape), "sha256": d.sha256} for d in sorted(tensor_digests.values(), key=lambda d: d.name)},
        "files_sha256": dict(sorted(out_files.items())),
    }


def verify_stream(cfg: MergeConfig, *, seed: int = 0, select=None, chunk_elems: int | None = None,
                  progress: Callable[[int], None] | None = None) -> dict:
    """Re-run the merge without writing weights; return per-tensor digests (selected tensors only)."""
    plan = build_plan(cfg)
    try:
        order = [i for i, s in enumerate(plan.steps) if select is None or select(s.name)]
        specs = {plan.steps[i].name: (plan.steps[i].out_dtype, plan.steps[i].shape) for i in order}
        hasher = mf.StreamHasher(specs)
        opts = ExecOptions(seed=seed, **({"chunk_elems": chunk_elems} if chunk_elems else {}))
        for _ in iter_results(plan, opts, progress, order, sink=hasher.feed):
            pass
        return hasher.digests()
    finally:
        for m in plan.models:
            m.checkpoint.close()


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
