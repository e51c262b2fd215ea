"""One merge, end to end: config -> plan -> streamed execution -> complete model folder.

:func:`run_merge` plans, prepares the output (:class:`~superswallow_jax.output.Output`:
lock, staging folder beside OUT, resume), streams every tensor into the
staging shards, and commits: OUT holds the whole merge or none of it
(:mod:`superswallow_jax.io.commit`). :func:`verify_stream` re-runs a merge
without writing, for ``verify``.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from . import manifest as mf
from . import devices as dv
from . import finite
from .config import MergeConfig
from .devices import ProcessInfo
from .execute import ExecOptions, iter_results
from .io.commit import crash_point
from .options import MergeOptions
from .output import Output
from .plan import Plan, build_plan

if TYPE_CHECKING:
    from .io.hub import HubAccess


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    files: tuple[Path, ...]
    tensors: int  # tensors of this process's shards
    bytes_written: int  # bytes of tensor data written by this run (kept tensors count too)
    kept: int = 0  # tensors a resumed run found already written


def run_merge(cfg: MergeConfig, out_dir: Path, opts: MergeOptions = MergeOptions(), *,
              progress: Callable[[int], None] | None = None, on_plan: Callable[[Plan], None] | None = None,
              order: Sequence[int] | None = None, procs: ProcessInfo = ProcessInfo(0, 1),
              say: Callable[[str], None] | None = None, stage: str | None = None,
              aliases: Mapping[str, Path] | None = None, manifest_extra: Mapping | None = None,
              hub: HubAccess | None = None) -> MergeResult:
    """Merge ``cfg`` into ``out_dir``. Raises SuperswallowError on user errors.

    ``progress(n)``: output bytes produced (a resumed run's kept tensors count at once); ``on_plan(plan)``: once planned;
    ``order``: step indices in the order to run (tests); ``say(line)``: notes
    (resume, removed staging). With several processes (``procs``) the shards
    are divided among them by bytes and process 0 commits. A stage of a
    multi-stage recipe (:mod:`superswallow_jax.recipe`) passes its ``stage``
    name (folded into the PRNG keys and recorded), ``aliases`` (earlier stages'
    folders by name) and, for the final stage, ``manifest_extra`` (the stages).
    ``hub``: how Hugging Face ids may reach the Hub (cache first; downloads
    unless offline; progress), see :class:`~superswallow_jax.io.hub.HubAccess`.
    """
    plan = build_plan(cfg, shard_size=opts.shard_size, out_dtype=opts.out_dtype, aliases=aliases, hub=hub,
                      seed=opts.seed, processes=procs.count)
    if on_plan is not None:
        on_plan(plan)
    output = Output(plan, out_dir, opts, procs, say or (lambda _line: None), stage)
    with plan:
        try:
            output.prepare({**{m.key: m.dir for m in plan.models},
                            **{f"{m.key} (adapter)": m.adapter.dir for m in plan.models if m.adapter is not None}})
            digests, inputs, files, written, kept, bad = _write_tensors(plan, output, opts, progress, order, stage)
            manifest = mf.build_manifest(plan, opts, inputs, digests, files)
            manifest["nonfinite"] = bad
            manifest.update({"stage": stage} if stage is not None else {}, **(manifest_extra or {}))
            final = output.commit(manifest)
            for line in finite.warnings(bad) if output.procs.is_main else ():
                (say or (lambda _line: None))(line)
        except BaseException:
            output.abort()
            raise
        finally:
            output.release()
    return MergeResult(output.out, tuple(final), len(digests), written, kept)


def _write_tensors(plan: Plan, output: Output, opts: MergeOptions, progress, order, stage: str | None):
    """Stream this process's tensors into the staging shards; digests gathered from every process."""
    writer, journal, kept = output.writer()
    if progress is not None and kept:
        progress(sum(plan.step(n).nbytes for n in kept))
    try:
        mine = {n for lay in output.mine for n in lay.offsets}
        specs = {s.name: (s.out_dtype, s.shape) for s in plan.steps if s.name in mine and s.name not in kept}
        hasher = mf.StreamHasher(specs) if opts.digests else None
        main = output.procs.is_main
        inputs = mf.InputHasher(mf.input_files(plan)).start() if (opts.digests and opts.hash_inputs and main) else None
        steps = [i for i in (order if order is not None else range(len(plan.steps))) if plan.steps[i].name in specs]

        finished, lock = [0], threading.Lock()
        tally = finite.NonFiniteTally()
        for n in kept:
            tally.restore(n, journal.nonfinite.get(n, {}))

        def sink(name, offset, data):  # on the writer lanes: different tensors at once
            writer.write(name, offset, data)
            if hasher is not None:
                done = hasher.feed(name, offset, data)
                if done is not None:
                    journal.add(name, done, tally.of_step(name))
                    with lock:
                        finished[0] += 1
                        n = finished[0]
                    crash_point(f"{stage}/tensor-{n}" if stage else f"tensor-{n}")

        exe = ExecOptions(opts.seed, opts.chunk_elems, opts.pass_cache_bytes, stage, opts.io_threads)
        for _ in iter_results(plan, exe, progress, steps, sink=sink, nonfinite=tally):
            pass
        digests = {n: mf.TensorDigest(n, plan.step(n).out_dtype, plan.step(n).shape, sha) for n, sha in kept.items()}
        digests.update(hasher.digests() if hasher is not None else {})
        input_hashes = inputs.join() if inputs is not None else {}
        writer.finish(opts.fsync)
        files = writer.file_sha256() if opts.digests and opts.file_digests else {}
        bad = tally.record()
        if output.procs.count > 1:
            digests, input_hashes, files = _gather(output.procs, digests, input_hashes, files)
            dv.kv_publish(f"superswallow/nonfinite/{output.procs.index}", bad)
            bad = finite.combine(dv.kv_gather("superswallow/nonfinite", output.procs.count))
        return digests, input_hashes, files, writer.bytes_written(), len(kept), bad
    finally:
        writer.abort()
        journal.close()


def _gather(procs: ProcessInfo, digests: dict, input_hashes: dict, files: dict):
    """Every process's tensor and file digests, and process 0's input digests."""
    dv.kv_publish(f"superswallow/digests/{procs.index}",
                  {d.name: [d.dtype, list(d.shape), d.sha256] for d in digests.values()})
    dv.kv_publish(f"superswallow/files/{procs.index}", files)
    if procs.is_main:
        dv.kv_publish("superswallow/inputs/0", input_hashes)
    digests = {n: mf.TensorDigest(n, v[0], tuple(v[1]), v[2])
               for part in dv.kv_gather("superswallow/digests", procs.count) for n, v in part.items()}
    files = {k: v for part in dv.kv_gather("superswallow/files", procs.count) for k, v in part.items()}
    return digests, dv.kv_gather("superswallow/inputs", 1)[0], files


def verify_stream(cfg: MergeConfig, opts: MergeOptions = MergeOptions(), select=None,
                  progress: Callable[[int], None] | None = None, stage: str | None = None,
                  aliases: Mapping[str, Path] | None = None, hub: HubAccess | None = None) -> dict:
    """Re-run the merge without writing weights; return per-tensor digests (selected tensors only).

    ``opts``: the byte-relevant options of the merge being checked (seed, out_dtype).
    """
    plan = build_plan(cfg, shard_size=opts.shard_size, out_dtype=opts.out_dtype, aliases=aliases, hub=hub)
    with plan:
        order = [i for i, s in enumerate(plan.steps) if select is None or select(s.name)]
        specs = {plan.steps[i].name: (plan.steps[i].out_dtype, plan.steps[i].shape) for i in order}
        hasher = mf.StreamHasher(specs)
        exe = ExecOptions(opts.seed, opts.chunk_elems, stage=stage, io_threads=opts.io_threads)
        for _ in iter_results(plan, exe, progress, order,
                              sink=hasher.feed):
            pass
        return hasher.digests()


def plan_summary(plan: Plan) -> dict:
    """A JSON-able description of the plan (used by ``superswallow plan --json``)."""
    places = plan.layout.places()
    return {
        "merge_method": plan.method.name,
        "architecture": plan.arch.name,
        "models": [_model_summary(m) for m in plan.models],
        "base_model": plan.models[plan.base_model].key if plan.base_model is not None else None,
        "vocab_size": plan.out_config.get("vocab_size"),
        "shards": [list(s) for s in plan.shards],
        "files": [{"name": lay.filename, "bytes": lay.size, "header_bytes": len(lay.header), "owner": o}
                  for lay, o in zip(plan.layout.files, plan.layout.owners)],
        "steps": [
            {
                "name": s.name, "shape": list(s.shape), "dtype": s.out_dtype, "work_dtype": s.work_dtype,
                "t": s.t, "embed": s.embed, "params": dict(s.params),
                "output": {"file": places[s.name].file, "offsets": [places[s.name].begin, places[s.name].end],
                           "owner": places[s.name].owner},
                "sources": [
                    {"model": plan.models[x.model].key, "tensor": x.tensor.name, "file": x.tensor.path.name,
                     "offsets": [x.tensor.begin, x.tensor.end], "params": dict(x.params), "base": i == s.base,
                     **({"lora": _lora_summary(x.adapt)} if x.adapt is not None else {})}
                    for i, x in enumerate(s.sources)
                ],
            }
            for s in plan.steps
        ],
    }


def _model_summary(m) -> dict:
    out = {"key": m.key, "dir": str(m.dir)}
    if m.adapter is not None:
        c = m.adapter.config
        out["adapter"] = {"dir": str(m.adapter.dir), "file": m.adapter.file.path.name, "r": c.r,
                          "lora_alpha": c.lora_alpha, "use_rslora": c.use_rslora, "modules": len(m.adapter.factors),
                          "saved": sorted(m.adapter.saved), "load_dtype": m.checkpoint.dtype}
    return out


def _lora_summary(ad) -> dict:
    """A base+adapter source: its load dtype and, with a LoRA, rank, scale and orientation."""
    out = {"dtype": ad.dtype}
    if ad.delta is not None:
        out.update(rank=ad.delta.rank, scale=ad.delta.scale, transposed=ad.delta.transposed)
    return out


def dumps_plan(plan: Plan) -> str:
    return json.dumps(plan_summary(plan), indent=2, default=str)
