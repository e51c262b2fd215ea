"""``ram`` and ``ramplus_tl`` (Reinforced Agent Merging), as mergekit 0.1.5 computes them.

With ``rnd`` = rounding to the working dtype ``d``, base ``B`` and donors
``X_1..X_k``:

    tau_i = rnd(X_i - B);  a_i = |tau_i| > rnd(epsilon)     (epsilon rounded to d, as torch compares)
    c = sum_i a_i;  z_i = tau_i * a_i;  u_i = z_i * [c == 1];  o_i = rnd(z_i * [c > 1] / max(c, 1))
    ram:        out = rnd(B + rnd(sum_i rnd(u_i + o_i)))
    ramplus_tl: per donor, over the whole tensor,
                rho_i = f32(#{a_i and c > 1}) / max(f32(#{a_i and c == 1}), f32(epsilon))
                lam_i = 1 + f32(r) * clip(rho_i, 0, f32(alpha))            (float32)
                out = B + sum_i (u_i * lam_i + o_i)                         (all float32: lam promotes)

ramplus_tl's result is float32 whatever ``d`` is (mergekit saves it so unless
``out_dtype`` is set). Sums over donors start from +0.0, left to right.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from .numerics import divide, fp_barrier, rounder, sum_f32


def _masks(deltas: Sequence[jnp.ndarray], eps: jnp.ndarray):
    active = [jnp.abs(t) > eps for t in deltas]
    count = sum(a.astype(jnp.int32) for a in active)
    return active, count


def counts(deltas: Sequence[jnp.ndarray], eps: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
    """int32[k, 2]: per donor, entries that are active and shared (c > 1) / active and unique (c == 1).

    valid: bool[n], False on padding.
    """
    active, c = _masks(deltas, eps)
    shared = (c > 1) & valid
    unique = (c == 1) & valid
    return jnp.stack([jnp.stack([jnp.sum(a & shared, dtype=jnp.int32), jnp.sum(a & unique, dtype=jnp.int32)]) for a in active])


def merge(
    b: jnp.ndarray, deltas: Sequence[jnp.ndarray], eps: jnp.ndarray, lam: jnp.ndarray | None, *, d: str
) -> jnp.ndarray:
    """RAM (``lam`` None; result rounded to ``d``) or RAM+ (``lam``: float32[k]; float32 result).

    b, deltas: float32[n] holding dtype-``d`` values; eps: float32 scalar,
    already rounded to ``d``.
    """
    rnd = rounder(d)
    active, c = _masks(deltas, eps)
    unique = (c == 1).astype(jnp.float32)
    overlap = (c > 1).astype(jnp.float32)
    cnt = jnp.maximum(c, 1).astype(jnp.float32)
    terms = []
    for i, (t, a) in enumerate(zip(deltas, active)):
        z = t * a.astype(jnp.float32)
        o = rnd(divide(z * overlap, cnt))
        u = z * unique
        if lam is None:
            terms.append(rnd(u + o))
        else:
            terms.append(fp_barrier(fp_barrier(u * lam[i]) + o))
    if lam is None:
        return rnd(b + rnd(sum_f32(terms)))
    return fp_barrier(b + fp_barrier(sum_f32(terms)))


def ramplus_lambdas(shared: Sequence[int], unique: Sequence[int], r: float, alpha: float, eps: float) -> np.ndarray:
    """float32[k]: lam_i = 1 + r * clip(shared_i / max(unique_i, eps), 0, alpha), in float32 as torch does."""
    out = []
    for s, u in zip(shared, unique):
        den = max(np.float32(u), np.float32(eps))
        rho = np.float32(np.float32(s) / den)
        rho = min(max(rho, np.float32(0.0)), np.float32(alpha))
        out.append(np.float32(np.float32(1.0) + np.float32(np.float32(r) * rho)))
    return np.array(out, np.float32)
