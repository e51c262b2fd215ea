"""Chunk programs for the task-arithmetic family (task_arithmetic, ties, dare_ties, dare_linear).

Per step: donors' weights (rounded to the working dtype), PRNG keys from
(seed, tensor name, model index), keep probabilities, and -- from a first pass
over the chunks when needed -- L1 rescale factors (DARE) and exact magnitude
thresholds with per-chunk tie quotas (TIES).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .. import prng
from ..io.reader import DTYPES
from ..methods import gta as gta_m
from ..methods import sparsify as sp
from ..plan import Step
from ..stream import StepContext
from . import register
from .basic import passthrough_program


@dataclass(frozen=True)
class KernelSig:
    """Static shape of a chunk kernel: one XLA program per distinct signature."""

    kind: str  # "gta" | "gta_stats"
    work: str
    out: str
    n: int  # bucket length
    n_inputs: int
    base: int | None
    sparsify: tuple[str | None, ...] = ()  # per donor
    consensus: str | None = None
    normalize: bool = False
    use_lambda: bool = False


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

    if sig.kind == "gta":
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


def _gta_setup(ctx: StepContext) -> _GtaArgs:
    step, method, seed, bucket = ctx.step, ctx.plan.method, ctx.seed, ctx.bucket
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


def _stats_pass(ctx: StepContext, args: _GtaArgs) -> None:
    """Fill rescale factors and magnitude thresholds from whole-tensor statistics."""
    step = ctx.step
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
    l1_full: list[list[float]] = [[] for _ in donors]
    l1_kept: list[list[float]] = [[] for _ in donors]
    hists: list[list[tuple[int, np.ndarray]]] = [[] for _ in donors]
    mag_work = sig.work
    for a, b in ctx.chunks():
        xs = ctx.inputs(a, b)
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
        ctx.release(a, b)
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


@register("gta")
def prepare_gta(ctx: StepContext):
    args = _gta_setup(ctx)
    if len(args.weights) == 0:  # only the base has this tensor: copy it
        return passthrough_program(ctx, ctx.step.base)
    _stats_pass(ctx, args)
    kern = get_kernel(args.sig)
    seen = [0] * len(args.weights)

    def run(xs, a, b):
        quotas = np.zeros(len(seen), np.int32)
        for j in range(len(seen)):
            quotas[j] = np.int32(min(max(0, args.tie_quota[j] - seen[j]), 2**31 - 1))
            seen[j] += args.tie_counts[j].get(a, 0)
        hi, lo = prng.split_offset(a)
        return kern(xs, args.weights, args.keys, args.ps, args.factors, args.thresholds, quotas, args.lam, hi, lo)

    return run
