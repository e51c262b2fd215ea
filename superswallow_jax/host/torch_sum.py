"""torch's CPU ``sum(dim=0)`` of a float32 matrix, bit for bit (the sum inside
``mean(dim=0)``), emulated with NumPy while rows stream in."""

from __future__ import annotations

import numpy as np

__all__ = ["TorchDim0Sum"]

_F32 = np.dtype(np.float32)


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else (x - 1).bit_length()


class _Cascade:
    """torch's ``multi_row_sum`` (aten/native/cpu/SumKernel.cpp) over ``size``
    rows of shape ``shape``, in float32: 4 accumulator levels,
    ``2**level_power`` rows per level-0 block, rows fed in order."""

    def __init__(self, size: int, shape: tuple[int, ...]):
        self.lp = max(4, _ceil_log2(size) // 4)
        self.step = 1 << self.lp
        self.mask = self.step - 1
        self.acc = [np.zeros(shape, _F32) for _ in range(4)]
        self.count = 0

    def add_rows(self, x: np.ndarray) -> None:
        """Add rows ``x[0], x[1], ...`` (float32 ``[k, *shape]``) one after the other."""
        acc = self.acc
        i, k = 0, x.shape[0]
        while i < k:
            n = min(k - i, self.step - self.count % self.step)
            # acc0 + x[i] + x[i+1] + ... strictly left to right (accumulate is sequential)
            seg = np.concatenate([acc[0][None], x[i:i + n]])
            np.add.accumulate(seg, axis=0, out=seg)
            acc[0] = seg[-1].copy()
            i += n
            self.count += n
            if self.count % self.step == 0:
                for j in range(1, 4):
                    np.add(acc[j], acc[j - 1], out=acc[j])
                    acc[j - 1].fill(0)
                    if self.count & (self.mask << (j * self.lp)):
                        break

    def result(self) -> np.ndarray:
        r = self.acc[0].copy()
        for j in range(1, 4):
            np.add(r, self.acc[j], out=r)
        return r


class TorchDim0Sum:
    """Bit-exact float32 ``x.sum(dim=0)`` of a contiguous ``[n, hidden]`` matrix
    as torch 2.x computes it on x86-64 CPUs (also the sum inside
    ``mean(dim=0)`` for bf16/f16/f32, whose inputs are upcast to f32 first).

    Columns are split into thread chunks (``parallel_dim_reduction``: only when
    ``n * hidden >= 32768`` and ``threads > 1``; chunk bounds rounded down to 32
    columns). In a chunk of width ``w >= 8``, blocks of 32 columns use the
    cascade over all rows and the rest ``row_sum`` (4 interleaved cascades over
    ``n // 4`` rows, leftovers into lane 0, lanes folded); for ``w < 8`` groups
    of 4 columns use the cascade. ``hidden == 1`` uses the contiguous inner
    reduction (8 lanes). Not emulated: ``hidden == 1`` with several threads
    and ``n >= 32768`` (two-pass reduction). Rows are fed in order by
    :meth:`feed`; only O(hidden) state is kept.
    """

    def __init__(self, n: int, hidden: int, threads: int = 1):
        self.n, self.hidden, self.seen = n, hidden, 0
        self.inner = hidden == 1 and n >= 8
        multi: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        for b, e in self._chunks(n, hidden, threads):
            w = e - b
            blk = 32 if w >= 8 else 4
            k = (w // blk) * blk
            multi.append(np.arange(b, b + k))
            rows.append(np.arange(b + k, e))
        self.multi_cols = np.concatenate(multi) if multi else np.zeros(0, np.int64)
        self.row_cols = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        self.multi_sel = self._selector(self.multi_cols)
        self.row_sel = self._selector(self.row_cols)
        self.multi = _Cascade(n, (len(self.multi_cols),))
        self.n4 = n // 4
        self.rowc = _Cascade(self.n4, (4, len(self.row_cols)))
        self.pending: np.ndarray | None = None
        self.leftover: list[np.ndarray] = []
        self.inner_vals: list[np.ndarray] = []

    @staticmethod
    def _selector(cols: np.ndarray) -> slice | np.ndarray:
        """A slice (no copy when indexing) for a contiguous column range."""
        if len(cols) and cols[-1] - cols[0] + 1 == len(cols):
            return slice(int(cols[0]), int(cols[-1]) + 1)
        return cols

    @staticmethod
    def _chunks(n: int, hidden: int, threads: int) -> list[tuple[int, int]]:
        if threads <= 1 or n * hidden < 32768 or hidden == 1:
            return [(0, hidden)]
        nt = min(threads, hidden)
        cs = -(-hidden // nt)
        out = []
        for t in range(nt):
            b = t * cs
            if b >= hidden:
                continue
            e = min(hidden, b + cs)
            b -= b % 32
            if e != hidden:
                e -= e % 32
            if b < e:
                out.append((b, e))
        return out

    def feed(self, block: np.ndarray) -> None:
        """Add the next rows (``[k, hidden]``, any float dtype; upcast to f32)."""
        x = np.asarray(block).astype(_F32, copy=False)
        k = x.shape[0]
        if self.seen + k > self.n:
            raise ValueError(f"fed more than {self.n} rows")
        if self.inner:
            self.inner_vals.append(x[:, 0].copy())
            self.seen += k
            return
        if len(self.multi_cols):
            self.multi.add_rows(x[:, self.multi_sel])
        if len(self.row_cols):
            xr = x[:, self.row_sel]
            n_main = max(0, min(k, 4 * self.n4 - self.seen))  # rows that belong to super-rows
            main = xr[:n_main]
            if self.pending is not None:
                main = np.concatenate([self.pending, main])
            full = (main.shape[0] // 4) * 4
            if full:
                self.rowc.add_rows(main[:full].reshape(full // 4, 4, len(self.row_cols)))
            self.pending = main[full:].copy() if full < main.shape[0] else None
            for r in xr[n_main:]:
                self.leftover.append(r.copy())
        self.seen += k

    def result(self) -> np.ndarray:
        """float32 ``[hidden]``; all ``n`` rows must have been fed."""
        if self.seen != self.n:
            raise ValueError(f"fed {self.seen} rows, expected {self.n}")
        out = np.zeros(self.hidden, _F32)
        if self.inner:
            v = np.concatenate(self.inner_vals)
            vs = self.n // 8
            lanes_c = _Cascade(vs // 4, (4, 8))
            lanes_c.add_rows(v[: 32 * (vs // 4)].reshape(vs // 4, 4, 8))
            parts = lanes_c.result()
            for s in range((vs // 4) * 4, vs):
                parts[0] += v[8 * s: 8 * s + 8]
            lanes = parts[0]
            for k in range(1, 4):
                lanes = lanes + parts[k]
            acc = np.float32(0)
            for k in range(vs * 8, self.n):
                acc = np.float32(acc + v[k])
            for k in range(8):
                acc = np.float32(acc + lanes[k])
            out[0] = acc
            return out
        if len(self.multi_cols):
            out[self.multi_cols] = self.multi.result()
        if len(self.row_cols):
            parts = self.rowc.result()
            p0 = parts[0].copy()
            for r in self.leftover:
                np.add(p0, r, out=p0)
            for k in range(1, 4):
                np.add(p0, parts[k], out=p0)
            out[self.row_cols] = p0
        return out

