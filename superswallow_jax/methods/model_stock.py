"""``model_stock`` (mergekit 0.1.5): interpolate between the base and the models' average.

With base ``w0``, ``k >= 2`` other models ``w_i`` (all rounded to the working
dtype ``d``) and ``rnd`` = rounding to ``d`` after each op, per vector (the
flattened tensor, or each row of the last axis with ``filter_wise``)::

    o_i = rnd(w_i - w0)
    cos_ij = clamp(rnd(rnd(sum rnd(o_i o_j)) / max(rnd(|o_i| |o_j|), 1e-6)), -1, 1)   i < j
    c = rnd(f32(sum_ij cos_ij) / P)                                  P pairs, float32 mean
    den = rnd(1 + rnd(c (k - 1)));  t = |den| < 1e-6 ? 0 : rnd(rnd(c k) / den)
    avg = rnd(rnd(... rnd(0 + w_1) + ... + w_k) / k)
    out = rnd(rnd(t avg) + rnd(rnd(1 - t) w0))

The reductions (norms, dot products) are computed on the host from the
terms returned here; ``t`` comes back as a scalar or a per-element array.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from .numerics import as_f32, divide, rounder


def offsets(base: jnp.ndarray, xs: Sequence[jnp.ndarray], *, work: str) -> list[jnp.ndarray]:
    """``[rnd(rnd(X_i) - rnd(base))]``."""
    rnd = rounder(work)
    b = rnd(as_f32(base))
    return [rnd(rnd(as_f32(x)) - b) for x in xs]


def pair_products(offs: Sequence[jnp.ndarray], *, work: str) -> list[jnp.ndarray]:
    """``rnd(o_i * o_j)`` for i < j, in (0,1), (0,2), ..., (1,2), ... order."""
    rnd = rounder(work)
    k = len(offs)
    return [rnd(offs[i] * offs[j]) for i in range(k) for j in range(i + 1, k)]


def model_stock_out(base: jnp.ndarray, xs: Sequence[jnp.ndarray], t: jnp.ndarray, *, work: str) -> jnp.ndarray:
    """The interpolation, with ``t`` (float32, a ``work`` value) a scalar or per-element array."""
    rnd = rounder(work)
    w0 = rnd(as_f32(base))
    ws = [rnd(as_f32(x)) for x in xs]
    acc = ws[0]
    for w in ws[1:]:
        acc = rnd(acc + w)
    acc = jnp.where(acc == 0, jnp.float32(0.0), acc)  # Python's sum() starts from int 0
    avg = rnd(divide(acc, jnp.float32(len(ws))))
    return rnd(rnd(t * avg) + rnd(rnd(1.0 - t) * w0))
