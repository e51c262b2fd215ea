"""Stream a :class:`~superswallow_jax.plan.Plan`: read, merge, write (how).

Each step is prepared into a chunk program (:mod:`superswallow_jax.programs`),
then its chunks (:mod:`superswallow_jax.stream`) are dispatched in order.
Chunk k+1 is dispatched before chunk k is written, so XLA computes while the
writer copies; consumed input pages are released with ``MADV_DONTNEED``.

Whole-tensor statistics use fixed 1024-element blocks (float64 sums combined
with ``math.fsum``) and exact bit-pattern histograms, so results are the same
bytes for any chunk size, device count or tensor order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from . import programs
from .devices import Placement
from .io.writer import ShardedWriter
from .plan import Plan, Step
from .stream import DEFAULT_CHUNK_ELEMS, InputFetcher, StepContext, bucket_for, chunk_size

# ------------------------------------------------------------------ driver


@dataclass(frozen=True)
class ExecOptions:
    seed: int = 0
    chunk_elems: int = DEFAULT_CHUNK_ELEMS


def execute(plan: Plan, writer: ShardedWriter, opts: ExecOptions, progress: Callable[[int], None] | None = None,
            order: Sequence[int] | None = None) -> None:
    """Run every step of ``plan`` (in ``order`` if given) into ``writer``.

    ``progress(n)`` is called with the number of input bytes consumed.
    """
    for _ in iter_results(plan, opts, progress, order, sink=writer.write):
        pass


def iter_results(plan: Plan, opts: ExecOptions, progress: Callable[[int], None] | None = None,
                 order: Sequence[int] | None = None, sink: Callable[[str, int, np.ndarray], None] | None = None) -> Iterator[Step]:
    """Stream the plan, passing each output chunk to ``sink(name, flat_offset, array)``.

    Yields each step once all its chunks went to ``sink``.
    """
    chunk = chunk_size(opts.chunk_elems)
    fetch = InputFetcher(plan)
    placement = Placement.local()
    pending: list[tuple[StepContext, int, int, object]] = []  # dispatched, not yet written

    def flush(keep: int) -> None:
        while len(pending) > keep:
            ctx, a, b, res = pending.pop(0)
            arr = np.asarray(res)[: b - a]
            if sink is not None:
                sink(ctx.step.name, a, arr)
            ctx.release(a, b)  # only now: XLA may read the mapped input until the result exists

    steps = plan.steps if order is None else [plan.steps[i] for i in order]
    for step in steps:
        ctx = StepContext(plan, step, opts.seed, chunk, bucket_for(step.numel, chunk), fetch, placement)
        program = programs.prepare(ctx)
        in_bytes = sum(s.tensor.np_dtype.itemsize for s in step.sources)
        for a, b in ctx.chunks():
            res = program(ctx.inputs(a, b), a, b)
            pending.append((ctx, a, b, res))
            flush(1)
            if progress is not None:
                progress(in_bytes * (b - a))
        flush(0)
        yield step
    flush(0)
