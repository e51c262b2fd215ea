"""Exact whole-tensor magnitude selection in bounded memory (host side).

A selector keeps the entries at positions ``[start, stop)`` of a tensor's
descending magnitude order (ties: lowest flat index first). Breadcrumbs keeps a
middle range of |delta|; SCE keeps the top k of the per-entry variance.

Nothing is sorted and no per-entry state is kept across chunks:

1. a histogram of the magnitudes' bit patterns (15 bits for 16-bit dtypes,
   the high 16 bits for float32) gives the bucket of the entries at
   positions ``start`` and ``stop - 1``;
2. float32 only: histograms of the low 16 bits inside those buckets make
   both magnitudes exact;
3. a last pass counts, per chunk, the entries equal to either magnitude (so
   each chunk knows its tie quota) and, when asked, the L1 norms of all and of
   the kept entries (fixed 1024-element float64 blocks, then ``math.fsum``).

Each pass calls ``keys(a, b)`` for the chunks in order; it returns, per
selector, the magnitudes' bit patterns (:func:`~superswallow_jax.host.histogram.abs_bits`)
of elements ``[a, b)``, or ``None`` for a selector that is not needed. The
result is the same for any chunk size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from ..dtypes import NP
from ..host import blocks
from ..host import histogram as hh

Keys = Callable[[int, int], Sequence["np.ndarray | None"]]


@dataclass
class Selection:
    """Where a selector's kept range starts and ends, and its per-chunk tie counts."""

    start: int
    stop: int
    top: float = np.inf  # magnitude at position ``start``
    top_before: int = 0  # entries strictly larger than ``top``
    bottom: float = np.inf  # magnitude at position ``stop - 1``
    bottom_before: int = 0  # entries strictly larger than ``bottom``
    top_ties: dict[int, int] = field(default_factory=dict)  # chunk start -> entries == top
    bottom_ties: dict[int, int] = field(default_factory=dict)
    l1_full: float = 0.0
    l1_kept: float = 0.0

    @property
    def empty(self) -> bool:
        return self.stop <= self.start

    def quotas(self) -> "QuotaCursor":
        return QuotaCursor(self)


class QuotaCursor:
    """Per-chunk ``(skip, quota)`` for :func:`~superswallow_jax.methods.sparsify.range_keep`, chunks in order."""

    def __init__(self, sel: Selection):
        self.sel = sel
        self.seen_top = 0
        self.seen_bottom = 0

    def next(self, a: int) -> tuple[int, int]:
        s = self.sel
        if s.empty:
            return 0, 0
        skip = (s.start - s.top_before) - self.seen_top
        quota = (s.stop - s.bottom_before) - self.seen_bottom
        self.seen_top += s.top_ties.get(a, 0)
        self.seen_bottom += s.bottom_ties.get(a, 0)
        return _i32(skip), _i32(quota)


def _i32(x: int) -> int:
    return int(min(max(x, -(2**31)), 2**31 - 1))


def _bits_values(bits: np.ndarray, work: str) -> np.ndarray:
    if work == "F32":
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    return bits.astype(np.uint16).view(NP[work]).astype(np.float64)


_NB = 1 << 15  # sign bit cleared: 15 bits (16-bit dtypes) or the high 15 of float32's 31


def _histograms(chunk_iter, keys: Keys, shift: int) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """Pass 1: per selector, the (high) bit-pattern histogram and the exact count of zeros."""
    hist: dict[int, np.ndarray] = {}
    zeros: dict[int, int] = {}
    for a, b in chunk_iter():
        for j, bits in enumerate(keys(a, b)):
            if bits is None:
                continue
            if j not in hist:
                hist[j], zeros[j] = np.zeros(_NB, np.int64), 0
            hist[j] += np.bincount((bits >> shift).astype(np.int64), minlength=_NB)
            zeros[j] += int(np.count_nonzero(bits == 0))
    return hist, zeros


def _refine_low_bits(chunk_iter, keys: Keys, sels: list, ends: dict[int, list[tuple[int, int]]]) -> None:
    """Pass 2 (float32 only): the low 16 bits inside the two buckets make ``ends`` exact (in place)."""
    low = {j: [np.zeros(1 << 16, np.int64), np.zeros(1 << 16, np.int64)] for j in ends}
    for a, b in chunk_iter():
        res = keys(a, b)
        for j in ends:
            hi = res[j] >> 16
            for e, (hb, _) in enumerate(ends[j]):
                sel_low = (res[j][hi == hb] & 0xFFFF).astype(np.int64)
                low[j][e] += np.bincount(sel_low, minlength=1 << 16)
    for j in ends:
        s = sels[j]
        exact = []
        for e, ((hb, above_hi), k) in enumerate(zip(ends[j], (s.start + 1, s.stop))):
            lb, above_lo = hh.magnitude_threshold(low[j][e], k - above_hi)
            exact.append(((hb << 16) | lb, above_hi + above_lo))
        ends[j] = exact


def _last_pass(chunk_iter, keys: Keys, sels: list, active: list[int], tie_bits: dict[int, tuple[int, int]],
               work: str, l1: bool, visit) -> None:
    """Per-chunk tie counts (and keep masks for ``l1`` norms and ``visit``)."""
    full: dict[int, list[float]] = {j: [] for j in active}
    kept: dict[int, list[float]] = {j: [] for j in active}
    cursors = {j: sels[j].quotas() for j in active}
    for a, b in chunk_iter():
        res = keys(a, b)
        keeps: list[np.ndarray | None] = [None] * len(sels)
        for j in active:
            s = sels[j]
            bits = res[j]
            if not s.empty:
                s.top_ties[a] = int(np.count_nonzero(bits == tie_bits[j][0]))
                s.bottom_ties[a] = int(np.count_nonzero(bits == tie_bits[j][1]))
            if not (l1 or visit):
                continue
            vals = _bits_values(bits, work)
            skip, quota = cursors[j].next(a)
            keeps[j] = np.zeros(bits.shape, bool) if s.empty else hh.range_keep_numpy(vals, s.top, skip, s.bottom, quota)
            if l1:
                full[j] += blocks.block_l1(vals)
                kept[j] += blocks.block_l1(vals * keeps[j])
        if visit is not None:
            visit(a, b, keeps)
    if l1:
        for j in active:
            sels[j].l1_full = blocks.total(full[j])
            sels[j].l1_kept = blocks.total(kept[j])


def select_ranges(
    chunks: Iterable[tuple[int, int]] | Callable[[], Iterable[tuple[int, int]]],
    keys: Keys,
    ranges: Sequence[tuple[int, int] | None] | Callable[[list[int]], Sequence[tuple[int, int] | None]],
    work: str,
    *,
    l1: bool = False,
    visit: Callable[[int, int, list["np.ndarray | None"]], None] | None = None,
) -> list[Selection | None]:
    """One :class:`Selection` per range (``None`` where the range is ``None``).

    ``chunks()`` yields the ``[a, b)`` ranges in order (called once per pass);
    ``work`` is the dtype whose bit patterns ``keys`` returns ("F32" or a
    16-bit code). ``ranges`` may be a function of the per-selector counts of
    zero magnitudes (known after the first pass; SCE's k depends on it).
    ``l1`` also fills ``l1_full``/``l1_kept`` (sums of the magnitudes of all
    and of the kept entries); ``visit(a, b, keeps)``, if given, sees every
    chunk's keep masks in the last pass, right after ``keys(a, b)``.
    """
    chunk_iter = chunks if callable(chunks) else (lambda c=list(chunks): c)
    wide = work == "F32"
    hist, zeros = _histograms(chunk_iter, keys, 16 if wide else 0)
    if callable(ranges):
        ranges = ranges([zeros.get(j, 0) for j in range(max(hist, default=-1) + 1)])
    sels: list[Selection | None] = [None if r is None else Selection(*r) for r in ranges]
    active = [j for j, s in enumerate(sels) if s is not None and j in hist]
    if not active:
        return sels
    # bucket (and count above it) of positions start and stop - 1
    ends = {j: [hh.magnitude_threshold(hist[j], sels[j].start + 1), hh.magnitude_threshold(hist[j], sels[j].stop)]
            for j in active if not sels[j].empty}
    if wide and ends:
        _refine_low_bits(chunk_iter, keys, sels, ends)
    tie_bits: dict[int, tuple[int, int]] = {}
    for j, ((tb, tbefore), (bb, bbefore)) in ends.items():
        s = sels[j]
        s.top, s.top_before = hh.bits_to_value(int(tb), work), tbefore
        s.bottom, s.bottom_before = hh.bits_to_value(int(bb), work), bbefore
        tie_bits[j] = (int(tb), int(bb))
    _last_pass(chunk_iter, keys, sels, active, tie_bits, work, l1, visit)
    return sels
