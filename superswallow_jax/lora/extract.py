"""``superswallow extract-lora``: a fine-tune minus its base, factorised into a PEFT LoRA adapter.

For every weight :mod:`.extract_plan` picks, ``ΔW = W_finetuned - W_base`` is
read in row blocks (subtracted in float32 on the device), factorised by a
truncated SVD (:mod:`.svd`: exact for small tensors, the Gram matrix's
eigenvectors up to a memory budget, randomized with a key from the seed and
the tensor name beyond it), cut to ``--rank`` or to the
smallest rank keeping ``--rank-by-energy`` of ``||ΔW||²``, and split as
mergekit does: ``A = sqrt(S) Vᵀ``, ``B = U sqrt(S)`` (``lora_alpha = r``, so
PEFT's scale is 1). The factors are rounded to ``--dtype``; the reported
error is measured with the rounded factors in one more pass:
``||ΔW - B A||_F / ||ΔW||_F``, and the energy kept is ``Σ s_i² / ||ΔW||²``
over the kept ranks.

OUT gets ``adapter_config.json``, ``adapter_model.safetensors`` and
``extract_report.json``, through the same crash-safe commit as a merge
(:mod:`superswallow_jax.io.commit`). Factors wait in the staging folder
between the two phases (SVDs, then the file), so memory holds one tensor's
blocks and factors at a time.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..dtypes import NP
from ..errors import ConfigError, OutputError
from ..io import commit as cm
from ..io.checkpoint import Checkpoint
from ..io.model_dir import read_model_config, resolve_model_dir
from ..io.tensor_file import TensorInfo
from ..io.writer import ShardedWriter, ShardLayout, TensorSpec, encode_header
from . import kernel, svd
from .adapted import load_dtype
from .adapter import PREFIX
from .extract_plan import ExtractPlan, Factorise, plan_extraction

WEIGHTS = "adapter_model.safetensors"
REPORT = "extract_report.json"


@dataclass(frozen=True)
class ExtractOptions:
    rank: int
    energy: float | None = None  # keep the smallest rank with this share of ||ΔW||² (at most `rank`)
    modules: tuple[str, ...] = ()  # regular expressions searched in module names (default: all)
    skip_embeddings: bool = False
    dtype: str = "F32"  # the factors' dtype code
    seed: int = 0
    iters: int = 4  # power iterations of the randomized SVD
    oversample: int | None = None  # extra columns of the randomized SVD (default: the rank, at least 8)
    full_max: int = 1 << 20  # tensors of at most this many elements get an exact SVD
    gram_max: int = 1 << 26  # ... of at most this many (256 MB as float32) the Gram method; bigger: randomized
    block_elems: int = 1 << 20  # elements per row block
    fsync: bool = True
    force: bool = False

    def check(self) -> None:
        if type(self.rank) is not int or self.rank < 1:
            raise ConfigError(f"--rank: must be a positive integer, got {self.rank!r}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ConfigError(f"--rank-by-energy: must be in (0, 1], got {self.energy!r}")
        if self.dtype not in ("F32", "BF16", "F16"):
            raise ConfigError(f"--dtype: {self.dtype}: use float32, bfloat16 or float16")


@dataclass(frozen=True)
class TensorReport:
    name: str
    shape: tuple[int, ...]
    kind: str  # "lora", "saved", "unchanged", "left out"
    rank: int = 0
    error: float = 0.0  # ||ΔW - B A||_F / ||ΔW||_F
    energy: float = 1.0  # share of ||ΔW||² in the kept singular values
    svd: str = ""  # "exact", "gram" or "randomized"
    note: str = ""
    #: ||merge(W_base, B A) - W_ft||_F / ||ΔW||_F: the adapter merged into the base in its load dtype (PEFT's
    #: merge_and_unload, or a base+adapter reference), against the fine-tune
    merged_error: float = 0.0


@dataclass
class ExtractResult:
    out: Path
    tensors: list[TensorReport] = field(default_factory=list)

    def summary(self) -> dict:
        lora = [t for t in self.tensors if t.kind == "lora"]
        errs = [t.error for t in lora]
        return {"lora": len(lora), "saved": sum(t.kind == "saved" for t in self.tensors),
                "unchanged": sum(t.kind == "unchanged" for t in self.tensors),
                "left_out": sum(t.kind == "left out" for t in self.tensors),
                "max_rank": max((t.rank for t in lora), default=0),
                "mean_error": sum(errs) / len(errs) if errs else 0.0, "max_error": max(errs, default=0.0),
                "max_merged_error": max((t.merged_error for t in lora), default=0.0),
                "mean_energy": sum(t.energy for t in lora) / len(lora) if lora else 1.0}


# ---------------------------------------------------------------- reading deltas


def _pair_blocks(ft_ck: Checkpoint, base_ck: Checkpoint, f: Factorise, block_elems: int) -> Callable[[], Iterator]:
    """Row blocks ``(r0, r1, ft rows, base rows)`` of one tensor, as stored, on the device; read anew at every call."""
    m, n = f.ft.shape
    rows = max(1, block_elems // n)

    def read(ck: Checkpoint, info: TensorInfo, r0: int, r1: int) -> np.ndarray:
        buf = np.empty((r1 - r0, n), info.np_dtype)
        ck.file(info).read_into(info, r0 * n * info.np_dtype.itemsize, buf.reshape(-1).view(np.uint8))
        return buf

    def blocks():
        for r0 in range(0, m, rows):
            r1 = min(m, r0 + rows)
            yield r0, r1, jax.device_put(read(ft_ck, f.ft, r0, r1)), jax.device_put(read(base_ck, f.base, r0, r1))

    return blocks


def _delta_blocks(pairs: Callable[[], Iterator]) -> Callable[[], Iterator]:
    """The row blocks of ``ΔW = float32(ft) - float32(base)`` (:data:`.svd.DeltaSource`)."""
    return lambda: ((r0, r1, svd.delta(a, b)) for r0, r1, a, b in pairs())


@functools.partial(jax.jit, static_argnames=("load",))
def _block_errors(ft, base, left, right, load: str):
    """Squared Frobenius norms of one block: ``ΔW - L R``, and ``merge(W_base, L R) - W_ft`` with PEFT's merge
    (scale 1) into dtype ``load`` (:func:`.kernel.lora_rows`, the arithmetic of a ``base+adapter`` merge)."""
    d = ft.astype(jnp.float32) - base.astype(jnp.float32)
    fac = jnp.sum(jnp.square(d - jnp.matmul(left, right, precision=lax.Precision.HIGHEST)))
    merged = kernel.lora_rows(base, left, right, jnp.float32(1.0), load)
    return fac, jnp.sum(jnp.square(merged.astype(jnp.float32) - ft.astype(jnp.float32)))


def _errors(pairs: Callable[[], Iterator], left: jax.Array, right: jax.Array, load: str) -> tuple[float, float]:
    """``(||ΔW - L R||², ||merge(W_base, L R) - W_ft||²)`` over the tensor (block sums added in float64)."""
    fac, merged = [], []
    for r0, r1, a, b in pairs():
        e1, e2 = _block_errors(a, b, left[r0:r1], right, load)
        fac.append(float(e1))
        merged.append(float(e2))
    return math.fsum(fac), math.fsum(merged)


# ---------------------------------------------------------------- one tensor


def _rank(s: np.ndarray, total: float, opts: ExtractOptions, cap: int) -> int:
    r = min(opts.rank, cap)
    if opts.energy is not None and total > 0:
        kept = np.cumsum(s.astype(np.float64) ** 2) / total
        r = min(r, int(np.searchsorted(kept, opts.energy - 1e-12)) + 1)
    return max(1, r)


def _svd(blocks: Callable[[], Iterator], f: Factorise, opts: ExtractOptions, cap: int):
    """``(U, S, Vt, how)``: exact for small tensors, through the Gram matrix up to ``gram_max`` elements,
    else randomized with the tensor's own key (:mod:`.svd`)."""
    from .. import prng

    m, n = f.ft.shape
    k = min(m, n, cap + (opts.oversample if opts.oversample is not None else max(8, cap)))
    if m * n <= opts.full_max or k >= min(m, n):
        return (*svd.full_svd(blocks), "exact")
    if m * n <= opts.gram_max:
        return (*svd.gram_svd(blocks, cap), "gram")
    key = prng.tensor_key_data(opts.seed, f.name, 0, "extract-lora")
    return (*svd.randomized_svd(blocks, n, k, key, opts.iters), "randomized")


def factorise(ft_ck: Checkpoint, base_ck: Checkpoint, f: Factorise, opts: ExtractOptions, load: str):
    """``(report, lora_A, lora_B)`` for one tensor (None factors: unchanged), factors as numpy in ``opts.dtype``.
    ``load``: the dtype PEFT merges into (the base's load dtype), for the report's ``merged_error``."""
    m, n = f.ft.shape
    pairs = _pair_blocks(ft_ck, base_ck, f, opts.block_elems)
    blocks = _delta_blocks(pairs)
    total = svd.frobenius_sq(blocks)
    if total == 0.0:
        return TensorReport(f.name, (m, n), "unchanged"), None, None
    cap = min(m, n, opts.rank)
    u, s, vt, how = _svd(blocks, f, opts, cap)
    s_host = np.asarray(s).astype(np.float64)
    r = _rank(s_host, total, opts, cap)
    root = jnp.sqrt(s[:r])
    d = NP[opts.dtype]  # ΔW ≈ left @ right, each rounded to the factors' dtype
    left = np.asarray((u[:, :r] * root[None, :]).astype(d))
    right = np.asarray((root[:, None] * vt[:r]).astype(d))
    fac, merged = _errors(pairs, jnp.asarray(left, jnp.float32), jnp.asarray(right, jnp.float32), load)
    report = TensorReport(f.name, (m, n), "lora", r, math.sqrt(max(fac, 0.0) / total),
                          min(float(np.sum(s_host[:r] ** 2) / total), 1.0), how, merged_error=math.sqrt(merged / total))
    # PEFT: W (+)= B @ A with A [r, in], B [out, r]; a Conv1D stores W as [in, out]: ΔWᵀ = B @ A
    a, b = (np.ascontiguousarray(left.T), np.ascontiguousarray(right.T)) if f.transposed else (right, left)
    return report, a, b


# ---------------------------------------------------------------- the adapter


def adapter_config(plan_lora: dict[str, int], saved_keys: list[str], base_ref: str, transposed: bool) -> dict:
    """``adapter_config.json``: ``r`` the largest rank, ``lora_alpha = r`` (scale 1), others by ``rank_pattern``."""
    r = max(plan_lora.values())
    pattern = {re.escape(m): k for m, k in sorted(plan_lora.items()) if k != r}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_ref,
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in plan_lora}),
        "modules_to_save": sorted(set(saved_keys)) or None, "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": transposed, "bias": "none", "lora_dropout": 0.0, "inference_mode": True,
    }


def _write_weights(staging: Path, ft_ck: Checkpoint, spilled: dict[str, tuple[str, Path]], plan: ExtractPlan,
                   block_elems: int) -> None:
    """``adapter_model.safetensors``: factors from the staging folder, saved tensors copied from the fine-tune."""
    specs = []
    def load(code: str, path: Path) -> np.ndarray:
        return np.ascontiguousarray(np.load(path)).view(NP[code])

    for key, (code, path) in spilled.items():
        specs.append(TensorSpec(key, code, tuple(np.load(path, mmap_mode="r").shape)))
    specs += [TensorSpec(PREFIX + s.name, s.ft.dtype, s.ft.shape) for s in plan.save]
    specs.sort(key=lambda s: s.name)
    head, offsets = encode_header(specs, {"format": "pt"})
    layout = ShardLayout(WEIGHTS, head, offsets, len(head) + sum(s.nbytes for s in specs))
    w = ShardedWriter(staging, [layout], specs, hash_files=False)
    try:
        for key, (code, path) in spilled.items():
            w.write(key, 0, load(code, path).reshape(-1))
            path.unlink()
        for s in plan.save:
            step = max(1, block_elems)
            for a in range(0, s.ft.numel, step):
                buf = np.empty(min(step, s.ft.numel - a), s.ft.np_dtype)
                ft_ck.file(s.ft).read_into(s.ft, a * s.ft.np_dtype.itemsize, buf.view(np.uint8))
                w.write(PREFIX + s.name, a, buf)
        w.finish(fsync=False)
    finally:
        w.abort()


# ---------------------------------------------------------------- the command


def _embedding_names(ft_conf: dict, base_conf: dict, ft: Checkpoint, base: Checkpoint, refs: list[str]) -> set[str]:
    """The architecture's vocabulary tensors (embeddings, output layer) of the pair."""
    from ..architecture import resolve_architecture

    arch = resolve_architecture([ft_conf, base_conf], [list(ft.tensors), list(base.tensors)], refs)
    return {n for w in (*arch.pre_weights, *arch.post_weights) if w.is_embed for n in (w.name, *w.aliases)}


def _refuse_inputs(out: Path, inputs: list[Path]) -> None:
    for inp in inputs:
        inp = inp.resolve()
        if out == inp or inp in out.parents or out in inp.parents:
            raise OutputError(f"{out}: refusing to write over input model {inp}")


def _spill(staging: Path, i: int, f: Factorise, a: np.ndarray, b: np.ndarray, code: str) -> dict:
    spilled = {}
    for part, arr in (("A", a), ("B", b)):
        path = staging / f".factor-{i}-{part}.npy"
        np.save(path, arr.view(np.uint16) if code == "BF16" else arr)  # npy has no bfloat16: its bits
        spilled[f"{PREFIX}{f.module}.lora_{part}.weight"] = (code, path)
    return spilled


def _factorise_all(ft_ck, base_ck, plan: ExtractPlan, opts: ExtractOptions, staging: Path, on_tensor, load: str):
    reports, ranks, spilled = [], {}, {}
    for i, f in enumerate(plan.factorise):
        rep, a, b = factorise(ft_ck, base_ck, f, opts, load)
        reports.append(rep)
        if a is not None:
            ranks[f.module] = rep.rank
            spilled.update(_spill(staging, i, f, a, b, opts.dtype))
        if on_tensor is not None:
            on_tensor(rep, i + 1, len(plan.factorise))
    reports += [TensorReport(s.name, s.ft.shape, "saved", note=f"modules_to_save: {s.key}") for s in plan.save]
    reports += [TensorReport(n, ck_shape, "left out", note=why) for n, why, ck_shape in
                ((n, why, ft_ck.tensors[n].shape) for n, why in plan.left_out)]
    return reports, ranks, spilled


def _stage_files(staging: Path, result: ExtractResult, cfg: dict, opts: ExtractOptions) -> None:
    report = {"options": {"rank": opts.rank, "rank_by_energy": opts.energy, "modules": list(opts.modules),
                          "dtype": opts.dtype, "seed": opts.seed, "iters": opts.iters, "full_max": opts.full_max,
                          "gram_max": opts.gram_max},
              "summary": result.summary(),
              "tensors": [{"name": t.name, "shape": list(t.shape), "kind": t.kind, "rank": t.rank, "error": t.error,
                           "merged_error": t.merged_error, "energy": t.energy, "svd": t.svd, "note": t.note}
                          for t in result.tensors]}
    for name, obj in (("adapter_config.json", cfg), (REPORT, report)):
        cm.write_bytes(staging / name, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))
    if opts.fsync:
        for name in (WEIGHTS, "adapter_config.json", REPORT):
            cm.fsync_file(staging / name)


def run_extract(finetuned: str, base: str, out: Path, opts: ExtractOptions,
                on_tensor: Callable[[TensorReport, int, int], None] | None = None, hub=None) -> ExtractResult:
    """Extract the LoRA of ``finetuned`` over ``base`` (model references) into ``out`` (see the module docstring).

    ``hub``: how models given by Hugging Face id may reach the Hub
    (:class:`~superswallow_jax.io.hub.HubAccess`; default: the cache, else a download)."""
    opts.check()
    ft_dir, base_dir = resolve_model_dir(finetuned, hub), resolve_model_dir(base, hub)
    out = Path(out).expanduser().resolve()
    _refuse_inputs(out, [ft_dir, base_dir])
    ft_conf, base_conf = read_model_config(ft_dir), read_model_config(base_dir)
    with Checkpoint(ft_dir) as ft_ck, Checkpoint(base_dir) as base_ck:
        embeds = _embedding_names(ft_conf, base_conf, ft_ck, base_ck, [finetuned, base])
        plan = plan_extraction(ft_ck, base_ck, ft_conf, embeds, opts.modules, opts.skip_embeddings)
        if not plan.factorise:
            raise ConfigError("nothing to factorise: no linear layer of the fine-tune matches --modules")
        if out.is_dir() and (out / WEIGHTS).exists() and not opts.force:
            raise OutputError(f"{out}: already holds an adapter; use --force to replace it")
        lock = cm.OutputLock(out)
        staging = cm.staging_path(out)
        try:
            cm.recover(out)
            cm.remove_tree(staging)
            staging.mkdir()
            load = load_dtype(base_conf, base_ck, f"model {base}")
            reports, ranks, spilled = _factorise_all(ft_ck, base_ck, plan, opts, staging, on_tensor, load)
            if not ranks:
                raise ConfigError(f"{finetuned} equals {base} in every tensor to factorise: no LoRA to extract")
            result = ExtractResult(out, reports)
            _write_weights(staging, ft_ck, spilled, plan, opts.block_elems)
            cfg = adapter_config(ranks, [s.key for s in plan.save], base, any(f.transposed for f in plan.factorise))
            _stage_files(staging, result, cfg, opts)
            with cm.blocked_signals():
                cm.commit(staging, out, fsync=opts.fsync)
            return result
        except BaseException:
            cm.recover(out)
            cm.remove_tree(staging)
            raise
        finally:
            lock.release()
