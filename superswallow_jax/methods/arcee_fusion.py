"""``arcee_fusion`` (mergekit 0.1.5): take the other model where it changed "importantly".

With base ``a``, other ``b`` (rounded to the working dtype ``d``), ``rnd`` =
rounding to ``d`` after each op, and rows along the last axis::

    p = rnd(softmax(b) + rnd(1e-8));  q = rnd(softmax(a) + rnd(1e-8))    softmax in float32, rounded to d
    kl_row = rnd(sum_row rnd(p * rnd(log rnd(p / q))))
    I = rnd(|rnd(b - a)| * kl_row)
    threshold = rnd(med + rnd(rnd(q3 - q1) * 1.5))    quartiles: sorted(I)[floor(f32(q) * f32(n - 1))]
    out = f32(a) + f32(rnd(b - a)) * [I >= threshold]                     float32 result

The quartiles of tensors with more than 10^6 elements come from 10^6
elements drawn with replacement (mergekit uses ``torch.randint``; here the
tensor's own key stream, so statistically equivalent, not identical).
The softmax ``exp`` and the row sums are float32 here and in torch, but
not the same roundings: see docs/mergekit-0.1.5-notes.md. ``exp`` and ``log``
are :mod:`.transcendental`'s (XLA's differ between CPU and GPU in the last bit).
"""

from __future__ import annotations

import jax.numpy as jnp

from . import transcendental
from .numerics import as_f32, fp_barrier, rounder

SAMPLE_SIZE = 1_000_000
QUANTILES = (0.25, 0.5, 0.75)


def inputs(base: jnp.ndarray, other: jnp.ndarray, *, work: str) -> tuple[jnp.ndarray, jnp.ndarray]:
    rnd = rounder(work)
    return rnd(as_f32(base)), rnd(as_f32(other))


def exp_terms(x: jnp.ndarray, row_max: jnp.ndarray) -> jnp.ndarray:
    """``exp(x - max)`` in float32 (x: a rounded input; row_max per element or scalar)."""
    return transcendental.exp(fp_barrier(x - row_max))


def softmax(x: jnp.ndarray, row_max: jnp.ndarray, inv_sum: jnp.ndarray, eps: jnp.ndarray, *, work: str) -> jnp.ndarray:
    """``rnd(rnd(exp(x - max) * (1 / sum)) + eps)``; eps = rnd(f32(1e-8))."""
    rnd = rounder(work)
    return rnd(rnd(fp_barrier(exp_terms(x, row_max) * inv_sum)) + eps)


def kl_terms(a, b, max_a, max_b, inv_a, inv_b, eps, *, work: str) -> jnp.ndarray:
    """``rnd(p * rnd(log(rnd(p / q))))`` with p from ``b`` and q from ``a``."""
    rnd = rounder(work)
    p = softmax(b, max_b, inv_b, eps, work=work)
    q = softmax(a, max_a, inv_a, eps, work=work)
    return rnd(p * rnd(transcendental.log(rnd(p / q))))


def importance(a: jnp.ndarray, b: jnp.ndarray, kl: jnp.ndarray, *, work: str) -> jnp.ndarray:
    rnd = rounder(work)
    return rnd(jnp.abs(rnd(b - a)) * kl)


def fuse(a: jnp.ndarray, b: jnp.ndarray, kl: jnp.ndarray, threshold: jnp.ndarray, *, work: str) -> jnp.ndarray:
    """float32 ``a + rnd(b - a) * mask`` (mask = importance >= threshold)."""
    rnd = rounder(work)
    keep = (importance(a, b, kl, work=work) >= threshold).astype(jnp.float32)
    return fp_barrier(a + fp_barrier(rnd(b - a) * keep))
