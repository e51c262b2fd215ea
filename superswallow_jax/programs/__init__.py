"""Chunk programs: how one step's chunks are computed, per method kind.

``prepare(ctx)`` returns a callable ``program(xs, a, b) -> jax.Array``: it maps
the padded input chunks of elements [a, b) to the output chunk (padded to the
bucket, in the output dtype). Preparing may run a first pass over the chunks
for whole-tensor statistics (DARE's L1 rescale, TIES's magnitude threshold).

Each kind lives in its own module and registers itself in :data:`PREPARERS`;
the kernels they call are the pure functions of :mod:`superswallow_jax.methods`.
"""

from __future__ import annotations

from typing import Callable, Protocol

import jax
import numpy as np

from ..stream import StepContext


class ChunkProgram(Protocol):
    def __call__(self, xs: list[np.ndarray], a: int, b: int) -> jax.Array: ...


PREPARERS: dict[str, Callable[[StepContext], ChunkProgram]] = {}


def register(kind: str):
    def deco(fn: Callable[[StepContext], ChunkProgram]):
        PREPARERS[kind] = fn
        return fn

    return deco


def prepare(ctx: StepContext) -> ChunkProgram:
    """The chunk program for ``ctx.step`` under the plan's merge method."""
    return PREPARERS[ctx.plan.method.kind](ctx)


from . import basic, geometric, gta, ram, sce  # noqa: E402,F401  (registration)
