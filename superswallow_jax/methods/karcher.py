"""``karcher`` (mergekit 0.1.5): weighted Karcher mean on the unit sphere, scaled by the mean norm.

All ``n`` inputs (a base model is an ordinary input) get weight ``1/n``. With
``rnd`` = rounding to the working dtype ``d`` after each op and norms kept in
float32 (``|.|``, computed on the host)::

    u_i = x_i == 0 ? 0 : rnd(x_i / |x_i|)           valid: |x_i| > tol, alphas renormalized over them
    m = 0;  m = rnd(m + rnd(u_i * a_i))  for valid i
    mean = |m| < tol ? u_first_valid : rnd(m / |m|)
    repeat up to max_iter times:
        dot_i = clamp(rnd(mean . u_i), -1, 1);  theta_i = rnd(acos dot_i)      (skip i if theta_i < tol)
        c_i = rnd(rnd(theta_i / rnd(sin theta_i)) * a_i)
        T = 0;  T = rnd(T + rnd(c_i * rnd(u_i - rnd(dot_i * mean))))
        stop if |T| < tol
        new = rnd(rnd(rnd(cos |T|) * mean) + rnd(rnd(sin |T|) * rnd(T / |T|)))
        mean = |new| > tol ? rnd(new / |new|) : new
    out = rnd(rnd(sum_i f32(1/n) |x_i|) * mean)

A tensor larger than a chunk is never held whole, so every pass recomputes
``mean`` from the inputs by replaying the recorded per-iteration scalars
(:func:`replay`); the elementwise ops are deterministic, so the replayed
values are the same bits.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax.numpy as jnp
from jax import lax

from .numerics import as_f32, divide, rounder


class History(NamedTuple):
    """Per-iteration scalars, float32 arrays of ``max_iter`` rows (``[max_iter, n]`` per model)."""

    dots: jnp.ndarray  # dot_i (a work-dtype value)
    coefs: jnp.ndarray  # c_i
    active: jnp.ndarray  # 1.0 where model i contributes to T
    cos_t: jnp.ndarray  # rnd(cos |T|)
    sin_t: jnp.ndarray  # rnd(sin |T|)
    t_norm: jnp.ndarray  # |T| (float32)
    u_norm: jnp.ndarray  # |new| (float32)
    u_ok: jnp.ndarray  # 1.0 where |new| > tol


def units(xs: Sequence[jnp.ndarray], norms: jnp.ndarray, *, work: str) -> list[jnp.ndarray]:
    rnd = rounder(work)
    out = []
    for i, x in enumerate(xs):
        u = rnd(divide(rnd(as_f32(x)), norms[i]))
        out.append(jnp.where(norms[i] == 0, jnp.float32(0.0), u))
    return out


def initial_raw(us: Sequence[jnp.ndarray], valid: jnp.ndarray, alphas: jnp.ndarray, *, work: str) -> jnp.ndarray:
    """``m``: the alpha-weighted sum of the valid units (zeros to start, like ``zeros_like``)."""
    rnd = rounder(work)
    m = jnp.zeros_like(us[0])
    for i, u in enumerate(us):
        m = jnp.where(valid[i] != 0, rnd(m + rnd(u * alphas[i])), m)
    return m


def initial_mean(us: Sequence[jnp.ndarray], m: jnp.ndarray, m_norm: jnp.ndarray, first: jnp.ndarray, use_first: jnp.ndarray, *, work: str) -> jnp.ndarray:
    rnd = rounder(work)
    u_first = us[0]
    for i in range(1, len(us)):
        u_first = jnp.where(first == i, us[i], u_first)
    return jnp.where(use_first != 0, u_first, rnd(divide(m, m_norm)))


def tangent(us: Sequence[jnp.ndarray], mean: jnp.ndarray, dots: jnp.ndarray, coefs: jnp.ndarray, active: jnp.ndarray, *, work: str) -> jnp.ndarray:
    rnd = rounder(work)
    t = jnp.zeros_like(mean)
    for i, u in enumerate(us):
        contrib = rnd(coefs[i] * rnd(u - rnd(dots[i] * mean)))
        t = jnp.where(active[i] != 0, rnd(t + contrib), t)
    return t


def step_raw(mean: jnp.ndarray, t: jnp.ndarray, cos_t: jnp.ndarray, sin_t: jnp.ndarray, t_norm: jnp.ndarray, *, work: str) -> jnp.ndarray:
    rnd = rounder(work)
    return rnd(rnd(cos_t * mean) + rnd(sin_t * rnd(divide(t, t_norm))))


def step_normalize(new: jnp.ndarray, u_norm: jnp.ndarray, u_ok: jnp.ndarray, *, work: str) -> jnp.ndarray:
    rnd = rounder(work)
    return jnp.where(u_ok != 0, rnd(divide(new, u_norm)), new)


def iterate(us: Sequence[jnp.ndarray], mean: jnp.ndarray, h: History, j, *, work: str) -> jnp.ndarray:
    """One full update with the scalars of row ``j`` of ``h``."""
    t = tangent(us, mean, h.dots[j], h.coefs[j], h.active[j], work=work)
    new = step_raw(mean, t, h.cos_t[j], h.sin_t[j], h.t_norm[j], work=work)
    return step_normalize(new, h.u_norm[j], h.u_ok[j], work=work)


def replay(us: Sequence[jnp.ndarray], mean0: jnp.ndarray, h: History, n_steps: jnp.ndarray, *, work: str) -> jnp.ndarray:
    """``mean`` after ``n_steps`` (traced int32) recorded updates."""
    return lax.fori_loop(0, n_steps, lambda j, m: iterate(us, m, h, j, work=work), mean0)


def scale_out(mean: jnp.ndarray, scale: jnp.ndarray, *, work: str) -> jnp.ndarray:
    """``rnd(scale * mean)``; scale already rounded to ``work`` (torch rounds the float32 0-d tensor first)."""
    return rounder(work)(scale * mean)
