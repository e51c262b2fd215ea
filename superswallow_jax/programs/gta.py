"""Chunk programs for the task-arithmetic family.

task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties,
della, della_linear. Per step: donors' weights (rounded to the working
dtype), PRNG keys from (seed, tensor name, model index), keep probabilities,
and -- from passes over the chunks when needed -- L1 rescale factors (DARE,
DELLA), exact magnitude thresholds with per-chunk tie quotas (TIES) and exact
kept ranges of the magnitude order (breadcrumbs, see :mod:`.select`).

DELLA ranks magnitudes within rows (the last axis of a 2-D tensor; a 1-D
tensor is one row). A chunk may start or end inside a row, so DELLA's mask
program reads the whole rows around each chunk (at most ``chunk + 2 * row``
elements per input) and computes the keep probabilities there. DARE and DELLA
masks come from programs of their own and are shared by the statistics and
merge passes through the step's cache (:mod:`..passcache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import prng
from ..errors import PlanError
from ..dtypes import NP
from ..methods import gta as gta_m
from ..methods import sparsify as sp
from ..host import scalar as hs
from ..host import histogram as hh
from ..host import blocks as hb
from ..methods.numerics import cast_out
from ..plan import Step
from ..stream import StepContext, pad
from .basic import passthrough_program
from .select import QuotaCursor, Selection, select_ranges
from . import kernel_cache, split_base


@dataclass(frozen=True)
class KernelSig:
    """Static shape of a chunk kernel: one XLA program per distinct signature."""

    kind: str  # "gta" | "gta_stats" | "della_mask"
    work: str
    out: str
    n: int  # bucket length
    n_inputs: int
    base: int | None
    sparsify: tuple[str | None, ...] = ()  # per donor: None, "random", "magnitude_outliers" (TIES, breadcrumbs), "della", "zero"
    consensus: str | None = None
    normalize: bool = False
    use_lambda: bool = False
    cols: int = 0  # della: row length
    row_len: int = 0  # della: padded length of the whole-row block around a chunk


class _Sparse(NamedTuple):
    """Per-donor sparsifier arguments of a chunk kernel (arrays of length ``k``; a pytree)."""

    keys: np.ndarray  # uint32[k, 2]: PRNG key data of donors that draw masks (random, della); zeros for the others
    ps: np.ndarray  # random: keep probability
    factors: np.ndarray  # L1 rescale factors
    thresholds: np.ndarray  # magnitude: threshold; magnitude_outliers: magnitude at the range start
    quotas: np.ndarray  # magnitude: tie quota; magnitude_outliers: ties at the start still to skip
    bottoms: np.ndarray  # magnitude_outliers: magnitude at the range end
    bquotas: np.ndarray  # magnitude_outliers: ties at the range end still allowed
    c0: np.ndarray  # della: rnd_work(density - epsilon)
    eps: np.ndarray  # della: float32(epsilon)


def _della_probs(sig: KernelSig, rows, c0, eps, row_off):
    """Per donor: della keep probabilities of the chunk's elements (``None`` for other donors)."""
    out: list = [None] * len(sig.sparsify)
    if "della" not in sig.sparsify:
        return out
    base, others = split_base(rows, sig.base)
    for i, kind in enumerate(sig.sparsify):
        if kind == "della":
            _, (dl,) = gta_m.task_vectors(base, [others[i]], d=sig.work)
            p = sp.della_probs(dl.reshape(-1, sig.cols), c0[i], eps[i], work=_work_of(sig, kind))
            out[i] = lax.dynamic_slice(p.reshape(-1), (row_off,), (sig.n,))
    return out


def _keep(sig: KernelSig, i: int, kind: str, delta, sa, masks):
    if kind in ("random", "della"):
        return masks[i]  # from _keep_masks: programs of their own
    return sp.range_keep(jnp.abs(delta), sa.thresholds[i], sa.quotas[i], sa.bottoms[i], sa.bquotas[i])


def _sparsify_donors(sig: KernelSig, deltas, sa: _Sparse, masks):
    out = []
    for i, (kind, delta) in enumerate(zip(sig.sparsify, deltas)):
        if kind is None:
            out.append(delta)
            continue
        if kind == "zero":  # della at density <= 0: zeros_like
            out.append(jnp.zeros_like(delta))
            continue
        keep = _keep(sig, i, kind, delta, sa, masks)
        out.append(sp.apply_keep(delta, keep, sa.factors[i], work=_work_of(sig, kind), d=sig.work))
    return out


def _work_of(sig: KernelSig, kind: str | None) -> str:
    """mergekit's DARE and DELLA work in bf16 for bf16 tensors and in f32 otherwise (on CPU)."""
    if kind in ("random", "della") and sig.work != "BF16":
        return "F32"
    return sig.work


@kernel_cache
def get_kernel(sig: KernelSig) -> Callable:
    """The jitted chunk function for ``sig`` (cached; compiled once per signature)."""
    out_dt = NP[sig.out]

    if sig.kind == "gta":
        def run(xs, weights, sa, lam, masks):
            base, others = split_base(xs, sig.base)
            b, deltas = gta_m.task_vectors(base, others, d=sig.work)
            deltas = _sparsify_donors(sig, deltas, sa, masks)
            return cast_out(gta_m.combine(
                b, deltas, weights, lam if sig.use_lambda else None,
                d=sig.work, consensus=sig.consensus, normalize=sig.normalize,
            ), out_dt)
    elif sig.kind == "gta_stats":
        # Statistics passes: per donor, the task vector (for magnitude
        # histograms) or the BLOCK sums of |delta| and |delta * keep| in the
        # work dtype (for the L1 rescale of random and della pruning).
        def run(xs, sa, masks):
            base, others = split_base(xs, sig.base)
            _, deltas = gta_m.task_vectors(base, others, d=sig.work)
            res = []
            for i, (kind, delta) in enumerate(zip(sig.sparsify, deltas)):
                if kind in ("random", "della"):
                    keep = _keep(sig, i, kind, delta, sa, masks)
                    a = jnp.abs(delta)
                    res.append((sp.block_sums(a), sp.block_sums(a * keep.astype(jnp.float32))))
                elif kind == "magnitude_outliers":
                    res.append((delta, delta))
                else:
                    res.append((jnp.zeros((1,), jnp.float32),) * 2)
            return res
    else:  # pragma: no cover
        raise ValueError(sig.kind)
    return jax.jit(run)


@kernel_cache
def _mask_kernel(n: int, sharding) -> Callable:
    """DARE keep mask of ``n`` elements, as its own XLA program, laid out like the chunk.

    Fused into the merge kernel, XLA:CPU computes threefry and the float ops
    together far slower than apart (measured in docs/performance.md). The
    bits of element i depend on i only, so the sharding does not change them.
    """
    return jax.jit(lambda key, hi, lo, p: sp.random_keep(key, hi, lo, n, p), out_shardings=sharding)


@kernel_cache
def _della_mask_kernel(sig: KernelSig, sharding) -> Callable:
    """DELLA keep masks of a chunk (one per della donor, ``None`` for the others), as their own XLA program.

    Inputs: every source's whole rows around the chunk (``sig.row_len``
    elements) and the chunk's offset in them. The per-row magnitude ranks are
    the costly part (sorts), so a statistics pass keeps these masks for the
    merge pass when the step's cache has room.
    """
    def run(rows, keys, c0, eps, hi, lo, row_off):
        probs = _della_probs(sig, rows, c0, eps, row_off)
        return tuple(sp.bernoulli_keep(keys[i], hi, lo, sig.n, probs[i]) if kind == "della" else None
                     for i, kind in enumerate(sig.sparsify))

    return jax.jit(run, out_shardings=sharding)


def _keep_masks(ctx: StepContext, sig: KernelSig, sa: _Sparse, a: int, b: int, final: bool) -> tuple:
    """Per donor: the keep mask of chunk [a, b) for random (DARE) and della pruning, else None.

    A statistics pass keeps the masks in the step's cache (when it has room)
    for the merge pass (``final``), which takes them instead of drawing (and,
    for della, ranking) again. The masks only depend on the chunk, so the
    statistics and merge programs share them.
    """
    kinds = sig.sparsify
    if not any(k in ("random", "della") for k in kinds):
        return tuple(None for _ in kinds)
    use = ctx.cache.take if final else ctx.cache.get
    sharding = ctx.placement.sharding_for(sig.n)
    hi, lo = prng.split_offset(a)
    out = [None] * len(kinds)
    della = tuple(i for i, k in enumerate(kinds) if k == "della")
    if della:
        def make_della():
            rows, row_off = _row_blocks(ctx, sig, a, b)
            msig = KernelSig(kind="della_mask", work=sig.work, out="", n=sig.n, n_inputs=sig.n_inputs, base=sig.base,
                             sparsify=tuple(k if k == "della" else None for k in kinds), cols=sig.cols,
                             row_len=sig.row_len)  # the same program for the statistics and merge passes
            return _della_mask_kernel(msig, sharding)(rows, sa.keys, sa.c0, sa.eps, hi, lo, row_off)

        dm = use(("della", a, della), make_della)
        for i in della:
            out[i] = dm[i]
    kern = _mask_kernel(sig.n, sharding)
    for i, kind in enumerate(kinds):
        if kind == "random":
            out[i] = use(("mask", i, a), lambda i=i: kern(sa.keys[i], hi, lo, sa.ps[i]))
    return tuple(out)


def _round(x: float, code: str) -> float:
    return hs.round_scalar(x, code)


@dataclass
class _GtaArgs:
    sig: KernelSig
    weights: np.ndarray
    sa: _Sparse
    selections: list[Selection | None]  # per donor (magnitude_outliers)
    lam: np.ndarray


def _della_cols(step: Step) -> int:
    if len(step.shape) > 2:
        raise PlanError(f"tensor {step.name}: della ranks rows of 1-D or 2-D tensors; shape {list(step.shape)} is not supported")
    return step.shape[-1] if len(step.shape) == 2 else max(1, step.numel)


def _donor_kind(ctx: StepContext, i: int) -> str | None:
    method, step = ctx.plan.method, ctx.step
    params = step.sources[i].params
    dens = params.get("density", 1.0)
    if not method.sparsify or dens >= 1.0:
        return None
    if method.sparsify == "magnitude":
        return "magnitude_outliers"  # TIES keeps positions [0, k) of the magnitude order
    if method.sparsify == "della" and dens <= 0:
        return "zero"  # (the density/epsilon range is checked at plan time: MethodSpec.validate)
    return method.sparsify


def _gta_setup(ctx: StepContext) -> _GtaArgs:
    step, method, bucket = ctx.step, ctx.plan.method, ctx.bucket
    donors = list(step.donors)
    kinds = [_donor_kind(ctx, i) for i in donors]
    lam = float(step.params.get("lambda", 1.0))
    cols = row_len = 0
    if "della" in kinds:
        cols = _della_cols(step)
        row_len = (-(-bucket // cols) + 1) * cols
    sig = KernelSig(
        kind="gta", work=step.work_dtype, out=step.out_dtype, n=bucket, n_inputs=len(step.sources), base=step.base,
        sparsify=tuple(kinds), consensus=method.consensus, normalize=bool(step.params.get("normalize")),
        use_lambda=lam != 1.0, cols=cols, row_len=row_len,
    )
    k = len(donors)
    weights = np.array([_round(step.sources[i].params["weight"], step.work_dtype) for i in donors], np.float32)
    keys = np.zeros((k, 2), np.uint32)
    for j, (i, kind) in enumerate(zip(donors, kinds)):
        if kind in ("random", "della"):  # the kinds that draw masks; the others never read their key
            keys[j] = ctx.tensor_key(i)
    rw = _work_of(sig, "random")  # = della's work dtype
    dens = [float(step.sources[i].params.get("density", 1.0)) for i in donors]
    eps = [float(step.sources[i].params.get("epsilon") or 0.0) for i in donors]
    ps = np.array([_round(p, rw) for p in dens], np.float32)
    c0 = np.array([_round(p - e, rw) for p, e in zip(dens, eps)], np.float32)  # torch rounds the scalar of `scalar + tensor`
    sa = _Sparse(
        keys.astype(np.uint32), ps, np.ones(k, np.float32), np.zeros(k, np.float32), np.zeros(k, np.int32),
        np.full(k, np.inf, np.float32), np.zeros(k, np.int32), c0, np.array(eps, np.float32),
    )
    return _GtaArgs(sig, weights, sa, [None] * k, np.float32(lam))


def _row_blocks(ctx: StepContext, sig: KernelSig, a: int, b: int) -> tuple[list[np.ndarray], np.int32]:
    """Every source's whole rows around elements [a, b), padded to ``sig.row_len``, and a's offset in them."""
    if not sig.cols:
        return [], np.int32(0)
    r0 = (a // sig.cols) * sig.cols
    r1 = min(ctx.step.numel, -(-b // sig.cols) * sig.cols)
    rows = [pad(ctx.fetch.chunk(ctx.step, i, r0, r1), sig.row_len) for i in range(len(ctx.step.sources))]
    return rows, np.int32(a - r0)


def _stats_kernel(ctx: StepContext, args: _GtaArgs, kinds: tuple[str | None, ...]):
    sig = args.sig
    stats_sig = KernelSig(
        kind="gta_stats", work=sig.work, out=sig.out, n=sig.n, n_inputs=sig.n_inputs, base=sig.base,
        sparsify=kinds, cols=sig.cols if "della" in kinds else 0, row_len=sig.row_len if "della" in kinds else 0,
    )
    kern = get_kernel(stats_sig)

    def run(a: int, b: int):
        masks = _keep_masks(ctx, stats_sig, args.sa, a, b, final=False)
        return kern(ctx.inputs(a, b), args.sa, masks)

    return run


def _stats_pass(ctx: StepContext, args: _GtaArgs) -> None:
    """Fill rescale factors, magnitude thresholds and kept ranges from whole-tensor statistics."""
    step = ctx.step
    sig = args.sig
    rescale = bool(step.params.get("rescale"))
    need = [kind in ("random", "della") and rescale for kind in sig.sparsify]
    if any(need):
        kern = _stats_kernel(ctx, args, tuple(k if nd else None for k, nd in zip(sig.sparsify, need)))
        donors = list(step.donors)
        l1_full: list[list[float]] = [[] for _ in donors]
        l1_kept: list[list[float]] = [[] for _ in donors]
        def collect(a: int, b: int, res) -> None:
            nb = -(-(b - a) // hb.BLOCK)
            for j in range(len(donors)):
                if need[j]:
                    l1_full[j] += np.asarray(res[j][0])[:nb].tolist()
                    l1_kept[j] += np.asarray(res[j][1])[:nb].tolist()

        ctx.each_chunk(kern, collect)
        for j, kind in enumerate(sig.sparsify):
            if not need[j]:
                continue
            args.sa.factors[j] = hb.rescale_factor(hb.total(l1_full[j]), hb.total(l1_kept[j]), _work_of(sig, kind))
    if "magnitude_outliers" in sig.sparsify:
        _outlier_ranges(ctx, args, rescale)


def _outlier_ranges(ctx: StepContext, args: _GtaArgs, rescale: bool) -> None:
    """TIES and breadcrumbs: the exact kept range of each donor's magnitude order (and its L1 rescale).

    TIES keeps positions [0, k); breadcrumbs a middle range (see ``host.histogram.outlier_range``).
    """
    step, sig = ctx.step, args.sig
    outl = tuple(k if k == "magnitude_outliers" else None for k in sig.sparsify)
    kern = _stats_kernel(ctx, args, outl)
    ranges = []
    for j, i in enumerate(list(step.donors)):
        p = step.sources[i].params
        if not outl[j]:
            ranges.append(None)
        elif ctx.plan.method.sparsify == "magnitude":
            ranges.append((0, hh.magnitude_k(p.get("density", 1.0), step.numel)))
        else:
            ranges.append(hh.outlier_range(p.get("density", 1.0), p.get("gamma", 0.01), step.numel))

    def compute_keys(a: int, b: int):
        res = kern(a, b)
        ctx.release(a, b)
        return [hh.abs_bits(np.asarray(r[0])[: b - a], sig.work) if outl[j] else None for j, r in enumerate(res)]

    # select_ranges asks for each chunk's keys in two or three passes: keep them while they fit.
    sels = select_ranges(ctx.chunks, lambda a, b: ctx.cache.get(("keys", a), lambda: compute_keys(a, b)), ranges,
                         sig.work, l1=rescale)
    ctx.cache.discard("keys")  # the merge pass does not use them
    for j, sel in enumerate(sels):
        if sel is None:
            continue
        args.selections[j] = sel
        args.sa.thresholds[j] = np.float32(sel.top)
        args.sa.bottoms[j] = np.float32(sel.bottom)
        if rescale:
            args.sa.factors[j] = hb.rescale_factor(sel.l1_full, sel.l1_kept, sig.work)


def prepare_gta(ctx: StepContext):
    args = _gta_setup(ctx)
    if len(args.weights) == 0:  # only the base has this tensor: copy it
        return passthrough_program(ctx, ctx.step.base)
    _stats_pass(ctx, args)
    kern = get_kernel(args.sig)
    cursors: list[QuotaCursor | None] = [sel.quotas() if sel is not None else None for sel in args.selections]
    sa = args.sa

    def run(xs, a, b):
        quotas = sa.quotas.copy()
        bquotas = sa.bquotas.copy()
        for j, cur in enumerate(cursors):
            if cur is not None:
                quotas[j], bquotas[j] = cur.next(a)
        return kern(xs, args.weights, sa._replace(quotas=quotas, bquotas=bquotas), args.lam,
                    _keep_masks(ctx, args.sig, sa, a, b, final=True))

    return run
