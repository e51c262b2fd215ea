"""Reusable 64-byte-aligned host buffers for input chunks.

Why: JAX's CPU backend uses a NumPy array's memory in place (no copy) when it
is 64-byte aligned; safetensors data is only 8-byte aligned, so placing a
memory-mapped view costs a page fault per page and a full copy. Reading a
chunk with ``pread`` into an aligned buffer costs one copy from the page cache
and no mapping at all (about three times faster; docs/performance.md).

When a buffer may be reused: JAX keeps a reference to the array it was given
(directly, or through a view) for as long as the device buffer or any
computation reading it lives -- on every backend: an accelerator copy drops it
once the transfer is done. So a buffer is free exactly when nothing but this
pool refers to it, which is read from its reference count. No caller has to
say when it is done, and a missed hand-back cannot corrupt an input: the pool
just allocates another buffer. JAX drops finished buffers lazily (at its next
operation), so the pool settles at a few buffers per input of the chunks in
flight.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

ALIGN = 64


class HostBuffers:
    """A pool of aligned ``uint8`` buffers, grouped by size. Thread-safe."""

    def __init__(self) -> None:
        self._by_size: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()
        self._idle_refs: int | None = None

    @staticmethod
    def _refs(raw: np.ndarray) -> int:
        return sys.getrefcount(raw)

    def get(self, nbytes: int) -> np.ndarray:
        """A free, 64-byte-aligned, writable ``uint8[nbytes]`` (contents undefined)."""
        with self._lock:
            pool = self._by_size.setdefault(nbytes, [])
            for raw in pool:
                if self._refs(raw) <= self._idle_refs:
                    return self._aligned(raw, nbytes)
            raw = np.empty(nbytes + ALIGN, np.uint8)
            pool.append(raw)
            if self._idle_refs is None:  # what the pool's own references count, measured the same way
                self._idle_refs = self._refs(raw)
            return self._aligned(raw, nbytes)

    @staticmethod
    def _aligned(raw: np.ndarray, nbytes: int) -> np.ndarray:
        off = (-raw.ctypes.data) % ALIGN
        return raw[off : off + nbytes]

    def count(self) -> int:
        """How many buffers the pool has allocated (for tests and benchmarks)."""
        with self._lock:
            return sum(len(p) for p in self._by_size.values())
