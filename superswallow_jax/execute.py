"""Stream a :class:`~superswallow_jax.plan.Plan`: read, merge, write (how).

Each step is prepared into a chunk program (:mod:`superswallow_jax.programs`),
then its chunks (:mod:`superswallow_jax.stream`) are dispatched in order.
Writer lanes (a thread pool) wait for each result, write and hash it, and
release the consumed input pages (``MADV_DONTNEED``), while the main thread
dispatches the next chunks. Reads run on a pool too: every source of a chunk
at once, and the next chunk's while this one is merged. Both pools have
``io_threads`` threads; the bytes never depend on it.

Whole-tensor statistics use fixed 1024-element blocks (float64 sums combined
with ``math.fsum``) and exact bit-pattern histograms, so results are the same
bytes for any chunk size, device count or tensor order.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from . import programs
from .devices import Placement
from .dtypes import NP
from .finite import NonFiniteTally, count_nonfinite
from .passcache import PassCache, default_pass_cache_bytes
from .plan import Plan, Step
from .stream import InputFetcher, StepContext, bucket_for, chunk_size, default_chunk_elems, default_io_threads

# ------------------------------------------------------------------ driver


@dataclass(frozen=True)
class ExecOptions:
    seed: int = 0
    chunk_elems: int | None = None  # None: default_chunk_elems() for the backend
    pass_cache_bytes: int | None = None  # None: default_pass_cache_bytes() for the backend
    stage: str | None = None  # a multi-stage recipe's stage name (PRNG keys)
    io_threads: int | None = None  # readers, and writer lanes; None: default_io_threads()


class _Sink:
    """Writer lanes: a pool of ``workers`` threads waits for each chunk's result,
    hands it to ``sink`` and releases the chunk's input pages, while the main
    thread prepares and dispatches the next chunks (hashing and ``pwrite``
    release the GIL).

    Chunks of one tensor reach ``sink`` in order (each waits for the one
    before it: a tensor's sha256 is a stream); different tensors go in
    parallel. At most ``workers + 1`` chunks are in flight, which bounds host
    and device memory.
    """

    def __init__(self, sink: Callable[[str, int, np.ndarray], None] | None, workers: int = 1,
                 nonfinite: NonFiniteTally | None = None):
        self.sink = sink
        self.nonfinite = nonfinite  # counts the NaN/Inf values of every result
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="superswallow-writer")
        self.slots = threading.Semaphore(workers + 1)
        self.last: dict[str, Future] = {}  # each tensor's latest chunk
        self.error: BaseException | None = None

    def _run(self, before: Future | None, item) -> None:
        try:
            if before is not None:
                before.result()  # submitted earlier, so already running: never a deadlock
            if self.error is not None:
                return  # drain after a failure
            ctx, a, b, res = item
            arr = np.asarray(res)[: b - a]
            if self.nonfinite is not None:
                self.nonfinite.output(ctx.step.name, count_nonfinite(arr))
            if self.sink is not None:
                self.sink(ctx.step.name, a, arr)
            ctx.release(a, b)  # only now: XLA may read the mapped input until the result exists
        except BaseException as e:  # re-raised on the main thread
            self.error = self.error or e
        finally:
            self.slots.release()

    def put(self, item) -> None:
        self.slots.acquire()
        if self.error is not None:
            self.slots.release()
            self.close()
        name = item[0].step.name
        before = self.last.get(name)
        if before is None and len(self.last) > 64:  # forget finished tensors
            self.last = {n: f for n, f in self.last.items() if not f.done()}
        self.last[name] = self.pool.submit(self._run, before, item)

    def close(self) -> None:
        """Wait for every chunk to be written; re-raise a writer error."""
        self.pool.shutdown(wait=True)
        self.last.clear()
        if self.error is not None:
            raise self.error


def iter_results(plan: Plan, opts: ExecOptions, progress: Callable[[int], None] | None = None,
                 order: Sequence[int] | None = None, sink: Callable[[str, int, np.ndarray], None] | None = None,
                 nonfinite: NonFiniteTally | None = None) -> Iterator[Step]:
    """Stream the plan, passing each output chunk to ``sink(name, flat_offset, array)``.

    ``sink`` runs on a writer thread, chunks of a tensor in order. Yields each
    step once its chunks are dispatched; when the iterator is exhausted every
    chunk has gone to ``sink``. ``nonfinite``: where the NaN/Inf values of
    every input and output chunk are counted.
    """
    chunk = chunk_size(opts.chunk_elems or default_chunk_elems())
    budget = default_pass_cache_bytes() if opts.pass_cache_bytes is None else opts.pass_cache_bytes
    threads = opts.io_threads or default_io_threads()
    fetch = InputFetcher(plan, threads, nonfinite)
    placement = Placement.local()
    writer = _Sink(sink, threads, nonfinite)
    try:
        steps = plan.steps if order is None else [plan.steps[i] for i in order]
        for k, step in enumerate(steps):
            if k + 1 < len(steps):  # read-ahead hint for the next tensor's first window
                fetch.prefetch(steps[k + 1], 0, min(steps[k + 1].numel, fetch.window(steps[k + 1])))
            ctx = StepContext(plan, step, opts.seed, chunk, bucket_for(step.numel, chunk), fetch, placement,
                              PassCache(budget), opts.stage)
            program = programs.prepare(ctx)
            out_bytes = NP[step.out_dtype].itemsize
            for a, b in ctx.chunks():
                writer.put((ctx, a, b, program(ctx.final_inputs(a, b), a, b)))
                if progress is not None:
                    progress(out_bytes * (b - a))
            yield step
    finally:
        try:
            writer.close()
        finally:
            fetch.close()
