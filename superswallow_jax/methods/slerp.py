"""Spherical interpolation: ``slerp``, ``nuslerp`` and ``multislerp`` (mergekit 0.1.5).

Elementwise parts only: the per-vector scalars (norms, cosines, angles and
the coefficients derived from them) come from whole-tensor statistics
computed on the host (:mod:`.scalar`, :mod:`.vecsum`) and are passed in as
float32 scalars, or as per-element arrays for row- and column-wise vectors.
``rnd`` is rounding to the working dtype ``d`` after each op, as torch
evaluates ``d`` tensors; Python scalars enter as float32.

slerp (base ``v0``, other ``v1``; float32 math, result rounded to ``d``)::

    x = f32(v0) / |v0|;  y = f32(v1) / |v1|          (norm 1 if <= 1e-8)
    dot = sum(x * y) clamped to [-1, 1]
    |dot| > 0.9995:  c0 = 1 - t,  c1 = t
    else:            c0 = sin((1-t) theta) / sin(theta),  c1 = sin(t theta) / sin(theta)
    out = rnd(c0 * v0 + c1 * v1)                    (two float32 products, one float32 sum)

nuslerp (two models ``v0``, ``v1``, task vectors when a base ``B`` is given;
all in ``d``)::

    u_i = rnd(v_i / max(|v_i|, 1e-7));  cos = rnd(sum rnd(u0 * u1))
    colinear:  r = rnd(rnd(v0 * (1-t)) + rnd(v1 * t))
    else:      r = rnd(rnd(rnd(s0 * v0) + rnd(s1 * v1)) / sin(theta))
    out = r, or rnd(B + r)

multislerp: see :func:`multislerp_out`.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from .numerics import as_f32, divide, fp_barrier, rounder, sum_f32


def slerp_dot_terms(v0: jnp.ndarray, v1: jnp.ndarray, n0: jnp.ndarray, n1: jnp.ndarray, *, work: str) -> jnp.ndarray:
    """Terms of slerp's dot product: ``(f32(v0) / n0) * (f32(v1) / n1)`` in float32.

    v0, v1: any float dtype (rounded to ``work`` first); n0, n1: float32 norms.
    """
    rnd = rounder(work)
    x = divide(rnd(as_f32(v0)), n0)
    y = divide(rnd(as_f32(v1)), n1)
    return fp_barrier(x * y)


def slerp_out(v0: jnp.ndarray, v1: jnp.ndarray, c0: jnp.ndarray, c1: jnp.ndarray, *, work: str) -> jnp.ndarray:
    """``rnd_work(f32(c0 * v0) + f32(c1 * v1))``; c0, c1 float32 scalars (or per-element arrays)."""
    rnd = rounder(work)
    a = rnd(as_f32(v0))
    b = rnd(as_f32(v1))
    return rnd(fp_barrier(fp_barrier(c0 * a) + fp_barrier(c1 * b)))


def nuslerp_units_dot(v0: jnp.ndarray, v1: jnp.ndarray, n0: jnp.ndarray, n1: jnp.ndarray, *, work: str) -> jnp.ndarray:
    """``rnd(rnd(v0 / n0) * rnd(v1 / n1))``: the terms of nuslerp's cosine (n_i clamped norms in ``work``)."""
    rnd = rounder(work)
    return rnd(rnd(divide(v0, n0)) * rnd(divide(v1, n1)))


def nuslerp_out(
    base: jnp.ndarray | None, v0: jnp.ndarray, v1: jnp.ndarray,
    colinear: jnp.ndarray, s0: jnp.ndarray, s1: jnp.ndarray, sin_theta: jnp.ndarray,
    t0: jnp.ndarray, t1: jnp.ndarray, *, work: str,
) -> jnp.ndarray:
    """nuslerp's result from per-vector scalars (float32 holding ``work`` values).

    colinear: float32 1.0/0.0; s0 = rnd(sin(rnd(theta * (1-t)))), s1 likewise
    with t; t0 = f32(1 - t), t1 = f32(t).
    """
    rnd = rounder(work)
    sph = rnd(divide(rnd(rnd(s0 * v0) + rnd(s1 * v1)), sin_theta))
    lin = rnd(rnd(v0 * t0) + rnd(v1 * t1))
    r = jnp.where(colinear != 0, lin, sph)
    return r if base is None else rnd(base + r)


def multislerp_units(vs: Sequence[jnp.ndarray], nes: jnp.ndarray, *, work: str) -> list[jnp.ndarray]:
    """``rnd(T_i / (|T_i| + eps))``; nes[i] = rnd(|T_i| + rnd(eps))."""
    rnd = rounder(work)
    return [rnd(divide(v, nes[i])) for i, v in enumerate(vs)]


def multislerp_weighted_sum(vs: Sequence[jnp.ndarray], w: jnp.ndarray, *, work: str) -> jnp.ndarray:
    """``rnd(sum_i rnd(v_i * w_i))`` with a float32 accumulator (torch ``.sum(0)``)."""
    rnd = rounder(work)
    return rnd(sum_f32([rnd(v * w[i]) for i, v in enumerate(vs)]))


def multislerp_tangent(units: Sequence[jnp.ndarray], mean: jnp.ndarray, dots: jnp.ndarray, w: jnp.ndarray, *, work: str) -> jnp.ndarray:
    """``rnd(sum_i rnd(rnd(u_i - rnd(dot_i * mean)) * w_i))``."""
    rnd = rounder(work)
    tangents = [rnd(u - rnd(dots[i] * mean)) for i, u in enumerate(units)]
    return multislerp_weighted_sum(tangents, w, work=work)


def multislerp_out(
    base: jnp.ndarray | None, mean: jnp.ndarray, tangent: jnp.ndarray,
    cos_tn: jnp.ndarray, sin_over_tn: jnp.ndarray, avg_norm: jnp.ndarray, *, work: str,
) -> jnp.ndarray:
    """``rnd(rnd(rnd(mean * cos) + rnd(tangent * sin/tn)) * avg_norm)``, plus the base."""
    rnd = rounder(work)
    r = rnd(rnd(mean * cos_tn) + rnd(tangent * sin_over_tn))
    r = rnd(r * avg_norm)
    return r if base is None else rnd(r + base)


def multislerp_linear(base: jnp.ndarray | None, v0: jnp.ndarray, v1: jnp.ndarray, w: jnp.ndarray, *, work: str) -> jnp.ndarray:
    """Two-model fallback when the mean direction vanishes: ``rnd(v0 w0 + v1 w1)`` (+ base)."""
    rnd = rounder(work)
    r = rnd(rnd(v0 * w[0]) + rnd(v1 * w[1]))
    return r if base is None else rnd(r + base)
