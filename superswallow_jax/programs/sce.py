"""Chunk program for ``sce``.

Statistics passes (see :mod:`.select`): with ``0 < select_topk < 1``, the
exact top-k of the per-entry variance (float64 Welford on the host, then
rounded to the working dtype) and, in the same last pass, each donor's sum of
squared masked task vectors; otherwise one pass for the sums of squares. The
chunk kernel then applies the selection, the SCE weights and the sign
election.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from ..dtypes import NP
from ..methods import gta as gta_m
from ..methods import sce as sce_m
from ..methods import sparsify as sp
from ..host import scalar as hs
from ..host import histogram as hh
from ..host import blocks as hb
from ..methods.numerics import cast_out
from ..stream import StepContext, pad
from .basic import base_only_program
from .select import select_ranges
from . import kernel_cache, split_base


@kernel_cache
def _tau_kernel(work: str, base: int):
    def run(xs):
        b_in, others = split_base(xs, base)
        _, deltas = gta_m.task_vectors(b_in, others, d=work)
        return deltas, sce_m.squares(deltas, d=work)

    return jax.jit(run)


@kernel_cache
def _merge_kernel(work: str, out: str, base: int, mode: str, n: int):
    """mode: "all" (no selection), "topk" (selection by |var|), "none" (select_topk <= 0: nothing kept)."""

    def run(xs, var, top, skip, bottom, quota, w, floor):
        b_in, others = split_base(xs, base)
        b, deltas = gta_m.task_vectors(b_in, others, d=work)
        if mode == "topk":
            keep = sp.range_keep(jnp.abs(var), top, skip, bottom, quota)
        elif mode == "none":
            keep = jnp.zeros((n,), bool)
        else:
            keep = None
        return cast_out(sce_m.combine(b, deltas, keep, w, floor, d=work), NP[out])

    return jax.jit(run)


def prepare_sce(ctx: StepContext):
    if (p := base_only_program(ctx)) is not None:
        return p
    step = ctx.step
    k = len(step.sources) - 1
    work, n = step.work_dtype, step.numel
    topk = float(step.params["select_topk"])
    tau = _tau_kernel(work, step.base)

    def taus(a: int, b: int):
        deltas, sqs = tau(ctx.inputs(a, b))
        ctx.release(a, b)
        return [np.asarray(t)[: b - a] for t in deltas], [np.asarray(s)[: b - a] for s in sqs]

    last_squares: dict[int, list[np.ndarray]] = {}  # the chunk var_of saw last: visit reuses its squares

    def var_of(a: int, b: int) -> np.ndarray:
        """float32[b - a]: the donors' per-entry variance (dtype-``work`` values)."""
        deltas, sqs = taus(a, b)
        last_squares.clear()
        last_squares[a] = sqs
        return sce_m.variance(deltas, work)

    blocks: list[list[float]] = [[] for _ in range(k)]
    sel = None
    if 0 < topk < 1:
        mode = "topk"

        def keys(a: int, b: int):
            # select_ranges asks for each chunk's keys in two or three passes
            # and the merge pass needs them once more: the variance (float64
            # on the host, the costly part) is kept in the step's cache.
            return [hh.abs_bits(ctx.cache.get(("var", a), lambda: var_of(a, b)), work)]

        def visit(a: int, b: int, keeps) -> None:
            sqs = last_squares.pop(a, None)  # computed by keys() just now unless the variance was kept
            for i, sq in enumerate(sqs if sqs is not None else taus(a, b)[1]):
                blocks[i] += hb.block_l1(sq * keeps[0])

        sel = select_ranges(
            ctx.chunks, keys, lambda zeros: [(0, sce_m.topk_count(n - zeros[0], topk))], work, visit=visit,
        )[0]
    elif topk >= 1:
        mode = "all"

        def add_l1(a: int, b: int, res) -> None:
            for i, sq in enumerate(res[1]):
                blocks[i] += hb.block_l1(np.asarray(sq)[: b - a])

        ctx.each_chunk(lambda a, b: tau(ctx.inputs(a, b)), add_l1)
    else:
        mode = "none"
    w = sce_m.weights([hb.total(bl) for bl in blocks], n, work)
    floor = np.float32(hs.round_scalar(1e-6, work))
    merge = _merge_kernel(work, step.out_dtype, step.base, mode, ctx.bucket)
    cursor = sel.quotas() if sel is not None else None
    dummy = np.zeros((1,), np.float32)
    top = np.float32(sel.top if sel is not None else 0.0)
    bottom = np.float32(sel.bottom if sel is not None else 0.0)

    def run(xs, a, b):
        if cursor is None:
            return merge(xs, dummy, top, np.int32(0), bottom, np.int32(0), w, floor)
        skip, quota = cursor.next(a)
        var = ctx.cache.take(("var", a), lambda: sce_m.variance([np.asarray(t)[: b - a] for t in tau(xs)[0]], work))
        return merge(xs, pad(var, ctx.bucket), top, np.int32(skip), bottom, np.int32(quota), w, floor)

    return run
