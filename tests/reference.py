"""Op-by-op NumPy references of mergekit 0.1.5's arithmetic (torch semantics).

Every op on a dtype-``d`` tensor is computed in float32 and rounded to ``d``;
NumPy never forms FMAs, so this is an independent check of the JAX kernels.
"""

import ml_dtypes
import numpy as np

D = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32)}


def rnd(x, code):
    return np.asarray(x, np.float32).astype(D[code]).astype(np.float32)


def tsum(terms):
    acc = np.zeros_like(terms[0], dtype=np.float32)  # torch starts from +0.0
    for t in terms:
        acc = acc + t
    return acc


def gta(base, xs, weights, *, d, consensus, normalize, lam=1.0, masks=None, factors=None):
    """mergekit GTA on float arrays; ``masks`` (0/1) and ``factors`` optional per donor."""
    b = rnd(base, d)
    deltas = [rnd(rnd(x, d) - b, d) for x in xs]
    if masks is not None:
        deltas = [rnd(rnd(dl * m.astype(np.float32), d) * np.float32(f), d) for dl, m, f in zip(deltas, masks, factors)]
    w = [np.float32(rnd(np.float32(x), d)) for x in weights]
    big = [rnd(wi * dl, d) for wi, dl in zip(w, deltas)]
    if consensus == "sum":
        s = rnd(tsum(big), d)
        sign = np.where(s >= 0, 1.0, -1.0).astype(np.float32)
        ms = [(np.sign(t) == sign).astype(np.float32) for t in big]
        m = rnd(tsum([t * mk for t, mk in zip(big, ms)]), d)
        den = rnd(tsum([wi * mk for wi, mk in zip(w, ms)]), d)
        den = np.where(den == 0, np.float32(1), den)
    else:
        m = rnd(tsum(big), d)
        den = np.float32(rnd(np.float32(sum(np.float32(x) for x in w)), d))
        den = np.float32(1) if abs(den) < 1e-8 else den
    if normalize:
        m = rnd(m / den, d)
    if lam != 1.0:
        m = rnd(m * np.float32(lam), d)
    return rnd(b + m, d).astype(D[d])


def fma(x, c, acc):
    """Correctly rounded float32 x * c + acc via float64 round-to-odd (53 >= 24 + 2 bits)."""
    p = x.astype(np.float64) * np.float64(c)  # exact: 24 + 24 bits
    a = np.asarray(acc, np.float64)
    s = p + a
    bb = s - p
    e = (p - (s - bb)) + (a - bb)
    bits = s.view(np.uint64).copy()
    fix = (e != 0) & ((bits & 1) == 0)
    up = (e > 0) == (s > 0)
    bits[fix & up] += 1
    bits[fix & ~up] -= 1
    return bits.view(np.float64).astype(np.float32)


def linear(xs, weights, *, d, normalize):
    w = np.asarray(weights, np.float32)
    acc = np.zeros_like(xs[0], dtype=np.float32)
    for i, x in enumerate(xs):
        acc = fma(rnd(x, d), w[i], acc)
    if normalize:
        acc = acc / tsum([w[i] for i in range(len(xs))])
    return acc.astype(D[d])
