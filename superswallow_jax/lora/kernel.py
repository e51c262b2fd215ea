"""The LoRA kernels: rows of ``W + scale * lhs @ rhs`` in the order of operations of PEFT's merge.

PEFT (``LoraLayer.merge`` after ``get_delta_weight``) computes, for float32
factors, ``delta = (B @ A) * scaling`` in float32 and then ``W += delta``:
the sum in float32, rounded once to W's dtype (an embedding's merge first
rounds the delta to W's dtype: ``W += delta.to(W.dtype)``).

**The product.** torch's CPU matmul (MKL) accumulates each element of
``B @ A`` over the rank in order, one fused multiply-add per step starting
from zero, for the shapes LoRA has (measured: rank <= 128 with both other
sides >= 16; larger ranks are summed in blocks, tiny matrices differently:
docs/lora.md). XLA's dot picks its own order per shape, and XLA may or may
not fuse a multiply and an add, so :func:`fma_dot` computes that chain
exactly with float32 operations only, whatever the backend: each step
``fma(a, b, c)`` is Boldo and Melquiond's emulation (IEEE TC 2008), the
exact product ``a*b = uh + ul`` (Dekker's, with a bit-mask split, so every
partial product is exact and fusing cannot change it), ``c + uh = th + tl``
(Knuth's two-sum), and ``RN(th + RO(tl + ul))`` with ``RO`` rounding to
odd. The scale multiply comes after the product, as in PEFT. Every product
that an add consumes goes through
:func:`~superswallow_jax.methods.numerics.fp_barrier` first, so a backend
that fuses a multiply and an add into one rounding (XLA's CPU code
generator does, even across an optimization barrier) cannot change a bit.

Rows: a row of ``W`` needs the matching row of ``lhs`` and all of ``rhs``
(``lhs = B``, ``rhs = A`` for a linear layer; ``lhs = A^T``, ``rhs = B^T`` for
an embedding or a ``Conv1D``, where ``W = (B @ A)^T``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ..dtypes import NP
from ..methods.numerics import fp_barrier, rounder

_F32 = jnp.float32


def split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 ``x`` as ``hi + lo`` exactly, each with at most 12 significant bits (``hi``: ``x`` with the low
    12 mantissa bits cleared), so that products of halves are exact in float32."""
    hi = lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFFF000), _F32)
    return hi, x - hi


def two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(s, e)`` with ``s = RN(a + b)`` and ``a + b = s + e`` exactly (Knuth; no multiplications)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def two_prod(a, ah, al, b, bh, bl) -> tuple[jax.Array, jax.Array]:
    """``(p, e)`` with ``p = RN(a * b)`` and ``a * b = p + e`` exactly (Dekker, from :func:`split` halves;
    every partial product is exact, so fusing one into an add changes nothing; ``p`` and ``e`` leave
    through :func:`~superswallow_jax.methods.numerics.fp_barrier`)."""
    p = fp_barrier(a * b)
    return p, fp_barrier(((ah * bh - p) + ah * bl + al * bh) + al * bl)


def odd_sum(x: jax.Array, y: jax.Array) -> jax.Array:
    """``x + y`` rounded to odd: the exact sum if representable, else whichever neighbour has an odd significand."""
    z, e = two_sum(x, y)
    bits = lax.bitcast_convert_type(z, jnp.int32)
    step = jnp.where((e > 0) == (z > 0), jnp.int32(1), jnp.int32(-1))
    return lax.bitcast_convert_type(jnp.where((e != 0) & ((bits & 1) == 0), bits + step, bits), _F32)


def fma_dot(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """``lhs @ rhs`` (float32 ``[R, r]`` and ``[r, C]``) with each element accumulated over ``r`` in order,
    ``acc = fma(lhs[:, k], rhs[k], acc)`` from ``acc = RN(lhs[:, 0] * rhs[0])``, every step rounded once."""
    lh, ll = split(lhs)
    rh, rl = split(rhs)

    def col(x, k):
        return lax.dynamic_slice_in_dim(x, k, 1, 1)

    def row(x, k):
        return lax.dynamic_slice_in_dim(x, k, 1, 0)

    def step(k, acc):
        uh, ul = two_prod(col(lhs, k), col(lh, k), col(ll, k), row(rhs, k), row(rh, k), row(rl, k))
        th, tl = two_sum(acc, uh)  # only barriered values and sums from here: nothing to fuse
        return th + odd_sum(tl, ul)

    return lax.fori_loop(1, lhs.shape[1], step, fp_barrier(lhs[:, :1] * rhs[:1, :]))


def lora_rows(w: jax.Array, lhs: jax.Array, rhs: jax.Array, scale: jax.Array, dtype: str,
              round_delta: bool = False) -> jax.Array:
    """``cast(w) + scale * lhs @ rhs``, rounded to ``dtype``.

    ``w``: ``[R, C]`` as stored (any float dtype; first rounded to ``dtype``,
    as transformers loads it); ``lhs``: ``[R, r]``, ``rhs``: ``[r, C]`` (any
    float dtype, used in float32); ``scale``: float32 scalar;
    ``round_delta``: round the delta to ``dtype`` before the sum (PEFT's
    embedding merge does; its linear merge adds the float32 delta). Returns
    ``[R, C]`` of ``dtype`` (a dtype code). Every rounding goes through
    :func:`~superswallow_jax.methods.numerics.rounder`, which XLA cannot fold away.
    """
    rnd = rounder(dtype)
    delta = fp_barrier(fma_dot(lhs.astype(_F32), rhs.astype(_F32)) * scale)  # rounded before the sum
    if round_delta:
        delta = rnd(delta)
    return rnd(rnd(w.astype(_F32)) + delta).astype(NP[dtype])


def lora_chunk(w: jax.Array, lhs: jax.Array, rhs: jax.Array, scale: jax.Array, offset: jax.Array, count: jax.Array,
               dtype: str, n: int, round_delta: bool = False) -> jax.Array:
    """Flat elements ``[offset, offset + count)`` of :func:`lora_rows`, zero-padded to ``n``.

    ``w``: ``[R, C]`` rows holding the chunk (``R * C >= offset + n``);
    ``offset``, ``count``: int32 scalars. Returns ``[n]`` of ``dtype``.
    """
    flat = lora_rows(w, lhs, rhs, scale, dtype, round_delta).reshape(-1)
    piece = lax.dynamic_slice(flat, (offset,), (n,))
    return jnp.where(lax.iota(jnp.int32, n) < count, piece, jnp.zeros((), piece.dtype))


def cast(x: jax.Array, dtype: str) -> jax.Array:
    """``x`` rounded to ``dtype`` (a tensor transformers casts on load, without a LoRA)."""
    return rounder(dtype)(x.astype(_F32)).astype(NP[dtype])
