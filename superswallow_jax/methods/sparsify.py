"""Sparsifiers of the task-arithmetic family: which task-vector entries to keep.

Device side (pure, traceable):

* :func:`random_keep` -- DARE: entry i kept with probability ``p``, drawn from
  the tensor's key and flat index i only (see :mod:`superswallow_jax.prng`),
  so any chunk of a tensor gives the same mask as the whole tensor.
* :func:`range_keep` -- TIES (positions ``[0, k)``), breadcrumbs
  (magnitude_outliers) and SCE's top-k:
  keep the entries at positions ``[start, stop)`` of the descending magnitude
  order, given the magnitudes at both ends and per-chunk tie quotas. The
  magnitudes come from whole-tensor bit-pattern histograms
  (:func:`magnitude_threshold`, ``programs/select.py``): exact, no sort.
* :func:`della_probs` / :func:`bernoulli_keep` -- DELLA: per-row magnitude
  ranks turned into per-entry keep probabilities, then a Bernoulli draw with
  the same per-tensor key and flat offsets as DARE.
* :func:`apply_keep` -- ``delta * keep`` then the L1 rescale factor.

**Tie rule.** Magnitude rankings order entries by ``|x|`` descending and,
among equal magnitudes, by lowest flat index first (for DELLA: lowest column
first within a row). torch's sorts and ``topk`` are unstable, so mergekit
breaks ties arbitrarily; results agree with mergekit except where an entry
tied with a boundary magnitude is chosen differently.

Host side: :func:`rescale_factor`, :func:`magnitude_threshold` and
:func:`outlier_range` turn whole-tensor statistics into per-model scalars.
"""

from __future__ import annotations


import jax.numpy as jnp
from jax import lax

from .. import prng
from ..host.blocks import BLOCK
from .numerics import divide, rounder


def random_keep(key_data: jnp.ndarray, off_hi: jnp.ndarray, off_lo: jnp.ndarray, n: int, p: jnp.ndarray) -> jnp.ndarray:
    """bool[n]: Bernoulli(p) keep mask for flat indices [offset, offset + n).

    key_data: uint32[2]; off_hi/off_lo: uint32 scalars; p: float32 scalar.
    """
    return prng.bernoulli_mask(key_data, off_hi, off_lo, n, p)


def _tie_index(tie: jnp.ndarray) -> jnp.ndarray:
    """int32[n]: how many ``tie`` entries come before each position (exclusive cumsum)."""
    t = tie.astype(jnp.int32)
    return jnp.cumsum(t) - t


def _ties_from(tie: jnp.ndarray, k: jnp.ndarray) -> jnp.ndarray:
    """bool[n]: the ``tie`` entries with at least ``k`` ``tie`` entries before them.

    Same as ``tie & (_tie_index(tie) >= k)``, but the prefix count (a scan,
    many times the cost of a comparison) runs only in
    the one chunk where the boundary falls inside the ties; elsewhere ``k <=
    0`` (all of them) or ``k >=`` their count (none).
    """
    count = jnp.sum(tie, dtype=jnp.int32)
    branch = jnp.where(k <= 0, 0, jnp.where(k >= count, 1, 2))
    return lax.switch(branch, [lambda t: t, jnp.zeros_like, lambda t: t & (_tie_index(t) >= k)], tie)


def range_keep(a: jnp.ndarray, top: jnp.ndarray, skip: jnp.ndarray, bottom: jnp.ndarray, quota: jnp.ndarray) -> jnp.ndarray:
    """bool[n]: entries at positions ``[start, stop)`` of the descending order of ``a``.

    a: float32[n] magnitudes (>= 0); top: the magnitude at position ``start``;
    bottom: the magnitude at position ``stop - 1``; skip: entries equal to
    ``top`` in this chunk still to be dropped (they precede the range);
    quota: entries equal to ``bottom`` in this chunk still allowed (int32
    scalars, counted from the chunk start; may be negative or exceed the
    chunk). An empty range is ``bottom = +inf, quota = 0``.
    """
    tie_top = a == top
    tie_bot = a == bottom
    below_start = (a < top) | _ties_from(tie_top, skip)
    above_stop = (a > bottom) | (tie_bot & ~_ties_from(tie_bot, quota))
    return below_start & above_stop


def bernoulli_keep(key_data: jnp.ndarray, off_hi: jnp.ndarray, off_lo: jnp.ndarray, n: int, p: jnp.ndarray) -> jnp.ndarray:
    """bool[n]: entry i kept with probability ``p[i]`` (float32[n]), flat indices [offset, offset + n).

    The uniform of entry i is the one :func:`random_keep` compares with a
    scalar ``p`` (JAX's ``uniform``: top 23 bits of the threefry word), so this
    equals ``jax.random.bernoulli(key, p_full)[offset:offset + n]``.
    """
    bits = prng.random_bits(key_data, off_hi, off_lo, n)
    u = lax.bitcast_convert_type((bits >> jnp.uint32(9)) | jnp.uint32(0x3F800000), jnp.float32) - jnp.float32(1.0)
    return u < p


def _descending_positions(delta_rows: jnp.ndarray, work: str) -> jnp.ndarray:
    """int32[R, C]: each entry's position in its row's order by ``|x|`` descending, lowest column first among equals.

    For 16-bit work dtypes (|x| fits in 15 bits) and rows of at most 65536
    columns, magnitude and column pack into one uint32 key, and two
    single-operand sorts replace two (key, payload) sorts, which XLA:CPU does
    several times faster. Same order, same result
    (NaN payload bits aside: NaNs from bf16 inputs have none).
    """
    rows, cols = delta_rows.shape
    col = lax.broadcasted_iota(jnp.uint32, (rows, cols), 1)
    if work in ("BF16", "F16") and cols <= 1 << 16:
        if work == "BF16":  # a bf16 value's float32 bits end in 16 zero bits
            mag = (lax.bitcast_convert_type(delta_rows, jnp.uint32) >> 16) & jnp.uint32(0x7FFF)
        else:
            mag = lax.bitcast_convert_type(delta_rows.astype(jnp.float16), jnp.uint16).astype(jnp.uint32) & jnp.uint32(0x7FFF)
        order = lax.sort(((jnp.uint32(0x7FFF) - mag) << 16) | col, dimension=1)  # ascending key: descending |x|, then column
        perm = order & jnp.uint32(0xFFFF)  # the column at each position
        inverse = lax.sort((perm << 16) | col, dimension=1)  # by column; low bits: its position
        return (inverse & jnp.uint32(0xFFFF)).astype(jnp.int32)
    mag = lax.bitcast_convert_type(jnp.abs(delta_rows), jnp.uint32)
    icol = col.astype(jnp.int32)
    _, perm = lax.sort((jnp.uint32(0xFFFFFFFF) - mag, icol), dimension=1, is_stable=True, num_keys=1)
    _, pos = lax.sort((perm, icol), dimension=1, is_stable=True, num_keys=1)
    return pos


def della_probs(delta_rows: jnp.ndarray, c0: jnp.ndarray, eps: jnp.ndarray, *, work: str) -> jnp.ndarray:
    """DELLA keep probabilities for whole rows, as mergekit 0.1.5 computes them in ``work``.

    delta_rows: float32[R, C] task-vector rows; c0 = rnd_work(density - epsilon)
    and eps = float32(epsilon) (scalars). With r the ascending magnitude rank
    (1..C) of an entry in its row (ties: see the module's tie rule):

        rk = rnd(r);  rn = clip(rnd(rnd(rk - 1) / rnd(rnd(C) - 1)), 0, 1)
        p  = rnd(c0 + rnd(rnd(rn * 2) * eps))
    """
    rnd = rounder(work)
    rows, cols = delta_rows.shape
    pos = _descending_positions(delta_rows, work)
    rk = rnd((cols - pos).astype(jnp.float32))
    one = jnp.float32(1.0)
    span = rnd(rnd(jnp.float32(cols)) - one)
    rn = jnp.clip(rnd(divide(rnd(rk - one), span)), 0.0, 1.0)
    return rnd(c0 + rnd(rnd(rn * jnp.float32(2.0)) * eps))


def apply_keep(delta: jnp.ndarray, keep: jnp.ndarray, factor: jnp.ndarray, *, work: str, d: str) -> jnp.ndarray:
    """``rnd_d(rnd_work(delta * keep) * factor)`` (factor 1.0 = no rescale). float32 in and out."""
    rw = rounder(work)
    kept = delta * keep.astype(jnp.float32)  # keeps the sign of zeros, like torch's delta * mask
    return rounder(d)(rw(kept * factor))




def block_sums(x: jnp.ndarray) -> jnp.ndarray:
    """float32[n // BLOCK]: sums of consecutive BLOCK-element blocks of float32[n] ``x``.

    Each block is summed by an explicit pairwise tree (adjacent pairs, 10
    levels), every add an IEEE float32 add, so the result is the same on any
    backend, device count or chunking (chunk offsets are multiples of BLOCK).
    ``n`` must be a multiple of BLOCK.
    """
    y = x.reshape(-1, BLOCK)
    while y.shape[1] > 1:
        y = y[:, 0::2] + y[:, 1::2]
    return y[:, 0]
