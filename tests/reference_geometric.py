"""Whole-array NumPy references of mergekit 0.1.5's geometric methods.

Each follows the method's torch op sequence on a dtype-``d`` tensor (every
op in float32, rounded to ``d``; Python scalars as float32) on whole arrays.
The norm of a whole flattened tensor follows torch's 8-lane float32 order
(:func:`torch_norm32`); every other reduction is the correctly rounded
sum (``math.fsum``), the convention superswallow uses where torch's order
depends on its thread count. Angles use ``math`` in float64, rounded to
float32 then ``d``.
"""

import math

import ml_dtypes
import numpy as np

D = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32)}
F32 = np.float32


def R(x, d):
    return np.asarray(x, np.float32).astype(D[d]).astype(np.float32)


def S(x, d):
    """A scalar rounded to float32 then d."""
    return F32(R(F32(x), d))


def fsum32(v):
    """The correctly rounded float32 of the exact sum of ``v``."""
    return F32(math.fsum(np.asarray(v, np.float64).ravel()))


def vec_fsum(v2d):
    return np.array([fsum32(r) for r in v2d], np.float32)


def torch_norm32(v, block=8):
    """torch CPU's linalg.vector_norm of a flat float32 vector: 8 float32 lanes (element i in
    lane i % 8, adding rounded squares in order) over the first len - len % block elements,
    lanes summed left to right, then the tail (block 16: bf16/fp16 input loads)."""
    x = np.asarray(v, np.float32).ravel()
    lanes = [F32(0)] * 8
    main = x.size - x.size % block
    sq = x * x
    for lane in range(8):
        acc = F32(0)
        for q in sq[lane:main:8]:
            acc = F32(acc + q)
        lanes[lane] = acc
    t = lanes[0]
    for lane in lanes[1:]:
        t = F32(t + lane)
    for q in sq[main:]:
        t = F32(t + q)
    return np.sqrt(t)


def tnorm(v2d, d, flat=False):
    """torch.norm along the last axis of a dtype-d matrix: sqrtf(f32(sum of squares)) in d.

    ``flat``: one whole-tensor vector, summed in torch's lane order; else correctly rounded sums.
    """
    if flat:
        return R(np.array([torch_norm32(r, 8 if d == "F32" else 16) for r in v2d], np.float32), d)
    v = np.asarray(v2d, np.float64)
    return R(np.sqrt(vec_fsum(v * v)), d)


def fn(f, x, d):
    return S(f(float(F32(x))), d)


def vfn(f, x, d):
    return R(np.array([f(float(v)) for v in np.asarray(x, np.float32).ravel()], np.float64).astype(np.float32), d).reshape(np.shape(x))


def _vectors(x, mode):
    """2-D view: one row per vector (flat, rows of the last axis, or columns of axis 0)."""
    if mode == "flat" or x.ndim <= 1:
        return x.reshape(1, -1)
    if mode == "rows":
        return x.reshape(-1, x.shape[-1])
    return np.moveaxis(x, 0, -1).reshape(-1, x.shape[0])


def _unvectors(v, shape, mode):
    if mode == "flat" or len(shape) <= 1:
        return v.reshape(shape)
    if mode == "rows":
        return v.reshape(shape)
    moved = (*shape[1:], shape[0])
    return np.moveaxis(v.reshape(moved), -1, 0)


# ---------------------------------------------------------------- methods


def nearswap(a, b, t, d):
    a, b = R(a, d), R(b, d)
    dist = np.maximum(np.abs(R(a - b, d)), S(1e-6, d))
    with np.errstate(over="ignore"):  # 1 / 1e-6 overflows float16: inf, clamped to 1 (as in torch)
        w = np.clip(R(R(F32(1) / dist, d) * F32(t), d), 0, 1)
    return R(R(w * b, d) + R(R(1 - w, d) * a, d), d).astype(D[d])


def slerp(v0, v1, t, d):
    """Float32 slerp of whole tensors (one norm part: tensors below 2^20 elements)."""
    a = R(v0, d).ravel()
    b = R(v1, d).ravel()
    na, nb = torch_norm32(a), torch_norm32(b)
    na = na if na > F32(1e-8) else F32(1)
    nb = nb if nb > F32(1e-8) else F32(1)
    dot = fsum32((a / na) * (b / nb))
    dot = F32(min(max(dot, F32(-1)), F32(1)))
    t = F32(t)
    if abs(dot) > F32(0.9995):
        c0, c1 = F32(1) - t, t
    else:
        th = F32(math.acos(float(dot)))
        st = F32(math.sin(float(th)))
        c0 = F32(F32(math.sin(float(F32((F32(1) - t) * th)))) / st)
        c1 = F32(F32(math.sin(float(F32(t * th)))) / st)
    return R((c0 * a) + (c1 * b), d).reshape(np.shape(v0)).astype(D[d])


def nuslerp(x0, x1, w0, w1, d, base=None, flatten=True, row_wise=False):
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    mode = "flat" if flatten else ("cols" if row_wise else "rows")
    shape = np.shape(x0)
    v0, v1 = R(x0, d), R(x1, d)
    if base is not None:
        bb = R(base, d)
        v0, v1 = R(v0 - bb, d), R(v1 - bb, d)
    m0, m1 = _vectors(v0, mode), _vectors(v1, mode)
    n0 = np.maximum(tnorm(m0, d, mode == "flat" or x0.ndim <= 1), S(1e-7, d))[:, None]
    n1 = np.maximum(tnorm(m1, d, mode == "flat" or x0.ndim <= 1), S(1e-7, d))[:, None]
    cos = np.clip(R(vec_fsum(R(R(m0 / n0, d) * R(m1 / n1, d), d)), d), -1, 1)[:, None]
    col = R(1 - R(cos * cos, d), d) <= S(1e-16, d)
    th = vfn(math.acos, np.where(col, F32(0), cos), d)
    st = vfn(math.sin, th, d)
    s0 = vfn(math.sin, R(th * F32(1 - t), d), d)
    s1 = vfn(math.sin, R(th * F32(t), d), d)
    with np.errstate(divide="ignore", invalid="ignore"):
        sph = R(R(R(s0 * m0, d) + R(s1 * m1, d), d) / st, d)
    lin = R(R(m0 * F32(1 - t), d) + R(m1 * F32(t), d), d)
    r = _unvectors(np.where(col, lin, sph), shape, mode)
    if base is not None:
        r = R(R(base, d) + r, d)
    return r.astype(D[d])


def multislerp(xs, weights, d, base=None, normalize=True, eps=1e-8):
    if len(xs) == 1:
        return R(xs[0], d).astype(D[d])
    shape = np.shape(xs[0])
    ts = [R(x, d).ravel() for x in xs]
    if base is not None:
        b = R(base, d).ravel()
        ts = [R(t - b, d) for t in ts]
    w = np.array([S(x, d) for x in weights], np.float32)
    if normalize:
        tot = F32(0)
        for x in w:
            tot = F32(tot + x)
        w = R(w / R(tot, d), d)
    norms = np.array([tnorm(t[None], d, True)[0] for t in ts], np.float32)
    nes = R(norms + S(eps, d), d)
    us = [R(t / nes[i], d) for i, t in enumerate(ts)]

    def wsum(vs):
        acc = np.zeros_like(vs[0])
        for i, v in enumerate(vs):
            acc = (acc + R(v * w[i], d)).astype(np.float32)
        return R(acc, d)

    mean = wsum(us)
    mn = tnorm(mean[None], d, True)[0]
    assert not mn < eps
    mean = R(mean / mn, d)
    dots = [R(fsum32(R(u * mean, d)), d) for u in us]
    tangent = wsum([R(u - R(dots[i] * mean, d), d) for i, u in enumerate(us)])
    tn = R(tnorm(tangent[None], d, True)[0] + S(eps, d), d)
    c = fn(math.cos, tn, d)
    s = R(fn(math.sin, tn, d) / tn, d)
    avg = F32(0)
    for i in range(len(us)):
        avg = F32(avg + R(norms[i] * w[i], d))
    r = R(R(R(mean * c, d) + R(tangent * s, d), d) * R(avg, d), d)
    if base is not None:
        r = R(r + R(base, d).ravel(), d)
    return r.reshape(shape).astype(D[d])


def karcher(xs, d, max_iter=10, tol=1e-5):
    shape = np.shape(xs[0])
    n = len(xs)
    alphas = [1.0 / n] * n
    vs = [R(x, d).ravel() for x in xs]

    fnorm = torch_norm32

    norms = [fnorm(v) for v in vs]
    units = [np.zeros_like(v) if nm == 0 else R(v / nm, d) for v, nm in zip(vs, norms)]
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return np.zeros(shape, D[d])
    asum = sum(alphas[i] for i in valid)
    na = {i: alphas[i] / asum for i in valid}
    mean = np.zeros_like(units[0])
    for i in valid:
        mean = R(mean + R(units[i] * F32(na[i]), d), d)
    mnorm = fnorm(mean)
    mean = units[valid[0]].copy() if float(mnorm) < tol else R(mean / mnorm, d)
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for i in valid:
            dot = np.clip(S(math.fsum(mean.astype(np.float64) * units[i].astype(np.float64)), d), -1, 1)
            th = fn(math.acos, dot, d)
            if float(th) < tol:
                continue
            c = S(R(th / fn(math.sin, th, d), d) * F32(na[i]), d)
            tangent = R(tangent + R(c * R(units[i] - R(dot * mean, d), d), d), d)
        tn = fnorm(tangent)
        if float(tn) < tol:
            break
        new = R(R(fn(math.cos, tn, d) * mean, d) + R(fn(math.sin, tn, d) * R(tangent / tn, d), d), d)
        un = fnorm(new)
        mean = R(new / un, d) if float(un) > tol else new
    scale = F32(0)
    for i in range(n):
        scale = F32(scale + F32(F32(alphas[i]) * norms[i]))
    return R(S(scale, d) * mean, d).reshape(shape).astype(D[d])


def model_stock(base, xs, d, filter_wise=False):
    shape = np.shape(base)
    mode = "rows" if filter_wise else "flat"
    w0 = _vectors(R(base, d), mode)
    ws = [_vectors(R(x, d), mode) for x in xs]
    k = len(ws)
    offs = [R(w - w0, d) for w in ws]
    norms = [tnorm(o, d, mode == "flat" or np.ndim(base) <= 1) for o in offs]
    coss = []
    for i in range(k):
        for j in range(i + 1, k):
            prod = np.maximum(R(norms[i] * norms[j], d), S(1e-6, d))
            coss.append(np.clip(R(R(vec_fsum(R(offs[i] * offs[j], d)), d) / prod, d), -1, 1))
    acc = np.zeros_like(coss[0])
    for c_ in coss:
        acc = (acc + c_).astype(np.float32)
    c = R(acc / F32(len(coss)), d)
    den = R(1 + R(c * F32(k - 1), d), d)
    sing = np.abs(den) < S(1e-6, d)
    t = np.where(sing, F32(0), R(R(c * F32(k), d) / np.where(sing, F32(1), den), d))[:, None]
    s = ws[0] + F32(0)
    for w in ws[1:]:
        s = R(s + w, d)
    avg = R(s / F32(k), d)
    out = R(R(t * avg, d) + R(R(1 - t, d) * w0, d), d)
    return out.reshape(shape).astype(D[d])


def arcee_fusion(a, b, d, exp=None, log=None):
    """Without sampling (numel <= 10^6); ``exp``/``log``: float32 -> float32 elementwise."""
    exp = exp or (lambda x: np.exp(x.astype(np.float64)).astype(np.float32))
    log = log or (lambda x: np.log(x.astype(np.float64)).astype(np.float32))
    shape = np.shape(a)
    a2 = _vectors(R(a, d), "rows")
    b2 = _vectors(R(b, d), "rows")

    def softmax(x):
        e = exp((x - x.max(axis=1, keepdims=True)).astype(np.float32))
        inv = F32(1) / vec_fsum(e)[:, None]
        return R(R(e * inv, d) + S(1e-8, d), d)

    p, q = softmax(b2), softmax(a2)
    kl = R(vec_fsum(R(p * R(log(R(p / q, d)), d), d)), d)[:, None]
    diff = R(b2 - a2, d)
    imp = R(np.abs(diff) * kl, d)
    srt = np.sort(imp.ravel())
    q1, med, q3 = (srt[int(F32(q_) * F32(srt.size - 1))] for q_ in (0.25, 0.5, 0.75))
    thr = R(med + R(R(q3 - q1, d) * F32(1.5), d), d)
    out = a2 + diff * (imp >= thr).astype(np.float32)
    return out.reshape(shape).astype(np.float32)
