"""``linear``: weighted average, as mergekit 0.1.5 computes it.

    out = rnd_d( (sum_i w_i * X_i) / (sum_i w_i) )       # normalize = true

All arithmetic is float32 (weights are float32, not rounded to ``d``),
accumulated left to right in model order, rounded once at the end.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from .numerics import as_f32, divide, rounder, sum_f32


def linear(xs: Sequence[jnp.ndarray], weights: jnp.ndarray, *, normalize: bool, work: str) -> jnp.ndarray:
    """Merge ``k`` same-shaped arrays.

    Args:
      xs: k arrays of any float dtype, same shape.
      weights: float32[k].
      normalize: divide by the weight sum.
      work: working dtype code ("BF16", "F16", "F32"): inputs are rounded to it first.
    Returns:
      float32 array of the common shape, already rounded to ``work``.
    """
    rnd = rounder(work)
    f32 = rounder("F32")  # products rounded separately: no FMA contraction
    terms = [f32(as_f32(rnd(as_f32(x))) * weights[i]) for i, x in enumerate(xs)]
    acc = sum_f32(terms)
    if normalize:
        wsum = sum_f32([weights[i] for i in range(len(xs))])
        acc = divide(acc, wsum)
    return rnd(acc)
