"""``task_median``: the base plus the elementwise median of the task vectors.

A robust alternative to averaging task vectors: an element moves only as far
as the middle model moves it, so one outlier fine-tune cannot drag it. With
base ``B``, other models ``X_1..X_n`` (all rounded to the working dtype
``d``), ``rnd`` = rounding to ``d`` and ``f32(lambda)``::

    delta_i = rnd(X_i - B)
    m       = the lower median of delta_1..delta_n   (element (n - 1) // 2 in ascending order,
                                                      torch.median's rule; NaN sorts last)
    out     = rnd(B + rnd(m * f32(lambda)))

Elementwise, so it is bit-exact for any chunking; the median is a selection,
exact in any dtype. Not in mergekit 0.1.5 (added to show what adding a method
takes: this module, its prepare function and its registry entry).
"""

from __future__ import annotations

import jax.numpy as jnp

from .gta import task_vectors
from .numerics import fp_barrier, rounder


def task_median(base: jnp.ndarray, xs: list[jnp.ndarray], lam: jnp.ndarray, *, work: str) -> jnp.ndarray:
    """base, xs[i]: same shape, any float dtype; lam: float32 scalar. Returns float32 holding ``work`` values."""
    rnd = rounder(work)
    b, deltas = task_vectors(base, xs, d=work)
    m = jnp.sort(jnp.stack(deltas), axis=0)[(len(deltas) - 1) // 2]
    return rnd(b + rnd(fp_barrier(m * lam)))
