"""Stream a :class:`~superswallow_jax.plan.Plan`: read, merge, write (how).

Every tensor is processed as flat chunks of at most ``chunk_elems`` elements
(a multiple of :data:`~superswallow_jax.methods.sparsify.BLOCK`). A chunk
shorter than the compile bucket is zero-padded, so one XLA compile serves a
(method, source count, dtype) combination for all big tensors, and small
tensors share a few power-of-two buckets. All per-tensor values -- weights,
densities, keys, offsets -- are traced arguments.

Methods whose result depends on whole-tensor statistics run a first pass over
the chunks: DARE's L1 rescale (fixed 1024-element blocks summed in float64 and
combined with ``math.fsum``) and TIES's magnitude threshold (an exact
histogram of bit patterns). Results are therefore the same bytes for any
chunk size, device count or tensor order.

Chunk k+1 is dispatched before chunk k is written, so XLA computes while the
writer copies; consumed input pages are released with ``MADV_DONTNEED``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import prng
from .io.reader import DTYPES
from .io.writer import ShardedWriter
from .methods import gta as gta_m
from .methods import sparsify as sp
from .methods.linear import linear
from .methods.passthrough import passthrough
from .plan import Plan, Step

DEFAULT_CHUNK_ELEMS = 1 << 22  # 4M elements: 8 MB per bf16 input chunk
MIN_BUCKET = 1 << 10


def chunk_size(chunk_elems: int) -> int:
    """Round a requested chunk size to a positive multiple of the rescale block."""
    return max(sp.BLOCK, (int(chunk_elems) // sp.BLOCK) * sp.BLOCK)


def bucket_for(numel: int, chunk: int) -> int:
    """Compile bucket (padded length) for a tensor of ``numel`` elements."""
    if numel >= chunk:
        return chunk
    return max(MIN_BUCKET, 1 << max(0, (numel - 1).bit_length()))


# ------------------------------------------------------------------ kernels


@dataclass(frozen=True)
class KernelSig:
    """Static shape of a chunk kernel: one XLA program per distinct signature."""

    kind: str  # "linear" | "gta" | "passthrough" | "gta_stats"
    work: str
    out: str
    n: int  # bucket length
    n_inputs: int
    base: int | None
    sparsify: tuple[str | None, ...] = ()  # per donor
    consensus: str | None = None
    normalize: bool = False
    use_lambda: bool = False
    scaled: bool = False


def _sparsify_donors(sig: KernelSig, deltas, keys, ps, factors, thresholds, quotas, off_hi, off_lo):
    out = []
    for i, (kind, delta) in enumerate(zip(sig.sparsify, deltas)):
        if kind is None:
            out.append(delta)
            continue
        if kind == "random":
            keep = sp.random_keep(keys[i], off_hi, off_lo, sig.n, ps[i])
        else:
            keep = sp.magnitude_keep(delta, thresholds[i], quotas[i])
        out.append(sp.apply_keep(delta, keep, factors[i], work=_work_of(sig, kind), d=sig.work))
    return out


def _work_of(sig: KernelSig, kind: str | None) -> str:
    """mergekit's DARE works in bf16 for bf16 tensors and in f32 otherwise (on CPU)."""
    if kind == "random" and sig.work != "BF16":
        return "F32"
    return sig.work


@functools.lru_cache(maxsize=None)
def get_kernel(sig: KernelSig) -> Callable:
    """The jitted chunk function for ``sig`` (cached; compiled once per signature)."""
    out_dt = DTYPES[sig.out]

    if sig.kind == "passthrough":
        def run(xs, scale):
            return passthrough(xs[0], scale if sig.scaled else None, work=sig.work).astype(out_dt)
    elif sig.kind == "linear":
        def run(xs, weights):
            return linear(xs, weights, normalize=sig.normalize, work=sig.work).astype(out_dt)
    elif sig.kind == "gta":
        def run(xs, weights, keys, ps, factors, thresholds, quotas, lam, off_hi, off_lo):
            base = xs[sig.base]
            others = [x for i, x in enumerate(xs) if i != sig.base]
            b, deltas = gta_m.task_vectors(base, others, d=sig.work)
            deltas = _sparsify_donors(sig, deltas, keys, ps, factors, thresholds, quotas, off_hi, off_lo)
            return gta_m.combine(
                b, deltas, weights, lam if sig.use_lambda else None,
                d=sig.work, consensus=sig.consensus, normalize=sig.normalize,
            ).astype(out_dt)
    elif sig.kind == "gta_stats":
        # First pass: per donor, the task vector (for magnitude histograms) or
        # |delta| and |delta * keep| in the work dtype (for the L1 rescale).
        def run(xs, keys, ps, off_hi, off_lo):
            base = xs[sig.base]
            others = [x for i, x in enumerate(xs) if i != sig.base]
            _, deltas = gta_m.task_vectors(base, others, d=sig.work)
            res = []
            for i, (kind, delta) in enumerate(zip(sig.sparsify, deltas)):
                if kind == "random":
                    keep = sp.random_keep(keys[i], off_hi, off_lo, sig.n, ps[i])
                    a = jnp.abs(delta)
                    res.append((a, a * keep.astype(jnp.float32)))
                elif kind == "magnitude":
                    res.append((delta, delta))
                else:
                    res.append((jnp.zeros((1,), jnp.float32),) * 2)
            return res
    else:  # pragma: no cover
        raise ValueError(sig.kind)
    return jax.jit(run)


# ------------------------------------------------------------------ inputs


class InputFetcher:
    """Produces the input chunks of a step (zero-copy where possible)."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def _flat_view(self, step: Step, i: int) -> np.ndarray:
        src = step.sources[i]
        ckpt = self.plan.models[src.model].checkpoint
        return ckpt.file(src.tensor).view(src.tensor.name).reshape(-1)

    def chunk(self, step: Step, i: int, a: int, b: int) -> np.ndarray:
        """Elements [a, b) of source ``i`` of ``step``, flattened (dtype as stored)."""
        if not step.embed:
            return self._flat_view(step, i)[a:b]
        hidden = step.shape[1]
        r0, r1 = a // hidden, -(-b // hidden)
        views = [self.plan.models[s.model].checkpoint.file(s.tensor).view(s.tensor.name) for s in step.sources]
        read_rows = lambda j, ids: views[j][ids]  # noqa: E731  (source j's original rows; copies only those)
        rows = step.alignment.aligned_rows(i, r0, r1, read_rows, DTYPES[step.work_dtype], tensor=step.name)
        return np.ascontiguousarray(rows).reshape(-1)[a - r0 * hidden : b - r0 * hidden]

    def release(self, step: Step, a: int, b: int) -> None:
        if step.embed:
            return
        for src in step.sources:
            isz = src.tensor.np_dtype.itemsize
            self.plan.models[src.model].checkpoint.file(src.tensor).release(src.tensor, a * isz, b * isz)


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    if x.size == n:
        return x
    out = np.zeros(n, dtype=x.dtype)
    out[: x.size] = x
    return out


# ------------------------------------------------------------------ per-step arguments


def _donors(step: Step) -> list[int]:
    return [i for i in range(len(step.sources)) if i != step.base]


def _round(x: float, code: str) -> float:
    return sp.round_scalar(x, code)


@dataclass
class _GtaArgs:
    sig: KernelSig
    weights: np.ndarray
    keys: np.ndarray
    ps: np.ndarray
    factors: np.ndarray
    thresholds: np.ndarray
    tie_quota: list[int]
    tie_counts: list[dict[int, int]]  # per donor: chunk start -> ties in chunk
    lam: np.ndarray


def _gta_setup(plan: Plan, step: Step, seed: int, bucket: int) -> _GtaArgs:
    method = plan.method
    donors = _donors(step)
    kinds = []
    for i in donors:
        dens = step.sources[i].params.get("density", 1.0)
        kinds.append(method.sparsify if (method.sparsify and dens < 1.0) else None)
    lam = float(step.params.get("lambda", 1.0))
    sig = KernelSig(
        kind="gta", work=step.work_dtype, out=step.out_dtype, n=bucket, n_inputs=len(step.sources), base=step.base,
        sparsify=tuple(kinds), consensus=method.consensus, normalize=bool(step.params.get("normalize")),
        use_lambda=lam != 1.0,
    )
    k = len(donors)
    weights = np.array([_round(step.sources[i].params["weight"], step.work_dtype) for i in donors], np.float32)
    keys = np.stack([prng.tensor_key_data(seed, step.name, step.sources[i].model) for i in donors]) if k else np.zeros((0, 2), np.uint32)
    ps = np.array(
        [_round(step.sources[i].params.get("density", 1.0), _work_of(sig, "random")) for i in donors], np.float32
    )
    return _GtaArgs(
        sig, weights, keys.astype(np.uint32), ps, np.ones(k, np.float32), np.zeros(k, np.float32),
        [0] * k, [{} for _ in range(k)], np.float32(lam),
    )


def _chunks(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    for a in range(0, numel, chunk):
        yield a, min(numel, a + chunk)


def _stats_pass(plan: Plan, step: Step, args: _GtaArgs, fetch: InputFetcher, chunk: int) -> None:
    """Fill rescale factors and magnitude thresholds from whole-tensor statistics."""
    sig = args.sig
    rescale = bool(step.params.get("rescale"))
    need = [kind == "magnitude" or (kind == "random" and rescale) for kind in sig.sparsify]
    if not any(need):
        return
    stats_sig = KernelSig(
        kind="gta_stats", work=sig.work, out=sig.out, n=sig.n, n_inputs=sig.n_inputs, base=sig.base,
        sparsify=tuple(k if nd else None for k, nd in zip(sig.sparsify, need)),
    )
    kern = get_kernel(stats_sig)
    donors = _donors(step)
    numel = step.numel
    l1_full: list[list[float]] = [[] for _ in donors]
    l1_kept: list[list[float]] = [[] for _ in donors]
    hists: list[list[tuple[int, np.ndarray]]] = [[] for _ in donors]
    mag_work = sig.work
    for a, b in _chunks(numel, chunk):
        xs = [_pad(fetch.chunk(step, i, a, b), sig.n) for i in range(len(step.sources))]
        hi, lo = prng.split_offset(a)
        res = kern(xs, args.keys, args.ps, hi, lo)
        for j, kind in enumerate(stats_sig.sparsify):
            if kind == "random":
                full, kept = (np.asarray(r)[: b - a] for r in res[j])
                l1_full[j] += sp.block_l1(full)
                l1_kept[j] += sp.block_l1(kept)
            elif kind == "magnitude":
                bits = sp.abs_bits(np.asarray(res[j][0])[: b - a], mag_work)
                hists[j].append((a, bits))
        fetch.release(step, a, b)
    for j, kind in enumerate(stats_sig.sparsify):
        if kind == "random":
            args.factors[j] = sp.rescale_factor(sp.total(l1_full[j]), sp.total(l1_kept[j]), _work_of(sig, "random"))
        elif kind == "magnitude":
            _magnitude_from_bits(step, args, j, hists[j], mag_work, rescale)


def _magnitude_from_bits(step: Step, args: _GtaArgs, j: int, chunks: list[tuple[int, np.ndarray]], work: str, rescale: bool) -> None:
    """Exact k-th largest |delta| (radix select on bit patterns) and per-chunk tie counts."""
    dens = step.sources[_donors(step)[j]].params.get("density", 1.0)
    k = sp.magnitude_k(dens, step.numel)
    if work == "F32":
        hist_hi = sum(np.bincount((bits >> 16).astype(np.int64), minlength=1 << 15) for _, bits in chunks)
        hb, above_hi = sp.magnitude_threshold(np.asarray(hist_hi), k)
        lows = [(a, bits[(bits >> 16) == hb] & 0xFFFF) for a, bits in chunks]
        hist_lo = sum(np.bincount(low.astype(np.int64), minlength=1 << 16) for _, low in lows)
        lb, above_lo = sp.magnitude_threshold(np.asarray(hist_lo), k - above_hi)
        tbits = (hb << 16) | lb
        above = above_hi + above_lo
    else:
        hist = sum(np.bincount(bits.astype(np.int64), minlength=1 << 15) for _, bits in chunks)
        tbits, above = sp.magnitude_threshold(np.asarray(hist), k)
    if k <= 0:
        args.thresholds[j] = np.float32(np.inf)
        args.tie_quota[j] = 0
    else:
        args.thresholds[j] = sp.bits_to_value(int(tbits), work)
        args.tie_quota[j] = k - above
    args.tie_counts[j] = {a: int(np.count_nonzero(bits == tbits)) for a, bits in chunks}
    if rescale:
        # L1 rescale for magnitude pruning: exact from the bit patterns.
        full: list[float] = []
        kept: list[float] = []
        seen = 0
        for a, bits in chunks:
            vals = _bits_values(bits, work)
            keep = bits > tbits
            tie = bits == tbits
            allowed = max(0, args.tie_quota[j] - seen)
            idx = np.flatnonzero(tie)[:allowed]
            keep[idx] = True
            seen += int(tie.sum())
            full += sp.block_l1(vals)
            kept += sp.block_l1(vals * keep)
        args.factors[j] = sp.rescale_factor(sp.total(full), sp.total(kept), work)


def _bits_values(bits: np.ndarray, work: str) -> np.ndarray:
    if work == "F32":
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    return bits.astype(np.uint16).view(DTYPES[work]).astype(np.float64)


# ------------------------------------------------------------------ driver


@dataclass(frozen=True)
class ExecOptions:
    seed: int = 0
    chunk_elems: int = DEFAULT_CHUNK_ELEMS


def execute(plan: Plan, writer: ShardedWriter, opts: ExecOptions, progress: Callable[[int], None] | None = None,
            order: Sequence[int] | None = None) -> None:
    """Run every step of ``plan`` (in ``order`` if given) into ``writer``.

    ``progress(n)`` is called with the number of input bytes consumed.
    """
    for _ in iter_results(plan, opts, progress, order, sink=writer.write):
        pass


def iter_results(plan: Plan, opts: ExecOptions, progress: Callable[[int], None] | None = None,
                 order: Sequence[int] | None = None, sink: Callable[[str, int, np.ndarray], None] | None = None) -> Iterator[Step]:
    """Stream the plan, passing each output chunk to ``sink(name, flat_offset, array)``.

    Yields each step once all its chunks went to ``sink``.
    """
    chunk = chunk_size(opts.chunk_elems)
    fetch = InputFetcher(plan)
    pending: list[tuple[str, int, int, object]] = []  # dispatched, not yet written

    def flush(keep: int) -> None:
        while len(pending) > keep:
            name, a, b, res = pending.pop(0)
            arr = np.asarray(res)[: b - a]
            if sink is not None:
                sink(name, a, arr)

    steps = plan.steps if order is None else [plan.steps[i] for i in order]
    for step in steps:
        numel = step.numel
        bucket = bucket_for(numel, chunk)
        kind = plan.method.kind
        if kind == "gta":
            gargs = _gta_setup(plan, step, opts.seed, bucket)
            if len(gargs.weights) == 0:  # base only: copy it
                kind = "passthrough_base"
            else:
                _stats_pass(plan, step, gargs, fetch, chunk)
        seen_ties = [0] * (len(_donors(step)) if plan.method.kind == "gta" else 0)
        for a, b in _chunks(numel, chunk):
            xs = [_pad(fetch.chunk(step, i, a, b), bucket) for i in range(len(step.sources))]
            if kind == "gta":
                quotas = np.zeros(len(seen_ties), np.int32)
                for j in range(len(seen_ties)):
                    quotas[j] = np.int32(min(max(0, gargs.tie_quota[j] - seen_ties[j]), 2**31 - 1))
                    seen_ties[j] += gargs.tie_counts[j].get(a, 0)
                hi, lo = prng.split_offset(a)
                res = get_kernel(gargs.sig)(
                    xs, gargs.weights, gargs.keys, gargs.ps, gargs.factors, gargs.thresholds, quotas, gargs.lam, hi, lo
                )
            elif kind == "linear":
                sig = KernelSig("linear", step.work_dtype, step.out_dtype, bucket, len(xs), None,
                                normalize=bool(step.params.get("normalize")))
                w = np.array([step.sources[i].params["weight"] for i in range(len(xs))], np.float32)
                res = get_kernel(sig)(xs, w)
            elif kind == "passthrough_base":
                sig = KernelSig("passthrough", step.work_dtype, step.out_dtype, bucket, 1, None)
                res = get_kernel(sig)([xs[step.base]], np.float32(1.0))
            else:  # passthrough
                scale = step.sources[0].params.get("scale")
                sig = KernelSig("passthrough", step.work_dtype, step.out_dtype, bucket, 1, None, scaled=scale is not None)
                res = get_kernel(sig)(xs, np.float32(1.0 if scale is None else scale))
            pending.append((step.name, a, b, res))
            flush(1)
            fetch.release(step, a, b)
            if progress is not None:
                progress(sum(s.tensor.np_dtype.itemsize for s in step.sources) * (b - a))
        flush(0)
        yield step
    flush(0)
