"""Sparsifiers of the task-arithmetic family: which task-vector entries to keep.

Device side (pure, traceable):

* :func:`random_keep` -- DARE: entry i kept with probability ``p``, drawn from
  the tensor's key and flat index i only (see :mod:`superswallow_jax.prng`),
  so any chunk of a tensor gives the same mask as the whole tensor.
* :func:`magnitude_keep` -- TIES: keep entries with ``|delta| > T`` and the
  first ``quota`` entries (by flat index) with ``|delta| == T``. The threshold
  ``T`` and the tie quota come from a whole-tensor histogram
  (:func:`magnitude_threshold`), so selection is exact without a sort. Our tie
  rule (lowest flat index first) is deterministic; torch's is unspecified.
* :func:`apply_keep` -- ``delta * keep`` then the L1 rescale factor.

Host side: :func:`rescale_factor` and :func:`magnitude_threshold` turn
whole-tensor statistics into per-model scalars.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .. import prng
from .numerics import rounder


def random_keep(key_data: jnp.ndarray, off_hi: jnp.ndarray, off_lo: jnp.ndarray, n: int, p: jnp.ndarray) -> jnp.ndarray:
    """bool[n]: Bernoulli(p) keep mask for flat indices [offset, offset + n).

    key_data: uint32[2]; off_hi/off_lo: uint32 scalars; p: float32 scalar.
    """
    return prng.bernoulli_mask(key_data, off_hi, off_lo, n, p)


def magnitude_keep(delta: jnp.ndarray, threshold: jnp.ndarray, quota: jnp.ndarray) -> jnp.ndarray:
    """bool[n]: keep ``|delta| > threshold``, plus the first ``quota`` ties.

    delta: float32[n]; threshold: float32 scalar; quota: int32 scalar (ties
    still allowed in this chunk, counted from its start).
    """
    a = jnp.abs(delta)
    tie = a == threshold
    before = jnp.cumsum(tie.astype(jnp.int32)) - tie.astype(jnp.int32)
    return (a > threshold) | (tie & (before < quota))


def apply_keep(delta: jnp.ndarray, keep: jnp.ndarray, factor: jnp.ndarray, *, work: str, d: str) -> jnp.ndarray:
    """``rnd_d(rnd_work(delta * keep) * factor)`` (factor 1.0 = no rescale). float32 in and out."""
    rw = rounder(work)
    kept = delta * keep.astype(jnp.float32)  # keeps the sign of zeros, like torch's delta * mask
    return rounder(d)(rw(kept * factor))


_NP = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32)}


def round_scalar(x: float, code: str) -> float:
    """Round a Python float to dtype ``code`` through float32 (as torch does for a f32 sum)."""
    return float(np.float32(x).astype(_NP[code]).astype(np.float32))


def rescale_factor(l1_full: float, l1_kept: float, work: str) -> float:
    """mergekit's L1 rescale: ||delta||_1 / ||delta*m||_1 in the work dtype, or 1.0.

    Both norms are rounded to ``work`` first; below 1e-7 the vector is left unscaled.
    """
    a = round_scalar(l1_full, work)
    b = round_scalar(l1_kept, work)
    if a < 1e-7 or b < 1e-7:
        return 1.0
    return round_scalar(float(np.float32(a) / np.float32(b)), work)


BLOCK = 1 << 10


def block_l1(values: np.ndarray) -> list[float]:
    """Per-block (BLOCK = 1024 elements, from the array start) float64 sums of |values|.

    Chunk offsets are multiples of BLOCK, so the blocks -- and the total
    ``math.fsum`` of them -- do not depend on the chunking.
    """
    a = np.abs(values.astype(np.float64))
    nfull = a.size // BLOCK
    sums = list(a[: nfull * BLOCK].reshape(nfull, BLOCK).sum(axis=1)) if nfull else []
    if a.size % BLOCK:
        sums.append(float(a[nfull * BLOCK :].sum()))
    return [float(s) for s in sums]


def total(blocks: list[float]) -> float:
    return math.fsum(blocks)


def magnitude_k(density: float, n: int) -> int:
    """Entries kept by magnitude pruning (mergekit 0.1.5: at least one; none if density <= 0)."""
    if density <= 0:
        return 0
    return max(1, int(density * n))


def abs_bits(values: np.ndarray, work: str) -> np.ndarray:
    """Unsigned integers ordered like |values| (values: float32 holding ``work`` numbers)."""
    if work == "F32":
        return values.astype(np.float32).view(np.uint32) & np.uint32(0x7FFFFFFF)
    return values.astype(_NP[work]).view(np.uint16) & np.uint16(0x7FFF)


def magnitude_threshold(hist: np.ndarray, k: int, shift: int = 0) -> tuple[int, int]:
    """From a histogram of abs-bit patterns, the bucket holding the k-th largest and
    how many entries lie strictly above that bucket. Returns (bucket, count_above)."""
    if k <= 0:
        return len(hist), 0  # nothing kept: threshold above every value
    csum_from_top = np.cumsum(hist[::-1])
    idx = int(np.searchsorted(csum_from_top, k))  # first position where cumulative >= k
    bucket = len(hist) - 1 - idx
    above = int(csum_from_top[idx - 1]) if idx > 0 else 0
    return bucket, above


def bits_to_value(bits: int, work: str) -> float:
    """The float32 value of an abs-bit pattern of dtype ``work``."""
    if work == "F32":
        return float(np.array([bits], np.uint32).view(np.float32)[0])
    return float(np.array([bits], np.uint16).view(_NP[work]).astype(np.float32)[0])
