"""The read path shared by every weight format: tensors at known byte ranges of a file.

A format reader (:mod:`.reader` for safetensors, :mod:`.torch_zip` for
PyTorch ``.bin``) validates its file and describes each tensor as a
:class:`TensorInfo`: dtype code, shape and the absolute byte range
``[begin, end)`` of its row-major (C-contiguous) data inside the file.
:class:`TensorFile` then reads those ranges the same way for every format:

* ``read_into``: ``pread`` into a caller's buffer (no page of the file is
  mapped), asking with ``RWF_NOWAIT`` until a read first misses the page cache;
* ``read_rows``: rows of the first axis, one ``pread`` per run of ids;
* ``prefetch`` / ``release``: read-ahead hints and ``MADV_DONTNEED``;
* ``view``: a zero-copy ``np.memmap`` view.

Several tensors may share bytes (tied weights in a PyTorch file): reads are
read-only, so that is harmless.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ..dtypes import NP
from ..errors import SafetensorsError

#: ``preadv2`` flag: fail with EAGAIN rather than wait for the disk (Linux >= 4.14); 0 where absent.
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)

#: dtype code -> numpy dtype (:mod:`superswallow_jax.dtypes`). Only float
#: formats are mergeable; the integer and bool codes are readable so that
#: buffers can be passed through.
DTYPES: Mapping[str, np.dtype] = NP


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. ``begin``/``end`` are absolute file offsets of
    its C-contiguous data (``end - begin == numel * itemsize``)."""

    name: str
    dtype: str  # dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    path: Path
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


def fail(path: Path, msg: str) -> SafetensorsError:
    """The one-line error of a weight file: ``<path>: <msg>``."""
    return SafetensorsError(f"{path}: {msg}")


class TensorFile:
    """One validated weight file: its tensors and the shared read path.

    Subclasses validate the file and pass ``tensors`` (name -> TensorInfo,
    every range inside ``[0, file_size)``). The memory map and the file
    descriptor are opened lazily and closed by :meth:`close`.
    """

    def __init__(self, path: Path, tensors: Mapping[str, TensorInfo], file_size: int):
        self.path = Path(path)
        self.tensors = tensors
        self.file_size = file_size
        self._map: np.memmap | None = None
        self._fd: int | None = None
        self._open_lock = threading.Lock()
        # Set once a read finds bytes outside the page cache (or where that
        # cannot be asked): only then are read-ahead hints worth their cost.
        self._cold = _RWF_NOWAIT == 0

    def _mapping(self) -> np.memmap:
        if self._map is None:
            if self.file_size == 0:  # pragma: no cover - rejected by the format checks
                raise fail(self.path, "empty file")
            try:
                self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as e:
                raise fail(self.path, f"cannot memory-map: {e}") from None
            if len(self._map) != self.file_size:
                raise fail(self.path, "file size changed while reading")
        return self._map

    def view(self, name: str) -> np.ndarray:
        """Zero-copy view of tensor ``name`` (shape and dtype from the header)."""
        return self.view_of(self.tensors[name])

    def view_of(self, info: TensorInfo) -> np.ndarray:
        """Zero-copy view of the tensor ``info`` describes (a tensor of this file, under any name)."""
        raw = self._mapping()[info.begin : info.end]
        if info.begin % info.np_dtype.itemsize == 0:
            return raw.view(info.np_dtype).reshape(info.shape)
        # Misaligned for the element type: numpy still allows an unaligned view.
        return np.ndarray(info.shape, info.np_dtype, buffer=raw)

    def read_into(self, info: TensorInfo, begin: int, out: np.ndarray) -> None:
        """Copy bytes ``[begin, begin + out.nbytes)`` of tensor ``info`` into ``out``.

        ``out``: a writable, C-contiguous array (any dtype); filled with
        ``pread`` (the GIL is released while the kernel copies), so no page of
        the file is mapped into this process. Until a read has found bytes
        outside the page cache it asks with ``RWF_NOWAIT`` first (which tells
        :meth:`prefetch` whether hints are worth sending). Raises
        SafetensorsError if the range is outside the tensor or the file is
        shorter than its header says.
        """
        n = out.nbytes
        if begin < 0 or begin + n > info.nbytes:
            raise fail(self.path, f"tensor {info.name}: read of bytes [{begin}, {begin + n}) outside its {info.nbytes}")
        fd = self._descriptor()
        mv = memoryview(out).cast("B")
        pos, done = info.begin + begin, 0
        while done < n:
            try:
                if self._cold:
                    got = os.preadv(fd, [mv[done:]], pos + done)
                else:  # fails instead of waiting for the disk (a short read: part of it was cached)
                    got = os.preadv(fd, [mv[done:]], pos + done, _RWF_NOWAIT)
            except BlockingIOError:
                self._cold = True  # not in the page cache: read it the ordinary way
                continue
            except OSError as e:
                if not self._cold and e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # no RWF_NOWAIT here
                    self._cold = True
                    continue
                raise fail(self.path, f"read error in tensor {info.name}: {e.strerror or e}") from None
            if got <= 0:
                raise fail(self.path, f"truncated while reading tensor {info.name} (file changed?)")
            done += got

    def read_rows(self, info: TensorInfo, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (int ``[k]``) of tensor ``info`` (its first axis) as a new ``[k, ...]`` array.

        One ``pread`` per run of consecutive ids, into the result: no page of
        the file is mapped, so a file that shrinks while it is read gives an
        error, not a SIGBUS.
        """
        ids = np.asarray(ids, np.int64).reshape(-1)
        shape = tuple(info.shape)
        if not shape:
            raise fail(self.path, f"tensor {info.name}: a scalar has no rows")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= shape[0]):
            raise IndexError(f"{self.path}: tensor {info.name}: row ids outside [0, {shape[0]})")
        out = np.empty((ids.size, *shape[1:]), info.np_dtype)
        if not ids.size:
            return out
        breaks = np.flatnonzero(np.diff(ids) != 1) + 1
        row_bytes = info.nbytes // shape[0] if shape[0] else 0
        starts = [0, *breaks.tolist()]
        ends = [*breaks.tolist(), ids.size]
        for a, b in zip(starts, ends):
            self.read_into(info, int(ids[a]) * row_bytes, out[a:b].reshape(-1).view(np.uint8))
        return out

    def _descriptor(self) -> int:
        with self._open_lock:  # threads may read one file at once (pread is positionless)
            if self._fd is None:
                try:
                    self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError as e:
                    raise fail(self.path, f"cannot open: {e.strerror or e}") from None
            return self._fd

    def prefetch(self, info: TensorInfo, begin: int, end: int) -> None:
        """Ask the kernel to start reading bytes [begin, end) of ``info`` now.

        ``posix_fadvise(WILLNEED)`` queues the reads and returns, so the disk
        works on the next chunks while this one is merged (cold inputs: a 70B
        model is far larger than the page cache). A hint only: errors are ignored.

        It does nothing until a read of this file has found bytes outside the
        page cache (:meth:`read_into` asks with ``RWF_NOWAIT``): for cached
        files the kernel would walk every page of the range for nothing.
        """
        lo, hi = max(0, begin), min(info.nbytes, end)
        if not self._cold or hi <= lo or not hasattr(os, "posix_fadvise"):
            return
        try:
            os.posix_fadvise(self._descriptor(), info.begin + lo, hi - lo, os.POSIX_FADV_WILLNEED)
        except (OSError, SafetensorsError):
            pass

    def release(self, info: TensorInfo, begin: int, end: int) -> None:
        """Tell the kernel the byte range [begin, end) of ``info`` is consumed.

        Uses ``madvise(MADV_DONTNEED)`` on whole pages inside the range so that
        page-cache-backed RSS does not grow with model size. Harmless on
        read-only file mappings: a later access simply re-reads the page.
        """
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        lo = -(-(info.begin + begin) // page) * page
        hi = ((info.begin + end) // page) * page
        if hi <= lo:
            return
        base = self._map._mmap  # type: ignore[attr-defined]
        if base is None:
            return
        try:
            base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
