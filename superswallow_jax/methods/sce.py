"""``sce`` (select, calculate, erase), as mergekit 0.1.5 computes it.

With ``rnd`` = rounding to the working dtype ``d`` after every op, base ``B``
and donors ``X_1..X_k`` (no per-model parameters):

    tau_i = rnd(X_i - B)
    0 < select_topk < 1:
        var   = per entry, population variance of tau_1..tau_k: Welford's
                recurrence in float64 (torch's CPU kernel), then float32, then d
        K     = int(f32(count_nonzero(var)) * f32(select_topk))
        keep  = the K entries of largest |var| (ties: lowest flat index first)
        tau_i = tau_i * keep
    select_topk <= 0:  every tau_i = tau_i * 0
    m_i   = rnd(f32(sum(rnd(tau_i^2))) / f32(N))             (whole-tensor mean)
    s     = rnd(m_1 + ... + m_k)
    w_i   = rnd(1 / k) if |s| < 1e-6 else rnd(m_i / s)
    S = rnd(sum_i tau_i);  e_i = [sign(tau_i) == (S >= 0 ? +1 : -1)]   (zeros never vote)
    W_i = rnd(w_i * e_i)
    out = rnd(B + rnd(rnd(sum_i rnd(tau_i * W_i)) / max(rnd(sum_i W_i), rnd(1e-6))))

Device side: :func:`combine` (pure, traceable). Host side: :func:`variance`
(float64 Welford -- XLA without x64 has no float64) and :func:`weights`.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from .numerics import divide, rounder, sum_f32
from ..dtypes import NP
from ..host.scalar import round_scalar


def squares(deltas: Sequence[jnp.ndarray], *, d: str) -> list[jnp.ndarray]:
    """rnd(tau_i^2) per donor (float32 holding dtype-``d`` values)."""
    rnd = rounder(d)
    return [rnd(t * t) for t in deltas]


def combine(
    b: jnp.ndarray,
    deltas: Sequence[jnp.ndarray],
    keep: jnp.ndarray | None,
    w: jnp.ndarray,
    floor: jnp.ndarray,
    *,
    d: str,
) -> jnp.ndarray:
    """Erase minority signs and add the weighted mean of the task vectors to ``b``.

    b, deltas: float32[n] (dtype-``d`` values); keep: bool[n] top-k selection or
    None (no selection); w: float32[k] SCE weights (rounded to ``d``); floor:
    float32 scalar rnd(1e-6). Returns float32[n] rounded to ``d``.
    """
    rnd = rounder(d)
    if keep is not None:
        kf = keep.astype(jnp.float32)
        deltas = [t * kf for t in deltas]  # exact; a dropped negative entry becomes -0.0
    s = rnd(sum_f32(deltas))
    pos = s >= 0
    erased = [rnd(w[i] * jnp.where(pos, t > 0, t < 0).astype(jnp.float32)) for i, t in enumerate(deltas)]
    merged = rnd(sum_f32([rnd(t * e) for t, e in zip(deltas, erased)]))
    den = jnp.maximum(rnd(sum_f32(erased)), floor)
    return rnd(b + rnd(divide(merged, den)))


def variance(deltas: Sequence[np.ndarray], d: str) -> np.ndarray:
    """Per-entry population variance over the donors, as torch.var(unbiased=False) on CPU.

    deltas: float32 arrays holding dtype-``d`` values. Returns float32 holding
    dtype-``d`` values: Welford's recurrence in float64, divided by k, then
    float64 -> float32 -> d.
    """
    shape = np.shape(deltas[0])
    mean = np.zeros(shape, np.float64)
    m2 = np.zeros(shape, np.float64)
    x = np.empty(shape, np.float64)
    delta = np.empty(shape, np.float64)
    step = np.empty(shape, np.float64)
    for n, t in enumerate(deltas, start=1):  # in place: the same roundings, no temporaries
        x[...] = t  # exact
        np.subtract(x, mean, out=delta)
        np.divide(delta, np.float64(n), out=step)
        np.add(mean, step, out=mean)
        np.subtract(x, mean, out=x)
        np.multiply(delta, x, out=x)
        np.add(m2, x, out=m2)
    np.divide(m2, np.float64(len(deltas)), out=m2)
    return m2.astype(np.float32).astype(NP[d]).astype(np.float32)


def topk_count(nonzero: int, select_topk: float) -> int:
    """mergekit's ``int(count_nonzero(var) * select_topk)``: a float32 product, truncated."""
    return int(np.float32(nonzero) * np.float32(select_topk))


def weights(square_sums: Sequence[float], numel: int, d: str) -> np.ndarray:
    """SCE weights from each donor's sum of rnd(tau^2) (float32[k], dtype-``d`` values).

    The float32 sum is the exact sum rounded to float32 (torch's cascade sum
    rounds the same for all but rare large tensors).
    """
    k = len(square_sums)
    n32 = np.float32(numel)
    means = [round_scalar(float(np.float32(np.float32(s) / n32)), d) for s in square_sums]
    acc = np.float32(0.0)
    for m in means:
        acc = np.float32(acc + np.float32(m))
    total = round_scalar(float(acc), d)
    if abs(total) < 1e-6:
        return np.full(k, round_scalar(float(np.float32(1.0) / np.float32(k)), d), np.float32)
    return np.array([round_scalar(float(np.float32(m) / np.float32(total)), d) for m in means], np.float32)
