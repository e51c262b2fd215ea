"""``nearswap`` (mergekit 0.1.5): take the other model where it is close to the base.

With base ``a``, other ``b`` (both rounded to the working dtype ``d``), global
``t`` and ``rnd`` = rounding to ``d`` after each op::

    w = clamp(rnd(rnd(1 / max(|rnd(a - b)|, rnd(1e-6))) * f32(t)), 0, 1)
    out = rnd(rnd(w * b) + rnd(rnd(1 - w) * a))

(torch evaluates ``t / x`` as ``x.reciprocal() * t``.) Elementwise, so it is
bit-exact for any chunking.
"""

from __future__ import annotations

import jax.numpy as jnp

from .numerics import as_f32, rounder


def nearswap(a: jnp.ndarray, b: jnp.ndarray, t: jnp.ndarray, floor: jnp.ndarray, *, work: str) -> jnp.ndarray:
    """a, b: any float dtype, same shape; t = f32(t); floor = rnd(f32(1e-6)). Returns float32 in ``work``."""
    rnd = rounder(work)
    a = rnd(as_f32(a))
    b = rnd(as_f32(b))
    dist = jnp.maximum(jnp.abs(rnd(a - b)), floor)
    w = jnp.clip(rnd(rnd(jnp.float32(1.0) / dist) * t), 0.0, 1.0)
    return rnd(rnd(w * b) + rnd(rnd(1.0 - w) * a))
