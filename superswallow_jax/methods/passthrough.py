"""``passthrough``: copy the single input, optionally multiplied by ``scale``."""

from __future__ import annotations

import jax.numpy as jnp

from .numerics import as_f32, rounder


def passthrough(x: jnp.ndarray, scale: jnp.ndarray | None, *, work: str) -> jnp.ndarray:
    """``x`` (any float dtype, any shape) rounded to ``work``, times float32 ``scale`` if given.

    Returns float32, rounded to ``work``.
    """
    rnd = rounder(work)
    y = rnd(as_f32(x))
    return y if scale is None else rnd(y * scale)
