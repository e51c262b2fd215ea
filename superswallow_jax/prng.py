"""Chunkable, bit-exact reproduction of JAX's threefry random streams.

Merge methods that drop parameters at random (DARE, TIES-with-dropout, ...)
need one Bernoulli mask per (tensor, source model). A streaming merger sees
each tensor in chunks, so the mask for elements ``[off, off + n)`` of the
flattened tensor must be computable on its own and still equal the slice of
the mask a single whole-tensor draw would give.

JAX makes that possible: with ``jax_threefry_partitionable=True`` (the
default since JAX 0.5; this module implements the stream itself and does not
depend on the flag, which only decides whether ``jax.random`` agrees with it),
``jax.random.bits(key, shape)`` (32-bit) at row-major flat index ``i`` is::

    y0, y1 = threefry2x32(key, (i >> 32, i & 0xFFFFFFFF))
    bits[i] = y0 ^ y1

(``jax/_src/random/threefry2x32.py::_threefry_random_bits_partitionable``
with the counters of ``prng.iota_2x32_shape``). So a chunk only needs its
64-bit start offset. Note that a per-chunk ``fold_in`` is *not* equivalent.

This module provides:

* :func:`threefry2x32` -- an unrolled ``jnp`` threefry2x32, bit-identical to
  JAX's primitive. On CPU JAX lowers the primitive as a rolled ``fori_loop``
  that XLA does not fuse; the unrolled form fuses with the counter ``iota``
  and the bits-to-mask conversion into one loop and is several times faster.
* :func:`threefry2x32_numpy` -- the same function in NumPy, used to derive
  per-tensor keys on the host and as an independent test reference.
* :func:`random_bits` / :func:`bernoulli_mask` -- chunk ``[off, off + n)`` of
  ``jax.random.bits`` / ``jax.random.bernoulli`` over a flat tensor.
* :func:`root_key_data` / :func:`tensor_key_data` -- the key scheme:
  ``seed -> fold_in(name word 0) -> fold_in(name word 1) -> fold_in(source)``.

**Fusion barrier.** :func:`random_bits` and :func:`bernoulli_mask` end in
``lax.optimization_barrier``, so inside a bigger ``jit`` the threefry stays
in a fusion of its own (iota -> threefry -> bits or mask) and the consumer
reads a materialized ``uint32``/``bool`` buffer. Without it XLA:CPU fuses the
20-round threefry DAG into the merge kernel's elementwise chain; when that
loop also holds an op LLVM's loop vectorizer must scalarize (the f32 -> bf16
``convert`` of a bf16 output, which XLA:CPU lowers to a call to
``xla.fptrunc.f32.to.bf16``), the vectorizer's VPlan "uses only the first
lane" queries walk every path through that DAG, and compile time grows
exponentially with the number of ops (``reduce_precision`` roundings)
stacked above the mask: with jax/jaxlib 0.11.2 a two-donor dare_ties
kernel took minutes to compile (0.10.2's LLVM handles the same IR fine; the
times are in docs/tpu.md). The barrier is an identity:
it changes no value, and costs one extra pass over an ``n``-byte mask.

Everything here is a pure function of its arguments and independent of
``jax_enable_x64`` and ``PYTHONHASHSEED``. Any change to the streams this
module produces must change :data:`PRNG_SCHEME`.
"""

from __future__ import annotations

import functools
import hashlib
import operator

import jax
import jax.numpy as jnp
import numpy as np

PRNG_SCHEME: str = "superswallow-threefry2x32-partitionable-v1"
"""Name of the random-stream definition; recorded in output metadata."""

_U32_MASK = 0xFFFFFFFF
_U32 = np.uint32
# Threefry-2x32 with 20 rounds (Salmon et al. 2011), as in jax's lowering.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KS_PARITY = _U32(0x1BD11BDA)


def _threefry2x32_core(k0, k1, x0, x1):
    """Threefry-2x32 written only with ``+ ^ << >> |`` on uint32 arrays.

    Works for NumPy arrays (at least 1-d, so additions wrap without scalar
    overflow warnings) and for ``jax.Array``s alike. All constants are
    ``np.uint32`` so nothing is promoted, whatever ``jax_enable_x64`` is.
    """
    ks = (k0, k1, k0 ^ k1 ^ _KS_PARITY)
    x0 = x0 + ks[0]
    x1 = x1 + ks[1]
    for step in range(1, 6):  # 5 groups of 4 rounds, key injection after each
        for r in _ROTATIONS[(step - 1) % 2]:
            x0 = x0 + x1
            x1 = (x1 << _U32(r)) | (x1 >> _U32(32 - r))
            x1 = x0 ^ x1
        x0 = x0 + ks[step % 3]
        x1 = x1 + ks[(step + 1) % 3] + _U32(step)
    return x0, x1


def _check_uint(name: str, value, bits: int) -> int:
    value = operator.index(value)
    if not 0 <= value < 2**bits:
        raise ValueError(f"{name} must be in [0, 2**{bits}), got {value}")
    return value


def _as_u32(name: str, value):
    """``value`` checked to be uint32: arrays (NumPy, jax, tracers) must have
    dtype uint32 -- silent casts would hide key/offset bugs -- and Python ints
    must lie in ``[0, 2**32)``; they become ``np.uint32``."""
    if hasattr(value, "dtype"):
        if value.dtype != np.uint32:
            raise TypeError(f"{name} must have dtype uint32, got {value.dtype}")
        return value
    if isinstance(value, (list, tuple)):
        return np.array([_as_u32(name, v) for v in value], dtype=np.uint32)
    return np.uint32(_check_uint(name, value, 32))


def threefry2x32(k0, k1, x0, x1) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 hash, unrolled, bit-identical to ``jax.extend.random.threefry2x32_p``.

    Args:
      k0, k1: key words, uint32 arrays (or Python ints) broadcastable with
        the counters; usually scalars.
      x0, x1: counter words, uint32 arrays of a common broadcast shape S.

    Returns:
      ``(y0, y1)``: two uint32 arrays of shape S. Traceable (works under
      ``jit``/``vmap``); does not modify its arguments.
    """
    names = ("k0", "k1", "x0", "x1")
    args = [jnp.asarray(_as_u32(n, v)) for n, v in zip(names, (k0, k1, x0, x1))]
    return _threefry2x32_core(*args)


def threefry2x32_numpy(k0, k1, x0, x1) -> tuple[np.ndarray, np.ndarray]:
    """Threefry-2x32 in NumPy, for host-side key derivation and test references.

    Args:
      k0, k1, x0, x1: uint32-valued ints or arrays, broadcastable together to
        shape S (values are converted with ``np.asarray(..., np.uint32)``).

    Returns:
      ``(y0, y1)``: two new uint32 ndarrays of shape S.
    """
    arrays = np.broadcast_arrays(*(np.asarray(v, dtype=np.uint32) for v in (k0, k1, x0, x1)))
    shape = arrays[0].shape
    flat = [np.array(a, dtype=np.uint32).reshape(-1) for a in arrays]  # copies, >= 1-d
    y0, y1 = _threefry2x32_core(*flat)
    return y0.reshape(shape), y1.reshape(shape)


def _fold_in_numpy(key: np.ndarray, data: int) -> np.ndarray:
    """``jax.random.fold_in`` on raw threefry key data, in NumPy.

    JAX defines it as ``threefry_2x32(key, threefry_seed(uint32(data)))``,
    i.e. the hash of the counter pair ``(0, data)`` with both output words
    kept in order: returns ``uint32[2] = [y0, y1]``.
    """
    y0, y1 = threefry2x32_numpy(key[0], key[1], 0, data)
    return np.array([y0, y1], dtype=np.uint32)


def root_key_data(seed: int) -> np.ndarray:
    """Raw threefry key data for an integer seed: ``uint32[2] = [seed >> 32, seed & 0xFFFFFFFF]``.

    Equals ``jax.random.key_data(jax.random.key(seed))`` for
    ``0 <= seed < 2**32`` (and for seeds below ``2**63`` when
    ``jax_enable_x64`` is on); unlike JAX it never truncates larger seeds, so
    the result does not depend on ``jax_enable_x64``.

    Raises:
      ValueError: ``seed`` is negative or ``>= 2**64``.
      TypeError: ``seed`` is not an integer.
    """
    seed = _check_uint("seed", seed, 64)
    return np.array([seed >> 32, seed & _U32_MASK], dtype=np.uint32)


def stable_name_words(name: str) -> tuple[int, int]:
    """Two uint32 words (as Python ints) from ``sha256(name.encode('utf-8'))``.

    The words are the first 8 digest bytes, read big-endian, 4 bytes each.
    Stable across processes and platforms (never uses Python's ``hash()``).
    """
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[0:4], "big"), int.from_bytes(digest[4:8], "big")


def tensor_key_data(seed: int, tensor_name: str, source_index: int, stage: str | None = None) -> np.ndarray:
    """Raw key data (``uint32[2]``) for the random stream of one tensor of one source model.

    Defined as ``fold_in(fold_in(fold_in(root_key_data(seed), w0), w1),
    source_index)`` with ``(w0, w1) = stable_name_words(tensor_name)`` and
    ``fold_in`` exactly ``jax.random.fold_in``. In a stage of a multi-stage
    recipe, the stage name's two words are folded in first (right after the
    root), so stages draw different masks; ``stage=None`` (a single merge, or
    a recipe's unnamed final stage) folds in nothing. Computed on the host in NumPy.

    Raises:
      ValueError: ``seed`` is outside ``[0, 2**64)`` or ``source_index``
        outside ``[0, 2**32)``.
    """
    key = root_key_data(seed)
    source_index = _check_uint("source_index", source_index, 32)
    for word in (*(stable_name_words(stage) if stage is not None else ()), *stable_name_words(tensor_name), source_index):
        key = _fold_in_numpy(key, word)
    return key


def split_offset(offset: int) -> tuple[np.uint32, np.uint32]:
    """Split a flat element offset in ``[0, 2**64)`` into ``(hi, lo)`` uint32 words.

    Raises:
      ValueError: ``offset`` is negative or ``>= 2**64``.
    """
    offset = _check_uint("offset", offset, 64)
    return np.uint32(offset >> 32), np.uint32(offset & _U32_MASK)


def _check_n(n) -> int:
    n = operator.index(n)
    if not 0 <= n <= 2**32:
        raise ValueError(f"n must be in [0, 2**32], got {n}")
    return n


def _check_stream_args(key_data, offset_hi, offset_lo):
    """Validated ``(key uint32[2], hi uint32[], lo uint32[])``; arguments are not copied or modified."""
    key = _as_u32("key_data", key_data)
    if key.shape != (2,):
        raise ValueError(f"key_data must have shape (2,), got {key.shape}")
    hi = _as_u32("offset_hi", offset_hi)
    lo = _as_u32("offset_lo", offset_lo)
    if hi.shape != () or lo.shape != ():
        raise ValueError("offset_hi and offset_lo must be scalars")
    return key, hi, lo


def _bits(key, hi, lo, n):
    counter_lo = lo + jax.lax.iota(jnp.uint32, n)
    counter_hi = hi + (counter_lo < lo).astype(jnp.uint32)  # carry on wrap
    y0, y1 = _threefry2x32_core(key[0], key[1], counter_hi, counter_lo)
    return y0 ^ y1


# Both end in an optimization_barrier: the threefry must not fuse into the
# caller's elementwise kernel (exponential XLA:CPU compile time with jax 0.11;
# see "Fusion barrier" in the module docstring). Values are unchanged.
@functools.partial(jax.jit, static_argnames=("n",))
def _random_bits(key, hi, lo, n):
    return jax.lax.optimization_barrier(_bits(key, hi, lo, n))


@functools.partial(jax.jit, static_argnames=("n",))
def _bernoulli_mask(key, hi, lo, n, p):
    bits = _bits(key, hi, lo, n)
    one_to_two = jax.lax.bitcast_convert_type((bits >> _U32(9)) | _U32(0x3F800000), jnp.float32)
    return jax.lax.optimization_barrier((one_to_two - jnp.float32(1.0)) < p)


def random_bits(key_data, offset_hi, offset_lo, n: int) -> jax.Array:
    """Elements ``[off, off + n)`` of the flat 32-bit ``jax.random.bits`` stream.

    Equals ``jax.random.bits(jax.random.wrap_key_data(key_data), (N,), jnp.uint32)[off:off + n]``
    (and the row-major flattening of any ``shape`` with ``prod(shape) = N``)
    for any ``N >= off + n``, where ``off = offset_hi * 2**32 + offset_lo``;
    the counter carries into ``hi`` when ``lo`` wraps past ``2**32``. (Without
    an explicit dtype, ``jax.random.bits`` draws uint64 under ``jax_enable_x64``.)
    Traceable; inside ``jit`` one compilation serves every key and offset,
    and the result is a materialized buffer (not fused into its consumers;
    see "Fusion barrier" above).

    Args:
      key_data: uint32[2] raw threefry key data (may be traced).
      offset_hi, offset_lo: uint32 scalars (may be traced; Python ints in
        ``[0, 2**32)`` are accepted), e.g. from :func:`split_offset`.
      n: number of elements, static, ``0 <= n <= 2**32``.

    Returns:
      uint32[n].
    """
    return _random_bits(*_check_stream_args(key_data, offset_hi, offset_lo), _check_n(n))


def bernoulli_mask(key_data, offset_hi, offset_lo, n: int, p) -> jax.Array:
    """Elements ``[off, off + n)`` of ``jax.random.bernoulli(key, p, (N,))`` (True = keep).

    ``p`` is cast to float32 here, so the result equals
    ``jax.random.bernoulli(wrap_key_data(key_data), jnp.float32(p), (N,))[off:off + n]``
    for any ``N >= off + n``. (JAX draws its uniforms in ``p``'s dtype, so a
    bf16/f64 ``p`` -- or a Python float under ``jax_enable_x64`` -- would give
    JAX a different mask.) Mirrors JAX's ``uniform``: the top 23 bits of each
    32-bit draw become the mantissa of a float in ``[1, 2)``, minus 1.0.

    Args:
      key_data, offset_hi, offset_lo, n: as for :func:`random_bits`.
      p: scalar keep probability (Python float or array, may be traced),
        cast to float32.

    Returns:
      bool[n], True with probability ``p``.
    """
    p = jnp.asarray(p).astype(jnp.float32)
    if p.shape != ():
        raise ValueError(f"p must be a scalar, got shape {p.shape}")
    return _bernoulli_mask(*_check_stream_args(key_data, offset_hi, offset_lo), _check_n(n), p)
