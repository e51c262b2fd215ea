"""Chunk programs for ``ram`` and ``ramplus_tl``.

ram is elementwise. ramplus_tl first counts, per donor over the whole tensor,
the active entries that are shared with another donor and those that are
unique (exact integers), and turns them into float32 scales on the host.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from ..dtypes import NP
from ..methods import gta as gta_m
from ..methods import ram as ram_m
from ..methods.numerics import cast_out
from ..host.scalar import round_scalar
from ..stream import StepContext
from .basic import base_only_program
from . import kernel_cache, split_base


@kernel_cache
def _merge_kernel(work: str, out: str, base: int, plus: bool):
    def run(xs, eps, lam):
        b_in, others = split_base(xs, base)
        b, deltas = gta_m.task_vectors(b_in, others, d=work)
        return cast_out(ram_m.merge(b, deltas, eps, lam if plus else None, d=work), NP[out])

    return jax.jit(run)


@kernel_cache
def _count_kernel(work: str, base: int, n: int):
    def run(xs, eps, n_valid):
        b_in, others = split_base(xs, base)
        _, deltas = gta_m.task_vectors(b_in, others, d=work)
        valid = jnp.arange(n, dtype=jnp.int32) < n_valid
        return ram_m.counts(deltas, eps, valid)

    return jax.jit(run)


def prepare_ram(ctx: StepContext):
    """RAM: one pass (the merge)."""
    return _prepare(ctx, plus=False)


def prepare_ramplus_tl(ctx: StepContext):
    """RAM+ (tensor-local): a counting pass for the shared/unique ratio, then the merge."""
    return _prepare(ctx, plus=True)


def _prepare(ctx: StepContext, plus: bool):
    if (p := base_only_program(ctx)) is not None:
        return p
    step = ctx.step
    k = len(step.sources) - 1
    work = step.work_dtype
    eps = np.float32(round_scalar(float(step.params["epsilon"]), work))
    lam = np.ones(k, np.float32)
    if plus:
        kern = _count_kernel(work, step.base, ctx.bucket)
        tot = np.zeros((k, 2), np.int64)

        def count(a: int, b: int, res) -> None:
            tot[...] += np.asarray(res, np.int64)

        ctx.each_chunk(lambda a, b: kern(ctx.inputs(a, b), eps, np.int32(b - a)), count)
        lam = ram_m.ramplus_lambdas(
            [int(x) for x in tot[:, 0]], [int(x) for x in tot[:, 1]],
            float(step.params["r"]), float(step.params["alpha"]), float(step.params["epsilon"]),
        )
    merge = _merge_kernel(work, step.out_dtype, step.base, plus)
    return lambda xs, a, b: merge(xs, eps, lam)
