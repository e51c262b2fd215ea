"""Exact bit-pattern histograms of magnitudes: the k-th largest |x| without a sort.

A float's absolute value orders like the integer of its bits, so a
histogram of those integers (65536 buckets for 16-bit dtypes, a two-level
one for float32) finds the threshold of TIES's top-k and breadcrumbs' kept
range in a pass over the chunks.
"""

from __future__ import annotations

import numpy as np

from ..dtypes import NP

__all__ = ["abs_bits", "bits_to_value", "magnitude_k", "magnitude_threshold", "outlier_range", "range_keep_numpy"]


def magnitude_k(density: float, n: int) -> int:
    """Entries kept by magnitude pruning (mergekit 0.1.5: at least one; none if density <= 0)."""
    if density <= 0:
        return 0
    return max(1, int(density * n))


def abs_bits(values: np.ndarray, work: str) -> np.ndarray:
    """Unsigned integers ordered like |values| (values: float32 holding ``work`` numbers)."""
    if work == "F32":
        return values.astype(np.float32).view(np.uint32) & np.uint32(0x7FFFFFFF)
    return values.astype(NP[work]).view(np.uint16) & np.uint16(0x7FFF)


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
    return float(np.array([bits], np.uint16).view(NP[work]).astype(np.float32)[0])


def outlier_range(density: float, gamma: float, n: int) -> tuple[int, int]:
    """Descending positions ``[start, stop)`` kept by magnitude_outliers (breadcrumbs), mergekit 0.1.5.

    mergekit sorts |delta| ascending and keeps sorted positions
    ``[n_bot, n_bot + T)`` (Python slice rules) with ``T = int(density * n)``,
    ``n_top = int(gamma * n)`` and ``n_bot = max(0, n - T - n_top)``.
    """
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    kept = range(n)[n_bot : n_bot + target]
    if len(kept) == 0:
        return 0, 0
    return n - kept.stop, n - kept.start


def range_keep_numpy(a: np.ndarray, top: float, skip: int, bottom: float, quota: int) -> np.ndarray:
    """Host twin of :func:`range_keep` (for rescale statistics)."""
    tie_top = a == top
    tie_bot = a == bottom
    it = np.cumsum(tie_top) - tie_top
    ib = np.cumsum(tie_bot) - tie_bot
    return ((a < top) | (tie_top & (it >= skip))) & ((a > bottom) | (tie_bot & (ib < quota)))
