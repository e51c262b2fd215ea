"""Chunk programs for the geometric methods: slerp, nuslerp, multislerp, karcher,
model_stock, nearswap and arcee_fusion.

Each method reduces vectors of a tensor (the flattened tensor, its rows or its
columns) to a few scalars, then applies them elementwise. ``prepare`` runs the
statistics passes -- each a full pass over the chunks, recomputing what it
needs from the inputs, so no tensor is ever held whole -- and the scalars are
derived on the host with torch's op sequence (:mod:`..host.scalar`). The
sums are chunk-invariant float64 sums (:mod:`..host.vecsum`), so the output
bytes do not depend on the chunk size. A step with a single source (an
optional tensor that only one model has) is copied, as mergekit does.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import prng
from ..errors import PlanError
from ..dtypes import NP
from ..methods import arcee_fusion as af
from ..methods import gta as gta_m
from ..methods import karcher as kc
from ..methods import model_stock as ms
from ..methods import slerp as sl
from ..methods.nearswap import nearswap
from ..methods.numerics import as_f32, cast_out, divide, rounder
from ..host.scalar import clamp, f32fn, fma32, norm, rnd, rnd_array, seq_sum32, sqrt32
from ..host.vecsum import LaneSumSq, Layout, VectorMax, VectorSums
from ..plan import Step
from ..stream import StepContext
from .basic import passthrough_program
from . import kernel_cache

#: mergekit's slerp reduces in parts of 2^20 elements (per output of its batch of one).
SLERP_PART = 1 << 20

F64 = np.float64
F32 = np.float32


# ---------------------------------------------------------------- helpers


def _each_chunk(ctx: StepContext, dispatch: Callable[[int, int, list], object],
                consume: Callable[[int, int, object], None]) -> None:
    """:meth:`StepContext.each_chunk` with the chunk's placed inputs handed to ``dispatch``."""
    ctx.each_chunk(lambda a, b: dispatch(a, b, ctx.inputs(a, b)), consume)


def _host(x, n: int) -> np.ndarray:
    """The first ``n`` values of a device array, as float64."""
    return np.asarray(x)[:n].astype(F64)


def _sq(x, n: int) -> np.ndarray:
    v = _host(x, n)
    return v * v  # exact: float32 values have 24-bit significands


def _per(lay: Layout, values: np.ndarray, a: int, b: int, n: int):
    """Per-vector float32 ``values`` for elements [a, b): a scalar (flat) or a padded array."""
    if lay.kind == "flat":
        return F32(np.asarray(values, F32).reshape(-1)[0])
    return lay.expand(values, a, b, n)


def _pers(lay: Layout, values: Sequence[np.ndarray], a: int, b: int, n: int) -> list:
    """:func:`_per` for several per-vector arrays."""
    if lay.kind == "flat":
        return [_per(lay, v, a, b, n) for v in values]
    return [lay.expand(v, a, b, n) for v in values]


def _fn(f: Callable, x: np.ndarray, code: str) -> np.ndarray:
    """Elementwise ``f`` (a NumPy ufunc) evaluated in float64, rounded to float32 then to ``code``."""
    return rnd_array(f(np.asarray(x, F32).astype(F64)).astype(F32), code)


def _norms(ss: np.ndarray, code: str) -> np.ndarray:
    """torch.norm from exact sums of squares: sqrtf(f32(ss)) rounded to ``code`` (arrays)."""
    return rnd_array(np.sqrt(ss.astype(F32)), code)


class _NormSums:
    """Sums of squares for ``torch.norm`` of ``work``-dtype vectors.

    A flat tensor follows torch's own float32 lane order (:class:`LaneSumSq`);
    rows and columns, whose norms torch rounds to ``work`` anyway, use float64
    sums (:class:`VectorSums`).
    """

    def __init__(self, step: Step, lay: Layout, k: int, work: str):
        self.lane = LaneSumSq(step.numel, k, block=8 if work == "F32" else 16) if lay.kind == "flat" else None
        self.f64 = None if self.lane is not None else VectorSums(lay, k)

    def add(self, a: int, b: int, values) -> None:
        if self.lane is not None:
            self.lane.add(a, b, values)
        else:
            self.f64.add(a, b, [_sq(v, b - a) for v in values])

    def sums(self) -> np.ndarray:
        """[k, vectors] sums of squares."""
        return self.lane.sums() if self.lane is not None else self.f64.totals()


def _cast(out: str):
    return lambda y: cast_out(y, NP[out])


@kernel_cache
def _rounded(work: str) -> Callable:
    """xs -> [rnd_work(x)] (the inputs cast to the working dtype)."""
    rnd_ = rounder(work)
    return jax.jit(lambda xs: [rnd_(as_f32(x)) for x in xs])


def _single(ctx: StepContext):
    return passthrough_program(ctx, 0) if len(ctx.step.sources) == 1 else None


# ---------------------------------------------------------------- slerp


@kernel_cache
def _slerp_kernels(work: str, out: str, i0: int, i1: int):
    dot = jax.jit(lambda xs, n0, n1: sl.slerp_dot_terms(xs[i0], xs[i1], n0, n1, work=work))
    res = jax.jit(lambda xs, c0, c1: _cast(out)(sl.slerp_out(xs[i0], xs[i1], c0, c1, work=work)))
    return dot, res


def slerp_norm(part_sum_sq: Sequence[float]) -> F32:
    """mergekit slerp's norm: the norm of the per-part float32 norms.

    torch reduces the (few) part norms with fused multiply-adds in order (its
    order for up to 3 parts, i.e. tensors up to 3 * 2^20 elements; beyond that
    it uses 4 and then 8 accumulators, so larger tensors may differ by an ulp).
    """
    s = F32(0.0)
    for ss in part_sum_sq:
        n = sqrt32(F32(ss))
        s = fma32(n, n, s)
    return sqrt32(s)


def slerp_coefficients(dot: F32, t: F32) -> tuple[F32, F32]:
    """(c0, c1) of slerp from the clamped float32 dot product of the unit vectors."""
    linear = abs(dot) > F32(0.9995)
    theta = f32fn(math.acos, F32(0.0) if linear else dot)
    sin_theta = f32fn(math.sin, theta)
    omt = F32(F32(1.0) - t)
    c0 = F32(f32fn(math.sin, F32(omt * theta)) / sin_theta)
    c1 = F32(f32fn(math.sin, F32(t * theta)) / sin_theta)
    return (omt, t) if linear else (c0, c1)


def prepare_slerp(ctx: StepContext):
    if (p := _single(ctx)) is not None:
        return p
    step = ctx.step
    work = step.work_dtype
    i0 = step.base
    i1 = step.donors[0]
    t = F32(step.params["t"])
    lay = Layout.flat(step.shape)
    rk = _rounded(work)
    dot_k, out_k = _slerp_kernels(work, step.out_dtype, i0, i1)

    sq = LaneSumSq(step.numel, 2, SLERP_PART)

    def pair(a, b, xs):
        r = rk(xs)
        return [r[i0], r[i1]]

    _each_chunk(ctx, pair, sq.add)
    parts = sq.sums()
    ns = []
    for j in range(2):
        n = slerp_norm(parts[j])
        ns.append(n if n > F32(1e-8) else F32(1.0))

    dots = VectorSums(lay, 1)
    _each_chunk(ctx, lambda a, b, xs: dot_k(xs, ns[0], ns[1]), lambda a, b, d: dots.add(a, b, [_host(d, b - a)]))
    dot = seq_sum32(F32(s) for s in dots.part_totals(SLERP_PART)[0])
    c0, c1 = slerp_coefficients(clamp(dot, -1.0, 1.0), t)
    return lambda xs, a, b: out_k(xs, c0, c1)


# ---------------------------------------------------------------- nuslerp


@kernel_cache
def _nuslerp_kernels(work: str, out: str, base: int | None, i0: int, i1: int):
    def tv(xs):
        b, (v0, v1) = gta_m.task_vectors(None if base is None else xs[base], [xs[i0], xs[i1]], d=work)
        return b, v0, v1

    def vecs(xs):
        _, v0, v1 = tv(xs)
        return v0, v1

    def dot(xs, n0, n1):
        _, v0, v1 = tv(xs)
        return sl.nuslerp_units_dot(v0, v1, n0, n1, work=work)

    def res(xs, col, s0, s1, st, t0, t1):
        b, v0, v1 = tv(xs)
        return _cast(out)(sl.nuslerp_out(b, v0, v1, col, s0, s1, st, t0, t1, work=work))

    return jax.jit(vecs), jax.jit(dot), jax.jit(res)


def nuslerp_t(w0: float, w1: float) -> float:
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def nuslerp_scalars(cos: np.ndarray, t: float, work: str):
    """Per-vector (colinear, s0, s1, sin_theta) from the clamped cosines (``work`` values)."""
    cos = np.asarray(cos, F32)
    colinear = rnd_array(F32(1.0) - rnd_array(cos * cos, work), work) <= rnd(1e-16, work)
    theta = _fn(np.arccos, np.where(colinear, F32(0.0), cos), work)
    sin_theta = _fn(np.sin, theta, work)
    s0 = _fn(np.sin, rnd_array(theta * F32(1.0 - t), work), work)
    s1 = _fn(np.sin, rnd_array(theta * F32(t), work), work)
    return colinear.astype(F32), s0, s1, sin_theta


def _vector_layout(step: Step, row_wise: bool, flatten: bool) -> Layout:
    if flatten:
        return Layout.flat(step.shape)
    return Layout.cols(step.shape) if row_wise else Layout.rows(step.shape)


def prepare_nuslerp(ctx: StepContext):
    if (p := _single(ctx)) is not None:
        return p
    step = ctx.step
    work, n = step.work_dtype, ctx.bucket
    i0, i1 = step.donors
    t = nuslerp_t(step.sources[i0].params["weight"], step.sources[i1].params["weight"])
    lay = _vector_layout(step, bool(step.params["nuslerp_row_wise"]), bool(step.params["nuslerp_flatten"]))
    vk, dk, ok = _nuslerp_kernels(work, step.out_dtype, step.base, i0, i1)

    sq = _NormSums(step, lay, 2, work)
    _each_chunk(ctx, lambda a, b, xs: vk(xs), sq.add)
    floor = rnd(1e-7, work)
    nrm = np.maximum(_norms(sq.sums(), work), floor)

    dots = VectorSums(lay, 1)
    _each_chunk(ctx, lambda a, b, xs: dk(xs, *_pers(lay, nrm, a, b, n)), lambda a, b, d: dots.add(a, b, [_host(d, b - a)]))
    cos = np.clip(rnd_array(dots.totals()[0], work), F32(-1.0), F32(1.0))
    col, s0, s1, st = nuslerp_scalars(cos, t, work)
    t0, t1 = F32(1.0 - t), F32(t)

    def run(xs, a, b):
        return ok(xs, *_pers(lay, (col, s0, s1, st), a, b, n), t0, t1)

    return run


# ---------------------------------------------------------------- multislerp


@kernel_cache
def _multislerp_kernels(work: str, out: str, base: int | None, nb: tuple[int, ...]):
    def tv(xs):
        return gta_m.task_vectors(None if base is None else xs[base], [xs[i] for i in nb], d=work)

    def units_mean(xs, nes, w):
        b, vs = tv(xs)
        us = sl.multislerp_units(vs, nes, work=work)
        return b, us, sl.multislerp_weighted_sum(us, w, work=work)

    def unit_mean(xs, nes, w, mn):
        b, us, m = units_mean(xs, nes, w)
        return b, us, rounder(work)(divide(m, mn))

    def vecs(xs):
        return tv(xs)[1]

    def mean(xs, nes, w):
        return units_mean(xs, nes, w)[2]

    def dots(xs, nes, w, mn):
        _, us, m = unit_mean(xs, nes, w, mn)
        return [rounder(work)(u * m) for u in us]

    def tangent(xs, nes, w, mn, d):
        _, us, m = unit_mean(xs, nes, w, mn)
        return sl.multislerp_tangent(us, m, d, w, work=work)

    def res(xs, nes, w, mn, d, c, s, avg):
        b, us, m = unit_mean(xs, nes, w, mn)
        tr = sl.multislerp_tangent(us, m, d, w, work=work)
        return _cast(out)(sl.multislerp_out(b, m, tr, c, s, avg, work=work))

    def linear(xs, w):
        b, vs = tv(xs)
        return _cast(out)(sl.multislerp_linear(b, vs[0], vs[1], w, work=work))

    return {k: jax.jit(f) for k, f in
            dict(vecs=vecs, mean=mean, dots=dots, tangent=tangent, res=res, linear=linear).items()}


def multislerp_weights(ws: Sequence[float], normalize: bool, work: str) -> np.ndarray:
    """``torch.tensor(ws, dtype=d)``, divided by its (float32-accumulated) sum when normalizing."""
    w = np.array([rnd(x, work) for x in ws], F32)
    if normalize:
        total = rnd(seq_sum32(w), work)
        w = rnd_array(w / total, work)
    return w


def prepare_multislerp(ctx: StepContext):
    step = ctx.step
    nb = step.donors
    if len(nb) == 1:  # mergekit returns the single model (not its task vector)
        return passthrough_program(ctx, nb[0])
    work = step.work_dtype
    eps = float(step.params["eps"])
    w = multislerp_weights([step.sources[i].params["weight"] for i in nb], bool(step.params["normalize_weights"]), work)
    k = _multislerp_kernels(work, step.out_dtype, step.base, nb)
    lay = Layout.flat(step.shape)

    sq = _NormSums(step, lay, len(nb), work)
    _each_chunk(ctx, lambda a, b, xs: k["vecs"](xs), sq.add)
    norms = _norms(sq.sums()[:, 0], work)
    eps_d = rnd(eps, work)
    nes = rnd_array(norms + eps_d, work)

    msq = _NormSums(step, lay, 1, work)
    _each_chunk(ctx, lambda a, b, xs: [k["mean"](xs, nes, w)], msq.add)
    mn = norm(msq.sums()[0, 0], work)
    if mn < eps:
        if len(nb) == 2:
            return lambda xs, a, b: k["linear"](xs, w)
        raise PlanError(
            f"tensor {step.name}: multislerp: the weighted sum of the input directions is zero "
            "(antipodal inputs with balancing weights); use different weights"
        )

    dsum = VectorSums(lay, len(nb))
    _each_chunk(ctx, lambda a, b, xs: k["dots"](xs, nes, w, mn), lambda a, b, ds: dsum.add(a, b, [_host(v, b - a) for v in ds]))
    dots = rnd_array(dsum.totals()[:, 0], work)

    tsq = _NormSums(step, lay, 1, work)
    _each_chunk(ctx, lambda a, b, xs: [k["tangent"](xs, nes, w, mn, dots)], tsq.add)
    tn = rnd(norm(tsq.sums()[0, 0], work) + eps_d, work)
    c = f32fn(math.cos, tn, work)
    s = rnd(f32fn(math.sin, tn, work) / tn, work)
    avg = rnd(seq_sum32(rnd_array(norms * w, work)), work)
    return lambda xs, a, b: k["res"](xs, nes, w, mn, dots, c, s, avg)


# ---------------------------------------------------------------- karcher


@kernel_cache
def _karcher_kernels(work: str, out: str, n: int):
    def mean_at(xs, c, h, steps):
        us = kc.units(xs, c["norms"], work=work)
        m = kc.initial_raw(us, c["valid"], c["alphas"], work=work)
        m0 = kc.initial_mean(us, m, c["m_norm"], c["first"], c["use_first"], work=work)
        return us, kc.replay(us, m0, h, steps, work=work)

    def raw(xs, c):
        us = kc.units(xs, c["norms"], work=work)
        return kc.initial_raw(us, c["valid"], c["alphas"], work=work)

    def mean(xs, c, h, steps):
        us, m = mean_at(xs, c, h, steps)
        return [m, *us]

    def tangent(xs, c, h, steps):
        us, m = mean_at(xs, c, h, steps)
        return kc.tangent(us, m, h.dots[steps], h.coefs[steps], h.active[steps], work=work)

    def new(xs, c, h, steps):
        us, m = mean_at(xs, c, h, steps)
        t = kc.tangent(us, m, h.dots[steps], h.coefs[steps], h.active[steps], work=work)
        return kc.step_raw(m, t, h.cos_t[steps], h.sin_t[steps], h.t_norm[steps], work=work)

    def res(xs, c, h, steps, scale):
        _, m = mean_at(xs, c, h, steps)
        return _cast(out)(kc.scale_out(m, scale, work=work))

    return {k: jax.jit(f) for k, f in dict(raw=raw, mean=mean, tangent=tangent, new=new, res=res).items()}


def prepare_karcher(ctx: StepContext):
    if (p := _single(ctx)) is not None:
        return p
    step = ctx.step
    work = step.work_dtype
    n = len(step.sources)
    max_iter = int(step.params["max_iter"])
    tol = float(step.params["tol"])
    k = _karcher_kernels(work, step.out_dtype, n)
    lay = Layout.flat(step.shape)
    rk = _rounded(work)

    def norms_of(kernel: Callable, k: int = 1) -> np.ndarray:
        """torch.linalg.vector_norm of the float32 vector(s) ``kernel(a, b, xs)`` returns."""
        acc = LaneSumSq(step.numel, k)
        _each_chunk(ctx, kernel, acc.add)
        return np.sqrt(acc.sums()[:, 0])

    norms = norms_of(lambda a, b, xs: rk(xs), n)
    alphas = [1.0 / n] * n
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        zero = jnp.zeros((ctx.bucket,), NP[step.out_dtype])
        return lambda xs, a, b: zero
    alpha_sum = sum(alphas[i] for i in valid)
    a_valid = np.zeros(n, F32)
    for i in valid:
        a_valid[i] = F32(alphas[i] / alpha_sum)
    c = {
        "norms": norms.astype(F32), "valid": np.array([i in valid for i in range(n)], F32), "alphas": a_valid,
        "m_norm": F32(1.0), "first": np.int32(valid[0]), "use_first": F32(0.0),
    }
    m_norm = norms_of(lambda a, b, xs: [k["raw"](xs, c)])[0]
    c["m_norm"] = F32(m_norm)
    c["use_first"] = F32(float(m_norm) < tol)

    rows = 1 << max(4, (max_iter - 1).bit_length())  # history rows: one compile for max_iter <= 16
    h = {f: np.zeros((rows, n), F32) for f in ("dots", "coefs", "active")}
    h.update({f: np.ones(rows, F32) for f in ("cos_t", "sin_t", "t_norm", "u_norm")})
    h["u_ok"] = np.zeros(rows, F32)
    steps = 0
    for j in range(max_iter):
        hist = kc.History(**h)
        dsum = VectorSums(lay, n)

        def dots_of(a, b, mean_units):
            m, *us = mean_units
            mv = _host(m, b - a)
            dsum.add(a, b, [mv * _host(u, b - a) for u in us])

        _each_chunk(ctx, lambda a, b, xs, hist=hist, j=j: k["mean"](xs, c, hist, np.int32(j)), dots_of)
        sums = dsum.totals()[:, 0]
        for i in valid:
            dot = clamp(rnd(sums[i], work), -1.0, 1.0)
            theta = f32fn(math.acos, dot, work)
            h["dots"][j, i] = dot
            if float(theta) < tol:
                continue
            h["active"][j, i] = 1.0
            h["coefs"][j, i] = rnd(rnd(theta / f32fn(math.sin, theta, work), work) * F32(alphas[i] / alpha_sum), work)
        hist = kc.History(**h)
        t_norm = F32(norms_of(lambda a, b, xs: [k["tangent"](xs, c, hist, np.int32(j))])[0])
        if float(t_norm) < tol:
            break
        h["t_norm"][j] = t_norm
        h["cos_t"][j] = f32fn(math.cos, t_norm, work)
        h["sin_t"][j] = f32fn(math.sin, t_norm, work)
        hist = kc.History(**h)
        u_norm = F32(norms_of(lambda a, b, xs: [k["new"](xs, c, hist, np.int32(j))])[0])
        h["u_norm"][j] = u_norm
        h["u_ok"][j] = F32(float(u_norm) > tol)
        steps = j + 1

    scale = F32(0.0)
    for i in range(n):
        scale = F32(scale + F32(F32(alphas[i]) * norms[i]))
    scale = rnd(scale, work)
    hist = kc.History(**h)
    return lambda xs, a, b: k["res"](xs, c, hist, np.int32(steps), scale)


# ---------------------------------------------------------------- model_stock


@kernel_cache
def _model_stock_kernels(work: str, out: str, base: int, nb: tuple[int, ...]):
    def stats(xs):
        offs = ms.offsets(xs[base], [xs[i] for i in nb], work=work)
        return offs, ms.pair_products(offs, work=work)

    def res(xs, t):
        return _cast(out)(ms.model_stock_out(xs[base], [xs[i] for i in nb], t, work=work))

    return jax.jit(stats), jax.jit(res)


def model_stock_t(sum_sq: np.ndarray, pair_sums: np.ndarray, work: str) -> np.ndarray:
    """Per-vector interpolation ratio t (``work`` values) from the offsets' exact statistics.

    sum_sq: [k, V] sums of squares of the offsets; pair_sums: float64[P, V]
    sums of rnd(o_i * o_j) for i < j in order.
    """
    k = sum_sq.shape[0]
    norms = _norms(sum_sq, work)
    floor = rnd(1e-6, work)
    cos = []
    p = 0
    for i in range(k):
        for j in range(i + 1, k):
            prod = np.maximum(rnd_array(norms[i] * norms[j], work), floor)
            cos.append(np.clip(rnd_array(rnd_array(pair_sums[p], work) / prod, work), F32(-1.0), F32(1.0)))
            p += 1
    acc = np.zeros_like(cos[0])
    for cv in cos:
        acc = (acc + cv).astype(F32)
    c = rnd_array(acc / F32(len(cos)), work)
    den = rnd_array(F32(1.0) + rnd_array(c * F32(k - 1), work), work)
    singular = np.abs(den) < rnd(1e-6, work)
    safe = np.where(singular, F32(1.0), den)
    return np.where(singular, F32(0.0), rnd_array(rnd_array(c * F32(k), work) / safe, work)).astype(F32)


def prepare_model_stock(ctx: StepContext):
    if (p := _single(ctx)) is not None:
        return p
    step = ctx.step
    work, n = step.work_dtype, ctx.bucket
    nb = step.donors
    lay = Layout.rows(step.shape) if step.params["filter_wise"] else Layout.flat(step.shape)
    sk, ok = _model_stock_kernels(work, step.out_dtype, step.base, nb)
    k = len(nb)
    sq = _NormSums(step, lay, k, work)
    dots = VectorSums(lay, k * (k - 1) // 2)

    def stats_of(a, b, offs_prods):
        offs, prods = offs_prods
        sq.add(a, b, offs)
        dots.add(a, b, [_host(p_, b - a) for p_ in prods])

    _each_chunk(ctx, lambda a, b, xs: sk(xs), stats_of)
    t = model_stock_t(sq.sums(), dots.totals(), work)
    return lambda xs, a, b: ok(xs, _per(lay, t, a, b, n))


# ---------------------------------------------------------------- nearswap


@kernel_cache
def _nearswap_kernel(work: str, out: str, base: int, other: int):
    return jax.jit(lambda xs, t, floor: _cast(out)(nearswap(xs[base], xs[other], t, floor, work=work)))


def prepare_nearswap(ctx: StepContext):
    if (p := _single(ctx)) is not None:
        return p
    step = ctx.step
    kern = _nearswap_kernel(step.work_dtype, step.out_dtype, step.base, step.donors[0])
    t = F32(step.params["t"])
    floor = rnd(1e-6, step.work_dtype)
    return lambda xs, a, b: kern(xs, t, floor)


# ---------------------------------------------------------------- arcee_fusion


@kernel_cache
def _fusion_kernels(work: str, out: str, base: int, other: int):
    def ab(xs):
        return af.inputs(xs[base], xs[other], work=work)

    def exps(xs, max_a, max_b):
        a, b = ab(xs)
        return af.exp_terms(a, max_a), af.exp_terms(b, max_b)

    def kl(xs, max_a, max_b, inv_a, inv_b, eps):
        a, b = ab(xs)
        return af.kl_terms(a, b, max_a, max_b, inv_a, inv_b, eps, work=work)

    def imp(xs, kl_row):
        a, b = ab(xs)
        return af.importance(a, b, kl_row, work=work)

    def res(xs, kl_row, thr):
        a, b = ab(xs)
        return _cast(out)(af.fuse(a, b, kl_row, thr, work=work))

    return {k: jax.jit(f) for k, f in dict(ab=ab, exps=exps, kl=kl, imp=imp, res=res).items()}


def sample_indices(key_data: np.ndarray, numel: int, size: int = af.SAMPLE_SIZE) -> np.ndarray:
    """``size`` flat indices drawn uniformly with replacement from [0, numel), sorted.

    Index s comes from draw s of the tensor's key stream: ``floor(bits * numel / 2^32)``.
    """
    assert numel < 2**32
    bits = np.asarray(prng.random_bits(key_data, 0, 0, size)).astype(np.uint64)
    return np.sort((bits * np.uint64(numel)) >> np.uint64(32)).astype(np.int64)


def quartile_threshold(values: np.ndarray, work: str) -> F32:
    """``median + 1.5 IQR`` of ``values`` (mergekit's index rule, ``work`` rounding)."""
    s = np.sort(np.asarray(values, F32))
    m = s.size
    q1, med, q3 = (s[int(F32(q) * F32(m - 1))] for q in af.QUANTILES)
    return rnd(med + rnd(rnd(q3 - q1, work) * F32(1.5), work), work)


def prepare_arcee_fusion(ctx: StepContext):
    if (p := _single(ctx)) is not None:
        return p
    step = ctx.step
    work, n = step.work_dtype, ctx.bucket
    base, other = step.base, step.donors[0]
    k = _fusion_kernels(work, step.out_dtype, base, other)
    lay = Layout.rows(step.shape)
    per = lambda v, a, b: _per(lay, v, a, b, n)  # noqa: E731
    pers = lambda vs, a, b: _pers(lay, vs, a, b, n)  # noqa: E731

    mx = VectorMax(lay, 2)
    _each_chunk(ctx, lambda a, b, xs: k["ab"](xs), lambda a, b, ab: mx.add(a, b, list(ab)))
    max_a, max_b = (m.astype(F32) for m in mx.totals())

    es = VectorSums(lay, 2)
    _each_chunk(ctx, lambda a, b, xs: k["exps"](xs, *pers((max_a, max_b), a, b)),
                lambda a, b, exps: es.add(a, b, [_host(e, b - a) for e in exps]))
    inv_a, inv_b = (F32(1.0) / s.astype(F32) for s in es.totals())
    eps = rnd(1e-8, work)

    kls = VectorSums(lay, 1)
    _each_chunk(ctx, lambda a, b, xs: k["kl"](xs, *pers((max_a, max_b, inv_a, inv_b), a, b), eps),
                lambda a, b, kl: kls.add(a, b, [_host(kl, b - a)]))
    kl_row = rnd_array(kls.totals()[0], work)

    numel = step.numel
    picked: list[np.ndarray] = []
    if numel > af.SAMPLE_SIZE:
        idx = sample_indices(ctx.tensor_key(other), numel)
    else:
        idx = None

    def pick(a, b, imp):
        v = np.asarray(imp)[: b - a]
        if idx is None:
            picked.append(v.copy())
        else:
            lo, hi = np.searchsorted(idx, [a, b])
            picked.append(v[idx[lo:hi] - a])

    _each_chunk(ctx, lambda a, b, xs: k["imp"](xs, per(kl_row, a, b)), pick)
    thr = quartile_threshold(np.concatenate(picked), work)
    return lambda xs, a, b: k["res"](xs, per(kl_row, a, b), thr)
