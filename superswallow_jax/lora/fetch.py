"""Chunks of ``base+adapter`` tensors, made on the device as the merge streams them.

For a chunk of flat elements ``[a, b)`` of a tensor with a LoRA, the rows
``[a // C, ceil(b / C))`` of ``W`` are read (``C`` columns), with the
matching rows of ``lhs`` (rows of ``B``; for a transposed delta, columns of
``A``) and all of ``rhs`` (``A``, or ``B^T``; kept on the device for the
tensor's chunks); the kernel (:mod:`.kernel`) adds the delta to those rows
and cuts the chunk out. Memory per chunk: the chunk's rows of ``W`` and
their ``[R, C]`` float32 product, plus ``rhs``: bounded by the chunk size and
the adapter's factors, never the merged model.

Row counts are padded to a few sizes (a chunk's rows to what the chunk
length needs, row lists to powers of two) so compiles are shared.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from typing import Callable

import jax
import numpy as np

from ..dtypes import NP
from ..io.tensor_file import TensorFile, TensorInfo
from . import kernel
from .adapted import Adaptation, LoraDelta

#: Device copies of ``rhs`` kept (one per adapted tensor recently read).
RHS_CACHE = 8


@functools.lru_cache(maxsize=64)
def _chunk_kernel(dtype: str, n: int, round_delta: bool):
    return jax.jit(lambda w, lhs, rhs, s, off, cnt: kernel.lora_chunk(w, lhs, rhs, s, off, cnt, dtype, n, round_delta))


@functools.lru_cache(maxsize=64)
def _rows_kernel(dtype: str, round_delta: bool):
    return jax.jit(lambda w, lhs, rhs, s: kernel.lora_rows(w, lhs, rhs, s, dtype, round_delta))


@functools.lru_cache(maxsize=16)
def _cast_kernel(dtype: str):
    return jax.jit(lambda x: kernel.cast(x, dtype))


def chunk_rows(n: int, cols: int) -> int:
    """Rows a flat chunk of at most ``n`` elements can touch, starting anywhere in a row of ``cols``."""
    return -(-(n + cols - 1) // cols)


def _pow2(k: int) -> int:
    return max(8, 1 << max(0, (k - 1).bit_length()))


class LoraReader:
    """Reads adapted tensors (a :class:`~.adapted.Adaptation` on a stored tensor) for :class:`~superswallow_jax.stream.InputFetcher`.

    ``file_of(model, info)``: the :class:`TensorFile` holding ``info`` in model ``model``.
    """

    def __init__(self, file_of: Callable[[int, TensorInfo], TensorFile]):
        self.file_of = file_of
        self._rhs: OrderedDict = OrderedDict()
        self._lock = threading.Lock()  # the reader pool's threads share the rhs cache

    # ------------------------------------------------------------ host reads

    def _read(self, model: int, info: TensorInfo, lo: int, hi: int, out: np.ndarray) -> None:
        """Elements ``[lo, hi)`` of ``info`` (flat) into the start of ``out``; the rest of ``out`` zeroed."""
        isz = info.np_dtype.itemsize
        flat = out.reshape(-1).view(np.uint8)
        k = (hi - lo) * isz
        if k > 0:
            self.file_of(model, info).read_into(info, lo * isz, flat[:k])
        flat[k:] = 0

    def _lhs(self, model: int, d: LoraDelta, r0: int, r1: int, rows: int) -> np.ndarray:
        """``[rows, r]``: rows ``[r0, r1)`` of ``B``, or of ``A^T`` (columns of ``A``), zero-padded."""
        if not d.transposed:
            out = np.empty((rows, d.rank), d.b.np_dtype)
            self._read(model, d.b, r0 * d.rank, r1 * d.rank, out)
            return out
        cols = d.a.shape[1]
        at = np.zeros((d.rank, rows), d.a.np_dtype)
        for k in range(d.rank):
            self._read(model, d.a, k * cols + r0, k * cols + r1, at[k])
        return np.ascontiguousarray(at.T)

    def _rhs_of(self, model: int, d: LoraDelta) -> jax.Array:
        """``[r, C]`` on the device: ``A``, or ``B^T``; kept for the tensor's next chunks."""
        key = (model, d.a.path, d.a.begin, d.b.begin)
        with self._lock:
            if key in self._rhs:
                self._rhs.move_to_end(key)
                return self._rhs[key]
        src = d.b if d.transposed else d.a
        host = np.empty(src.shape, src.np_dtype)
        self._read(model, src, 0, src.numel, host)
        val = jax.device_put(np.ascontiguousarray(host.T) if d.transposed else host)
        with self._lock:
            val = self._rhs.setdefault(key, val)  # another thread's copy, if it was first: the same values
            self._rhs.move_to_end(key)
            while len(self._rhs) > RHS_CACHE:
                self._rhs.popitem(last=False)
        return val

    # ------------------------------------------------------------ chunks

    def padded(self, model: int, info: TensorInfo, ad: Adaptation, a: int, b: int, n: int) -> jax.Array:
        """Flat elements ``[a, b)`` of the adapted tensor, zero-padded to ``n``, on the device (dtype ``ad.dtype``)."""
        d = ad.delta
        if d is None:
            raw = np.empty(n, info.np_dtype)
            self._read(model, info, a, b, raw)
            return _cast_kernel(ad.dtype)(raw)
        cols = info.shape[1]
        rows = chunk_rows(n, cols)
        r0, r1 = a // cols, -(-b // cols)
        w = np.empty((rows, cols), info.np_dtype)
        self._read(model, info, r0 * cols, min(r1 * cols, info.numel), w)
        lhs = self._lhs(model, d, r0, r1, rows)
        return _chunk_kernel(ad.dtype, n, d.embedding)(w, lhs, self._rhs_of(model, d), np.float32(d.scale),
                                                       np.int32(a - r0 * cols), np.int32(b - a))

    def chunk(self, model: int, info: TensorInfo, ad: Adaptation, a: int, b: int) -> np.ndarray:
        """Flat elements ``[a, b)`` of the adapted tensor, on the host."""
        return np.asarray(self.padded(model, info, ad, a, b, _pow2(b - a)))[: b - a]

    def rows(self, model: int, info: TensorInfo, ad: Adaptation, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (int ``[k]``) of the adapted 2-D tensor, on the host (``[k, C]``, dtype ``ad.dtype``)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        w = self.file_of(model, info).read_rows(info, ids)
        d = ad.delta
        if d is None:
            return w.astype(NP[ad.dtype])
        k = ids.size
        if k == 0:
            return np.empty((0, *info.shape[1:]), NP[ad.dtype])
        size = _pow2(k)
        wp = np.zeros((size, info.shape[1]), info.np_dtype)
        wp[:k] = w
        lhs = np.zeros((size, d.rank), (d.a if d.transposed else d.b).np_dtype)
        if d.transposed:
            lo, hi = int(ids.min()), int(ids.max()) + 1
            span = self._lhs(model, d, lo, hi, hi - lo)
            lhs[:k] = span[ids - lo]
        else:
            lhs[:k] = self.file_of(model, d.b).read_rows(d.b, ids)
        out = _rows_kernel(ad.dtype, d.embedding)(wp, lhs, self._rhs_of(model, d), np.float32(d.scale))
        return np.asarray(out)[:k]
