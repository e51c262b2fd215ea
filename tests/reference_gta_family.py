"""Op-by-op NumPy references for breadcrumbs, della, sce, ram and ramplus_tl (mergekit 0.1.5).

Written from mergekit's formulas with whole-tensor sorts (the kernels use
histograms and chunked passes instead). Magnitude ties follow superswallow's
rule: descending |x|, lowest flat index first (torch's sorts are unstable).
"""

import math
from fractions import Fraction

import numpy as np

from .reference import D, rnd, tsum


def desc_order(key):
    """Indices by descending key, lowest index first among equal keys."""
    return np.argsort(-np.asarray(key, np.float64), kind="stable")


def magnitude_outliers_mask(delta, density, gamma):
    """mergekit's magnitude_outliers mask: ascending sort, keep [n_bot, n_bot + T)."""
    n = delta.size
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    asc = desc_order(np.abs(delta))[::-1]
    m = np.zeros(n, np.float32)
    m[asc[n_bot : n_bot + target]] = 1
    return m


def l1_factor(delta, mask, work):
    """L1 rescale factor (exact sums rounded to ``work``), 1.0 below 1e-7."""
    a = rnd(np.float32(math.fsum(np.abs(delta.astype(np.float64)))), work)
    b = rnd(np.float32(math.fsum(np.abs((delta * mask).astype(np.float64)))), work)
    if a < 1e-7 or b < 1e-7:
        return np.float32(1.0)
    return np.float32(rnd(np.float32(a) / np.float32(b), work))


def della_probs(delta2d, density, epsilon, work):
    """Per-row rank probabilities, every torch op rounded to ``work``; scalar add rounds the scalar first.

    A 1-D tensor is one row (mergekit unsqueezes it); the result has the input's shape.
    """
    shape = delta2d.shape
    if delta2d.ndim == 1:
        delta2d = delta2d.reshape(1, -1)
    rows, cols = delta2d.shape
    ranks = np.zeros((rows, cols), np.float32)
    for r in range(rows):
        order = desc_order(np.abs(delta2d[r]))
        ranks[r, order] = cols - np.arange(cols)
    rk = rnd(ranks, work)
    mn = rk.min(axis=1, keepdims=True)
    mx = rk.max(axis=1, keepdims=True)
    rn = np.clip(rnd(rnd(rk - mn, work) / rnd(mx - mn, work), work), 0, 1)
    t = rnd(rnd(rn * np.float32(2), work) * np.float32(epsilon), work)
    return rnd(np.float32(rnd(np.float32(density - epsilon), work)) + t, work).reshape(shape)


def exact_variance(deltas, d):
    """Population variance per entry, exact (fractions), then float32, then ``d``."""
    k = len(deltas)
    out = np.zeros(deltas[0].size, np.float32)
    for j in range(deltas[0].size):
        xs = [Fraction(float(t[j])) for t in deltas]
        m = sum(xs) / k
        out[j] = np.float32(float(sum((x - m) ** 2 for x in xs) / k))
    return rnd(out, d)


def sce(base, xs, select_topk, d, var=None):
    """mergekit's sce on flat arrays; ``var`` (the per-entry variance in ``d``) may be given."""
    b = rnd(base, d)
    taus = [rnd(rnd(x, d) - b, d) for x in xs]
    n, k = b.size, len(taus)
    if select_topk < 1:
        if select_topk <= 0:
            mask = np.zeros(n, np.float32)
        else:
            if var is None:
                var = exact_variance(taus, d)
            kk = int(np.float32(np.count_nonzero(var)) * np.float32(select_topk))
            mask = np.zeros(n, np.float32)
            mask[desc_order(np.abs(var))[:kk]] = 1
        taus = [t * mask for t in taus]
    sq = [rnd(t * t, d) for t in taus]
    means = [np.float32(rnd(np.float32(np.float32(math.fsum(s.astype(np.float64))) / np.float32(n)), d)) for s in sq]
    ws = float(rnd(tsum(means), d))
    if abs(ws) < 1e-6:
        w = [np.float32(rnd(np.float32(1) / np.float32(k), d))] * k
    else:
        w = [np.float32(rnd(m / np.float32(ws), d)) for m in means]
    s = rnd(tsum(taus), d)
    sign = np.where(s >= 0, 1.0, -1.0).astype(np.float32)
    erase = [(np.sign(t) == sign).astype(np.float32) for t in taus]
    ew = [rnd(wi * e, d) for wi, e in zip(w, erase)]
    merged = rnd(tsum([rnd(t * e, d) for t, e in zip(taus, ew)]), d)
    den = np.maximum(rnd(tsum(ew), d), np.float32(rnd(np.float32(1e-6), d)))
    return rnd(b + rnd(merged / den, d), d).astype(D[d])


def _ram_parts(base, xs, eps, d):
    b = rnd(base, d)
    taus = [rnd(rnd(x, d) - b, d) for x in xs]
    e = np.float32(rnd(np.float32(eps), d))
    active = [np.abs(t) > e for t in taus]
    c = np.sum(active, axis=0)
    z = [t * a for t, a in zip(taus, active)]
    uniq = (c == 1).astype(np.float32)
    over = (c > 1).astype(np.float32)
    o = [rnd(rnd(zi * over, d) / np.maximum(c, 1).astype(np.float32), d) for zi in z]
    u = [zi * uniq for zi in z]
    return b, active, c, u, o


def ram(base, xs, eps, d):
    b, _, _, u, o = _ram_parts(base, xs, eps, d)
    return rnd(b + rnd(tsum([rnd(ui + oi, d) for ui, oi in zip(u, o)]), d), d).astype(D[d])


def ramplus(base, xs, eps, r, alpha, d):
    """float32 result."""
    b, active, c, u, o = _ram_parts(base, xs, eps, d)
    lam = []
    for a in active:
        shared = int(np.sum(a & (c > 1)))
        unique = int(np.sum(a & (c == 1)))
        rho = np.float32(shared) / max(np.float32(unique), np.float32(eps))
        rho = np.clip(np.float32(rho), np.float32(0), np.float32(alpha))
        lam.append(np.float32(np.float32(1) + np.float32(np.float32(r) * rho)))
    terms = [(ui * li).astype(np.float32) + oi for ui, li, oi in zip(u, lam, o)]
    return (b + tsum(terms)).astype(np.float32), lam
