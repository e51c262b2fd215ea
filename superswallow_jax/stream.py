"""Chunked access to a step's inputs: chunk boundaries, compile buckets, zero-copy reads.

A tensor is processed as flat chunks of at most ``chunk`` elements (a
multiple of :data:`~superswallow_jax.host.blocks.BLOCK`). A chunk shorter
than the step's compile bucket is zero-padded, so one XLA compile serves all
big tensors of a (method, source count, dtype) combination and small tensors
share a few power-of-two buckets.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from .devices import Placement
from .finite import NonFiniteTally, count_nonfinite
from .hostbuf import HostBuffers
from .lora.fetch import LoraReader
from .dtypes import NP
from .host import blocks as hb
from .passcache import PassCache
from .plan import Plan, Step

DEFAULT_CHUNK_ELEMS = 1 << 22  # accelerators: 4M elements, 8 MB per bf16 input chunk
#: On the CPU smaller chunks stay in the caches: faster and less memory than
#: 4M on the 1.3 GB bench pair (docs/performance.md).
CPU_CHUNK_ELEMS = 1 << 20
MIN_BUCKET = 1 << 10
T = TypeVar("T")


def default_chunk_elems() -> int:
    """The chunk size for JAX's default backend (see :data:`CPU_CHUNK_ELEMS`)."""
    return CPU_CHUNK_ELEMS if jax.default_backend() == "cpu" else DEFAULT_CHUNK_ELEMS


#: How far ahead of the chunk being read the kernel is asked to read each source
#: (``posix_fadvise(WILLNEED)``; only once reads found the inputs cold). Page
#: cache, not process memory: deep enough to keep several disk reads in flight.
READ_AHEAD_BYTES = 64 << 20


def default_io_threads() -> int:
    """Reader and writer threads: the cores this process may run on but one, at least 1, at most 8.

    ``pread``, ``pwrite`` and sha256 release the GIL, so threads scale until
    the disk or the memory bus is the limit. One core is left to the main
    thread (dispatch) and XLA: on 2 cores, pools of 2 oversubscribe them
    (docs/performance.md).
    """
    try:
        cores = len(os.sched_getaffinity(0))  # what taskset / cgroups allow, not the whole host
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1))


def chunk_size(chunk_elems: int) -> int:
    """Round a requested chunk size to a positive multiple of the rescale block."""
    return max(hb.BLOCK, (int(chunk_elems) // hb.BLOCK) * hb.BLOCK)


def bucket_for(numel: int, chunk: int) -> int:
    """Compile bucket (padded length) for a tensor of ``numel`` elements."""
    if numel >= chunk:
        return chunk
    return max(MIN_BUCKET, 1 << max(0, (numel - 1).bit_length()))


def pad(x: np.ndarray, n: int) -> np.ndarray:
    """``x`` zero-padded to ``n`` elements (returned as is when already that long)."""
    if x.size == n:
        return x
    out = np.zeros(n, dtype=x.dtype)
    out[: x.size] = x
    return out


class InputFetcher:
    """Produces the input chunks of a step.

    :meth:`padded` reads with ``pread`` into pooled 64-byte-aligned buffers
    (:mod:`superswallow_jax.hostbuf`), which JAX's CPU backend uses without a
    copy; :meth:`chunk` returns zero-copy memory-mapped views (or, for
    vocabulary-aligned embeddings, the re-ordered rows).
    """

    def __init__(self, plan: Plan, threads: int = 1, nonfinite: NonFiniteTally | None = None):
        self.plan = plan
        #: where the non-finite values of every chunk :meth:`padded` reads are counted (None: not counted)
        self.nonfinite = nonfinite
        self.buffers = HostBuffers()
        #: padding means of vocabulary-aligned embeddings (EmbeddingAlignment.padding_row)
        self.pad_rows: dict = {}
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="superswallow-reader")
        #: (tensor, a, b, n) -> the reads of a chunk started ahead of time (at most one)
        self.ahead: dict[tuple, list[Future]] = {}
        #: tensor -> the element up to which the kernel was asked to read ahead
        self.hinted: dict[str, int] = {}
        #: sources of ``base+adapter`` models (``Source.adapt``), made on the device
        self.lora = LoraReader(lambda m, info: plan.models[m].checkpoint.file(info))

    def start(self, step: Step, a: int, b: int, n: int) -> list[Future]:
        """Start reading every source's elements [a, b) (padded to ``n``) on the pool."""
        return [self.pool.submit(self.padded, step, i, a, b, n) for i in range(len(step.sources))]

    def read(self, step: Step, a: int, b: int, n: int, then: tuple[int, int] | None) -> list[np.ndarray]:
        """Every source's elements [a, b), padded to ``n`` (pooled buffers; see :meth:`padded`).

        The reads run in parallel; ``then`` (the next chunk's [a, b)) is
        started before this call returns, so the disk works on it while this
        chunk is merged. The bytes are those of :meth:`padded` whatever the pool.
        """
        futures = self.ahead.pop((step.name, a, b, n), None) or self.start(step, a, b, n)
        self.ahead.clear()  # a read-ahead nobody took (a pass ended): drop it
        if then is not None:
            self.ahead[(step.name, *then, n)] = self.start(step, *then, n)
        return [f.result() for f in futures]

    def close(self) -> None:
        self.ahead.clear()
        self.pool.shutdown(wait=True)

    def _view(self, step: Step, i: int) -> np.ndarray:
        src = step.sources[i]
        return self.plan.models[src.model].checkpoint.file(src.tensor).view_of(src.tensor)

    def _rows(self, step: Step, j: int, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of source ``j``'s original matrix (a new array)."""
        src = step.sources[j]
        if src.adapt is not None:
            return self.lora.rows(src.model, src.tensor, src.adapt, ids)
        return self.plan.models[src.model].checkpoint.file(src.tensor).read_rows(src.tensor, ids)

    def chunk(self, step: Step, i: int, a: int, b: int) -> np.ndarray:
        """Elements [a, b) of source ``i`` of ``step``, flattened (dtype as stored; a ``base+adapter``
        source: its load dtype)."""
        src = step.sources[i]
        if not step.embed and src.adapt is not None:
            return self.lora.chunk(src.model, src.tensor, src.adapt, a, b)
        if not step.embed:
            return self._view(step, i).reshape(-1)[a:b]
        hidden = step.shape[1]
        r0, r1 = a // hidden, -(-b // hidden)
        rows = step.alignment.aligned_rows(i, r0, r1, lambda j, ids: self._rows(step, j, ids), NP[step.work_dtype],
                                           tensor=step.name, pad_cache=self.pad_rows)
        return np.ascontiguousarray(rows).reshape(-1)[a - r0 * hidden : b - r0 * hidden]

    def padded(self, step: Step, i: int, a: int, b: int, n: int) -> np.ndarray | jax.Array:
        """Elements [a, b) of source ``i``, zero-padded to ``n`` (dtype as stored; a pooled buffer).

        The array is only valid until the caller drops it and every JAX array
        made from it: then the pool hands the memory out again. A source of a
        ``base+adapter`` model comes back as a device array, in its load dtype.
        Its NaN/Inf values are counted (:attr:`nonfinite`).
        """
        out = self._padded(step, i, a, b, n)
        if self.nonfinite is not None:
            src = step.sources[i]
            part = out[: b - a]
            bad = count_nonfinite(part) if isinstance(part, np.ndarray) else int(jnp.sum(~jnp.isfinite(part)))
            self.nonfinite.input(self.plan.models[src.model].key, src.tensor.name, step.name, a, bad)
        return out

    def _padded(self, step: Step, i: int, a: int, b: int, n: int) -> np.ndarray | jax.Array:
        src = step.sources[i]
        if not step.embed and src.adapt is not None:
            return self.lora.padded(src.model, src.tensor, src.adapt, a, b, n)
        if step.embed:
            x = self.chunk(step, i, a, b)
            out = self.buffers.get(n * x.dtype.itemsize).view(x.dtype)
            out[: x.size] = x
            out[x.size :] = 0
            return out
        dt = src.tensor.np_dtype
        buf = self.buffers.get(n * dt.itemsize)
        k = (b - a) * dt.itemsize
        self.plan.models[src.model].checkpoint.file(src.tensor).read_into(src.tensor, a * dt.itemsize, buf[:k])
        if k < buf.size:
            buf[k:] = 0
        return buf.view(dt)

    def _spans(self, step: Step, a: int, b: int):
        """Per source: its file and the byte range [lo, hi) holding elements [a, b).

        For vocabulary-aligned embeddings: the whole rows of the range, clipped
        to the source's own rows (rows mostly keep their ids).
        """
        for src in step.sources:
            isz = src.tensor.np_dtype.itemsize
            lo, hi = a, b
            if step.embed:
                hidden, rows = step.shape[1], src.tensor.shape[0]
                lo, hi = min(rows, a // hidden) * hidden, min(rows, -(-b // hidden)) * hidden
            yield self.plan.models[src.model].checkpoint.file(src.tensor), src.tensor, lo * isz, hi * isz

    def prefetch(self, step: Step, a: int, b: int) -> None:
        """Start reading every source's elements [a, b) in the background (a kernel hint).

        Ranges already hinted for this step are not hinted again (the
        window moves forward chunk by chunk).
        """
        done = self.hinted.get(step.name, 0)
        if b <= done:
            return
        if len(self.hinted) > 8:  # only the current and next tensors matter
            self.hinted = {}
        self.hinted[step.name] = b
        for f, info, lo, hi in self._spans(step, max(a, done), b):
            f.prefetch(info, lo, hi)

    def window(self, step: Step) -> int:
        """Elements of ``step`` to hint ahead of the chunk being read: READ_AHEAD_BYTES of its widest source."""
        isz = max(src.tensor.np_dtype.itemsize for src in step.sources)
        return max(1, READ_AHEAD_BYTES // isz)

    def release(self, step: Step, a: int, b: int) -> None:
        """Unmap the pages of the consumed input range [a, b) (MADV_DONTNEED).

        For vocabulary-aligned embeddings the same row range of each source is
        released (a row read again later just faults back in from the page cache).
        """
        for f, info, lo, hi in self._spans(step, a, b):
            if hi > lo:
                f.release(info, lo, hi)


class ChunkPasses:
    """The statistics-pass primitive, for anything with ``chunks()`` and ``release(a, b)``
    (:class:`StepContext`, and the tests' stand-ins)."""

    def each_chunk(self, dispatch: Callable[[int, int], T], consume: Callable[[int, int, T], None]) -> None:
        """A statistics pass: ``consume(a, b, dispatch(a, b))`` for every chunk, in order.

        ``dispatch`` starts the chunk's device computation (JAX returns at
        once; it reads its inputs with :meth:`inputs`); ``consume`` waits for
        the values and folds them into host accumulators; then the chunk's
        input pages are released. Chunk k + 1 is dispatched before chunk k
        is consumed, so the device computes the next chunk while the host
        reduces this one; ``consume`` still sees the chunks in order, so
        every sum is the same. ``dispatch`` must not depend on what
        ``consume`` accumulates within the pass.
        """
        pending: tuple[int, int, T] | None = None
        for a, b in self.chunks():
            out = dispatch(a, b)
            if pending is not None:
                consume(*pending)
                self.release(*pending[:2])
            pending = (a, b, out)
        if pending is not None:
            consume(*pending)
            self.release(*pending[:2])


@dataclass(frozen=True)
class StepContext(ChunkPasses):
    """Everything a chunk program needs to know about one step.

    ``cache`` keeps values between the step's passes (see
    :mod:`superswallow_jax.passcache`); the default keeps nothing.
    """

    plan: Plan
    step: Step
    seed: int
    chunk: int
    bucket: int
    fetch: InputFetcher
    placement: Placement
    cache: PassCache = field(default_factory=PassCache)
    stage: str | None = None  # the stage of a multi-stage recipe (folded into the PRNG keys)

    def tensor_key(self, source: int) -> "np.ndarray":
        """The PRNG key data of this step's tensor for source ``source`` (a position in ``step.sources``)."""
        from . import prng

        return prng.tensor_key_data(self.seed, self.step.name, self.step.sources[source].model, self.stage)

    def chunks(self) -> Iterator[tuple[int, int]]:
        """Flat element ranges [a, b) covering the tensor, in order."""
        n = self.step.numel
        for a in range(0, n, self.chunk):
            yield a, min(n, a + self.chunk)

    def _read(self, a: int, b: int) -> list:
        n = self.step.numel
        then = (b, min(n, b + self.chunk)) if b < n else None
        if then is not None and then[1] < n:  # and a kernel hint for the window after that (cold inputs)
            self.fetch.prefetch(self.step, then[1], min(n, then[1] + self.fetch.window(self.step)))
        return [self.placement.put(x) for x in self.fetch.read(self.step, a, b, self.bucket, then)]

    def inputs(self, a: int, b: int) -> list:
        """Every source's elements [a, b), zero-padded to the bucket, placed on the device(s).

        For the statistics passes: kept for the later passes when the cache
        has room; inputs take at most half of it, since reading again is cheap
        next to what the other kept values (random masks, della ranks) spare.
        Also asks the kernel to read ahead the next chunk of the tensor.
        """
        return self.cache.get(("inputs", a), lambda: self._read(a, b), share=0.5)

    def final_inputs(self, a: int, b: int) -> list:
        """:meth:`inputs` for the step's last pass (the merge): a kept chunk leaves the cache."""
        return self.cache.take(("inputs", a), lambda: self._read(a, b))

    def release(self, a: int, b: int) -> None:
        self.fetch.release(self.step, a, b)
