"""Generalized task arithmetic (task_arithmetic, ties, dare_ties, dare_linear), mergekit 0.1.5.

With ``rnd`` = rounding to the working dtype ``d`` after every op:

    B = rnd(base);   delta_i = rnd(rnd(X_i) - B)
    delta_i <- sparsify(delta_i)                         (see sparsify.py)
    Delta_i = rnd(w_i * delta_i)                          w_i already rounded to d
    sum consensus:  S = rnd(sum_i Delta_i);  sigma = S >= 0 ? +1 : -1
                    m_i = [sign(Delta_i) == sigma]        (zeros never vote)
                    M = rnd(sum_i Delta_i * m_i);  D = rnd(sum_i w_i * m_i);  D == 0 -> 1
    no consensus:   M = rnd(sum_i Delta_i);  D = rnd(sum_i w_i);  |D| < 1e-8 -> 1
    normalize:      M = rnd(M / D)
    lambda != 1:    M = rnd(M * lambda)                   lambda as float32
    out = rnd(B + M)
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from .numerics import divide, rounder, sum_f32, to_work


def task_vectors(base: jnp.ndarray | None, xs: Sequence[jnp.ndarray], *, d: str) -> tuple[jnp.ndarray | None, list[jnp.ndarray]]:
    """``(B, [rnd_d(X_i - B)])`` as float32 holding dtype-``d`` values, or ``(None, [X_i])`` without a base.

    Inputs: same shape, any float dtype; each is first rounded to ``d``
    (torch's load-time cast). Every method that works on task vectors uses this one.
    """
    rnd = rounder(d)
    vs = [to_work(x, d) for x in xs]
    if base is None:
        return None, vs
    b = to_work(base, d)
    return b, [rnd(v - b) for v in vs]


def combine(
    b: jnp.ndarray,
    deltas: Sequence[jnp.ndarray],
    weights: jnp.ndarray,
    lam: jnp.ndarray | None,
    *,
    d: str,
    consensus: str | None,
    normalize: bool,
) -> jnp.ndarray:
    """Weight, elect and add the (sparsified) task vectors to ``b``.

    b, deltas: float32[n] (dtype-``d`` values); weights: float32[k] (rounded to
    ``d``); lam: float32 scalar or None (= 1). Returns float32[n] rounded to ``d``.
    """
    rnd = rounder(d)
    k = len(deltas)
    # A "sum" of one term is that term (or +0.0): already a dtype-d value, so
    # rounding it again is the identity and is skipped (a third of the work
    # for the common one-donor merge).
    rsum = rnd if k > 1 else (lambda x: x)
    big = [rnd(weights[i] * deltas[i]) for i in range(k)]
    if consensus == "sum":
        s = rsum(sum_f32(big))
        pos = s >= 0
        masks = [jnp.where(pos, t > 0, t < 0).astype(jnp.float32) for t in big]
        m = rsum(sum_f32([t * mk for t, mk in zip(big, masks)]))
        den = rsum(sum_f32([weights[i] * masks[i] for i in range(k)]))
        den = jnp.where(den == 0, jnp.float32(1.0), den)
    elif consensus is None:
        m = rsum(sum_f32(big))
        den = rsum(sum_f32([weights[i] for i in range(k)]))
        den = jnp.where(jnp.abs(den) < 1e-8, jnp.float32(1.0), den)
    else:
        raise ValueError(f"unknown consensus {consensus!r}")
    if normalize:
        m = rnd(divide(m, den))
    if lam is not None:
        m = rnd(m * lam)
    return rnd(b + m)
