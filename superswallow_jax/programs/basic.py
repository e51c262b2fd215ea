"""Chunk programs for ``linear``, ``passthrough`` and ``task_median`` (one pass each)."""

from __future__ import annotations


import jax
import numpy as np

from ..errors import PlanError
from ..dtypes import NP
from ..methods.linear import linear
from ..methods.numerics import cast_out
from ..methods.passthrough import passthrough
from ..methods.task_median import task_median
from ..stream import StepContext
from . import kernel_cache, split_base


@kernel_cache
def _linear_kernel(work: str, out: str, normalize: bool):
    return jax.jit(lambda xs, w: cast_out(linear(xs, w, normalize=normalize, work=work), NP[out]))


@kernel_cache
def _passthrough_kernel(work: str, out: str, scaled: bool):
    return jax.jit(lambda x, s: cast_out(passthrough(x, s if scaled else None, work=work), NP[out]))


def prepare_linear(ctx: StepContext):
    step = ctx.step
    kern = _linear_kernel(step.work_dtype, step.out_dtype, bool(step.params.get("normalize")))
    w = np.array([s.params["weight"] for s in step.sources], np.float32)
    return lambda xs, a, b: kern(xs, w)


def passthrough_program(ctx: StepContext, index: int = 0, scale: float | None = None):
    """Copy input ``index`` (rounded to the working dtype, optionally scaled)."""
    step = ctx.step
    kern = _passthrough_kernel(step.work_dtype, step.out_dtype, scale is not None)
    s = np.float32(1.0 if scale is None else scale)
    return lambda xs, a, b: kern(xs[index], s)


def base_only_program(ctx: StepContext):
    """For methods that need the base's tensor: a PlanError if it is missing; a
    copy of the base when no other model has this tensor (mergekit returns it);
    else None (the caller merges)."""
    step = ctx.step
    if step.base is None:
        raise PlanError(f"tensor {step.name}: {ctx.plan.method.name} needs the base model's tensor")
    if len(step.sources) == 1:
        return passthrough_program(ctx, step.base)
    return None


def prepare_passthrough(ctx: StepContext):
    return passthrough_program(ctx, 0, ctx.step.sources[0].params.get("scale"))


@kernel_cache
def _task_median_kernel(work: str, out: str, base: int):
    def run(xs, lam):
        b, others = split_base(xs, base)
        return cast_out(task_median(b, others, lam, work=work), NP[out])

    return jax.jit(run)


def prepare_task_median(ctx: StepContext):
    """task_median: one pass (elementwise); only the base: a copy of it."""
    if (p := base_only_program(ctx)) is not None:
        return p
    step = ctx.step
    kern = _task_median_kernel(step.work_dtype, step.out_dtype, step.base)
    lam = np.float32(step.params["lambda"])
    return lambda xs, a, b: kern(xs, lam)
