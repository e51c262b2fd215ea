"""Chunk-invariant per-vector statistics of a flattened tensor (host side, NumPy).

The geometric methods reduce *vectors* of a tensor: the whole flattened
tensor, each row along the last axis, or each column along the first axis
(``nuslerp_row_wise``). A tensor arrives in chunks of the flat index range
whose boundaries are multiples of :data:`BLOCK`; the sums here never depend on
where those boundaries lie:

* ``flat``: float64 sums of fixed :data:`BLOCK`-element blocks, combined with
  ``math.fsum`` (as :func:`superswallow_jax.host.blocks.block_l1`);
* ``rows``: float64 sums of the pieces a row is cut into by the block grid,
  added to the row's accumulator in index order;
* ``cols``: each element added to its column's float64 accumulator in index
  (row) order.

Each piece is summed whole within one chunk and the accumulation order is the
flat index order, so any chunk size gives the same bits.

:class:`LaneSumSq` instead reproduces torch's own float32 order for
``linalg.vector_norm`` of a flat vector (8 lanes carried across chunks). Its
serial per-lane chains run as an XLA:CPU ``scan`` (:func:`lane_chain`) where
they are long, because NumPy pays per row there.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import numpy as np
from jax import lax

from .blocks import BLOCK  # chunk boundaries are multiples of it


@dataclass(frozen=True)
class Layout:
    """How a flat tensor of ``numel`` elements splits into vectors.

    kind ``flat``: one vector; ``rows``: ``numel // length`` rows of the last
    axis; ``cols``: ``count`` vectors along axis 0, element ``i`` in vector
    ``i % count``.
    """

    kind: str
    numel: int
    length: int
    count: int

    @staticmethod
    def flat(shape: tuple[int, ...]) -> "Layout":
        n = math.prod(shape)
        return Layout("flat", n, n, 1)

    @staticmethod
    def rows(shape: tuple[int, ...]) -> "Layout":
        """Vectors along the last axis (a 1-D or 0-D tensor is one vector)."""
        n = math.prod(shape)
        if len(shape) <= 1 or n == 0:
            return Layout.flat(shape)
        return Layout("rows", n, shape[-1], n // shape[-1])

    @staticmethod
    def cols(shape: tuple[int, ...]) -> "Layout":
        """Vectors along the first axis (``x.transpose(0, -1)`` rows); 1-D: one vector."""
        n = math.prod(shape)
        if len(shape) <= 1 or n == 0:
            return Layout.flat(shape)
        return Layout("cols", n, shape[0], n // shape[0])

    def ids(self, a: int, b: int) -> np.ndarray:
        """Vector index of each flat element in [a, b)."""
        i = np.arange(a, b, dtype=np.int64)
        if self.kind == "flat":
            return np.zeros(b - a, np.int64)
        if self.kind == "rows":
            return i // self.length
        return i % self.count

    def take(self, values: np.ndarray, a: int, b: int) -> np.ndarray:
        """``values[self.ids(a, b)]`` as float32, without building the index array.

        Rows: each row's value repeated ``length`` times; columns: the values
        tiled (element ``i`` belongs to vector ``i % count``). A fraction of
        the cost of the int64 index arithmetic and gather.
        """
        v = np.asarray(values, np.float32).reshape(-1)
        if self.kind == "flat":
            return np.full(b - a, v[0], np.float32)
        if self.kind == "rows":
            r0, r1 = a // self.length, -(-b // self.length)
            return np.repeat(v[r0:r1], self.length)[a - r0 * self.length : b - r0 * self.length]
        start = a % self.count
        return np.tile(v, -(-(start + b - a) // self.count))[start : start + b - a]

    def expand(self, values: np.ndarray, a: int, b: int, n: int, fill: float = 1.0) -> np.ndarray:
        """Per-vector ``values`` as a float32 array over elements [a, b), padded to ``n``."""
        out = np.full(n, np.float32(fill), np.float32)
        out[: b - a] = self.take(values, a, b)
        return out


class VectorSums:
    """Float64 sums of ``k`` per-element term arrays over the vectors of ``layout``."""

    def __init__(self, layout: Layout, k: int):
        self.layout = layout
        self.k = k
        if layout.kind == "flat":
            self.blocks: list[list[float]] = [[] for _ in range(k)]
        else:
            self.acc = np.zeros((k, layout.count), np.float64)

    def add(self, a: int, b: int, terms) -> None:
        """Add the terms of elements [a, b) (``k`` arrays of at least ``b - a`` values)."""
        assert a % BLOCK == 0
        lay = self.layout
        for j, t in enumerate(terms):
            v = np.asarray(t)[: b - a].astype(np.float64)
            if lay.kind == "flat":
                self.blocks[j] += _block_sums(v)
            elif lay.kind == "rows":
                starts = _piece_starts(a, b, lay.length)
                sums = np.add.reduceat(v, starts - a) if v.size else np.zeros(0)
                np.add.at(self.acc[j], starts // lay.length, sums)
            else:
                _add_cols(self.acc[j], v, a, lay.count)

    def totals(self) -> np.ndarray:
        """float64[k, count]: the sums."""
        if self.layout.kind == "flat":
            return np.array([[math.fsum(bl)] for bl in self.blocks], np.float64).reshape(self.k, 1)
        return self.acc.copy()

    def part_totals(self, part: int) -> np.ndarray:
        """flat only: float64[k, parts], sums over consecutive ``part``-element parts."""
        assert self.layout.kind == "flat" and part % BLOCK == 0
        per = part // BLOCK
        out = []
        for bl in self.blocks:
            out.append([math.fsum(bl[i : i + per]) for i in range(0, max(1, len(bl)), per)])
        return np.array(out, np.float64)


class VectorMax:
    """Per-vector maxima (exact, so any chunking and order gives the same result)."""

    def __init__(self, layout: Layout, k: int):
        self.layout = layout
        self.acc = np.full((k, layout.count), -np.inf, np.float64)

    def add(self, a: int, b: int, terms) -> None:
        lay = self.layout
        for j, t in enumerate(terms):
            v = np.asarray(t)[: b - a].astype(np.float64)
            if lay.kind == "flat":
                self.acc[j, 0] = max(self.acc[j, 0], float(v.max(initial=-np.inf)))
            elif lay.kind == "rows":
                starts = _piece_starts(a, b, lay.length)
                np.maximum.at(self.acc[j], starts // lay.length, np.maximum.reduceat(v, starts - a))
            else:
                np.maximum.at(self.acc[j], lay.ids(a, b), v)

    def totals(self) -> np.ndarray:
        return self.acc.copy()


def _block_sums(v: np.ndarray) -> list[float]:
    nfull = v.size // BLOCK
    sums = list(v[: nfull * BLOCK].reshape(nfull, BLOCK).sum(axis=1)) if nfull else []
    if v.size % BLOCK:
        sums.append(float(v[nfull * BLOCK :].sum()))
    return [float(s) for s in sums]


def _piece_starts(a: int, b: int, length: int) -> np.ndarray:
    """Starts of the pieces of [a, b) cut at multiples of BLOCK and of ``length``."""
    blocks = np.arange(a, b, BLOCK, dtype=np.int64)
    first_row = -(-a // length) * length
    rows = np.arange(first_row, b, length, dtype=np.int64)
    return np.union1d(blocks, rows)


def _add_cols(acc: np.ndarray, v: np.ndarray, a: int, m: int) -> None:
    """acc[i % m] += v[i - a] for i in [a, a + len(v)), in increasing i."""
    i = a
    end = a + v.size
    while i < end:
        j = i % m
        stop = min(end, i + (m - j))
        acc[j : j + (stop - i)] += v[i - a : stop - a]
        i = stop


LANES = 8  # float32 lanes of torch's vectorized CPU norm kernel (AVX2 width, also used on AVX512 hosts)

#: Chains shorter than this many rows are summed by NumPy (a program call costs more).
CHAIN_MIN_ROWS = 1 << 13


@functools.lru_cache(maxsize=64)
def _chain_program():
    """(CPU device, jitted scan) for :func:`lane_chain`, or None where JAX has no CPU backend."""
    try:
        cpu = jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # e.g. JAX_PLATFORMS=cuda
        return None
    return cpu, jax.jit(lambda acc, rows: lax.scan(lambda c, r: (c + r, None), acc, rows, unroll=8)[0])


def lane_chain(rows: np.ndarray) -> np.ndarray:
    """Column sums in row order: ``((rows[0] + rows[1]) + rows[2]) + ...``, every add a float32 add.

    rows: float32[r, w], C-contiguous, every value >= +0 (sums of squares; a
    running total goes into row 0). Returns a new float32[w] (zeros if r = 0).

    NumPy's reduction over the outer axis adds in this order (no pairwise
    regrouping: that happens only along the contiguous axis; bit-equal to
    ``np.add.accumulate(rows, axis=0)[-1]``), but pays a fixed cost per row,
    several times what a ``lax.scan`` on XLA:CPU takes (docs/performance.md).
    Long chains are padded with zero rows to a power of two (a few
    compiled shapes; ``c + 0 == c`` exactly for ``c >= +0``, as is ``0 + c``
    for the scan's start) and run on the host's CPU device whatever the
    default backend, so the bits are the same everywhere.
    """
    r, w = rows.shape
    prog = _chain_program() if r >= CHAIN_MIN_ROWS else None
    if prog is None:
        return rows.sum(axis=0, dtype=np.float32)
    cpu, fn = prog
    n = 1 << (r - 1).bit_length()
    if n != r:
        rows = np.concatenate([rows, np.zeros((n - r, w), np.float32)])
    return np.asarray(fn(jax.device_put(np.zeros(w, np.float32), cpu), jax.device_put(rows, cpu)))


class LaneSumSq:
    """torch's float32 sum of squares for ``linalg.vector_norm`` of flat vectors, bit for bit.

    torch CPU reduces a contiguous float32 vector (one output) in 8 float32
    lanes: element ``i`` of the first ``n - n % 8`` goes to lane ``i % 8``, which
    adds ``x * x`` (rounded to float32, no FMA) in index order; the lanes are then
    summed left to right and the last ``n % 8`` squares added one by one. The
    result does not depend on torch's thread count. Emulated here by carrying
    the 8 lane sums from chunk to chunk (chunk starts are multiples of 8), so
    any chunking gives the same bits. With ``part``, each consecutive
    ``part``-element slice is its own vector (mergekit's slerp norms parts of
    2^20 elements). ``torch.norm`` of a bf16/fp16 vector loads 16 elements at a
    time into two 8-lane float32 halves (the same lane order); pass ``block=16``.
    """

    def __init__(self, numel: int, k: int, part: int | None = None, block: int = LANES):
        self.part = part or max(1, numel)
        assert self.part % LANES == 0 or part is None
        self.numel = numel
        self.block = block  # elements per vector load: the lanes cover len - len % block
        n_parts = max(1, -(-numel // self.part))
        self.acc = np.zeros((k, n_parts, LANES), np.float32)
        self.tails: list[list[list[np.ndarray]]] = [[[] for _ in range(n_parts)] for _ in range(k)]

    def add(self, a: int, b: int, values) -> None:
        """Add elements [a, b) of each of the ``k`` vectors (float32-valued arrays)."""
        assert a % LANES == 0
        xs = [np.asarray(v)[: b - a].astype(np.float32, copy=False) for v in values]
        k = len(xs)
        for p in range(a // self.part, -(-b // self.part)):
            p0 = p * self.part
            p1 = min(self.numel, p0 + self.part)
            s, e = max(a, p0), min(b, p1)
            main_end = p1 - (p1 - p0) % self.block
            m = max(0, min(e, main_end) - s)
            if m:
                # All k vectors side by side, [rows, k, 8]: one chain per (vector, lane).
                sq = np.empty((m // LANES, k, LANES), np.float32)
                for j, x in enumerate(xs):
                    xm = x[s - a : s - a + m].reshape(-1, LANES)
                    np.multiply(xm, xm, out=sq[:, j, :])  # float32 squares, rounded once (no FMA)
                sq[0] += self.acc[:, p]  # the running lane sums come first in each chain
                self.acc[:, p] = lane_chain(sq.reshape(-1, k * LANES)).reshape(k, LANES)
            if s + m < e:
                for j, x in enumerate(xs):
                    self.tails[j][p].append(x[s - a + m : e - a])

    def sums(self) -> np.ndarray:
        """float32[k, parts]: the float32 sums of squares."""
        k, n_parts, _ = self.acc.shape
        out = np.zeros((k, n_parts), np.float32)
        for j in range(k):
            for p in range(n_parts):
                t = self.acc[j, p, 0]
                for lane in range(1, LANES):
                    t = np.float32(t + self.acc[j, p, lane])
                for x in (np.concatenate(self.tails[j][p]) if self.tails[j][p] else ()):
                    t = np.float32(t + np.float32(x * x))
                out[j, p] = t
        return out
