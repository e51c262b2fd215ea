"""``linear``: weighted average, as mergekit 0.1.5 computes it.

    c_i = f32(w_i);  acc = 0;  acc = fma(X_i, c_i, acc) for i = 1..k (model order)
    out = rnd_d(acc / (c_1 + ... + c_k))                   # normalize = true

All arithmetic is float32: a chain of fused multiply-adds (one rounding
each, emulated exactly by :func:`~.numerics.fma`), one true division and one
final rounding to the working dtype.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from .numerics import as_f32, divide, fma, rounder, sum_f32


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
    acc = jnp.zeros(xs[0].shape, jnp.float32)
    for i, x in enumerate(xs):
        acc = fma(rnd(as_f32(x)), weights[i], acc)
    if normalize:
        wsum = sum_f32([weights[i] for i in range(len(xs))])
        acc = divide(acc, wsum)
    return rnd(acc)
