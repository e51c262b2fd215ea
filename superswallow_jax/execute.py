"""Stream a :class:`~superswallow_jax.plan.Plan`: read, merge, write (how).

Each step is prepared into a chunk program (:mod:`superswallow_jax.programs`),
then its chunks (:mod:`superswallow_jax.stream`) are dispatched in order. A
writer thread waits for each result, writes and hashes it, and releases the
consumed input pages (``MADV_DONTNEED``), while the main thread reads and
dispatches the next chunks; at most two chunks are in flight.

Whole-tensor statistics use fixed 1024-element blocks (float64 sums combined
with ``math.fsum``) and exact bit-pattern histograms, so results are the same
bytes for any chunk size, device count or tensor order.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from . import programs
from .devices import Placement
from .dtypes import NP
from .passcache import PassCache, default_pass_cache_bytes
from .plan import Plan, Step
from .stream import InputFetcher, StepContext, bucket_for, chunk_size, default_chunk_elems

# ------------------------------------------------------------------ driver


@dataclass(frozen=True)
class ExecOptions:
    seed: int = 0
    chunk_elems: int | None = None  # None: default_chunk_elems() for the backend
    pass_cache_bytes: int | None = None  # None: default_pass_cache_bytes() for the backend
    stage: str | None = None  # a multi-stage recipe's stage name (PRNG keys)


class _Sink:
    """A writer thread: waits for each chunk's result, hands it to ``sink`` and
    releases the chunk's input pages, while the main thread prepares and
    dispatches the next chunks (hashing and ``pwrite`` release the GIL).

    At most ``depth`` chunks are in flight, which bounds host and device memory.
    """

    def __init__(self, sink: Callable[[str, int, np.ndarray], None] | None, depth: int = 2):
        self.sink = sink
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="superswallow-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after a failure
            ctx, a, b, res = item
            try:
                arr = np.asarray(res)[: b - a]
                if self.sink is not None:
                    self.sink(ctx.step.name, a, arr)
                ctx.release(a, b)  # only now: XLA may read the mapped input until the result exists
            except BaseException as e:  # re-raised on the main thread
                self.error = e

    def put(self, item) -> None:
        self.queue.put(item)
        if self.error is not None:
            self.close()

    def close(self) -> None:
        """Wait for every chunk to be written; re-raise a writer error."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if self.error is not None:
            raise self.error


def iter_results(plan: Plan, opts: ExecOptions, progress: Callable[[int], None] | None = None,
                 order: Sequence[int] | None = None, sink: Callable[[str, int, np.ndarray], None] | None = None) -> Iterator[Step]:
    """Stream the plan, passing each output chunk to ``sink(name, flat_offset, array)``.

    ``sink`` runs on a writer thread, chunks of a tensor in order. Yields each
    step once its chunks are dispatched; when the iterator is exhausted every
    chunk has gone to ``sink``.
    """
    chunk = chunk_size(opts.chunk_elems or default_chunk_elems())
    budget = default_pass_cache_bytes() if opts.pass_cache_bytes is None else opts.pass_cache_bytes
    fetch = InputFetcher(plan)
    placement = Placement.local()
    writer = _Sink(sink)
    try:
        steps = plan.steps if order is None else [plan.steps[i] for i in order]
        for k, step in enumerate(steps):
            if k + 1 < len(steps):  # read-ahead hint for the next tensor's first chunk
                fetch.prefetch(steps[k + 1], 0, min(steps[k + 1].numel, chunk))
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
        writer.close()
