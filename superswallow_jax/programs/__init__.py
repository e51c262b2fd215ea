"""Chunk programs: how one step's chunks are computed, per method kind.

``prepare(ctx)`` returns a callable ``program(xs, a, b) -> jax.Array``: it maps
the padded input chunks of elements [a, b) to the output chunk (padded to the
bucket, in the output dtype). Preparing may run a first pass over the chunks
for whole-tensor statistics (DARE's L1 rescale, TIES's magnitude threshold).

A method's registry entry names its prepare function
(``MethodSpec.program``, ``"<module>:<function>"`` of this package); it is
imported the first time a merge needs it. The kernels the programs call are
the pure functions of :mod:`superswallow_jax.methods`.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable, Protocol

import jax
import numpy as np

from ..registry import MethodSpec
from ..stream import StepContext


#: Jitted kernels are kept per signature (method, dtypes, bucket, input count): a
#: merge uses a handful, so the bound only matters to a process running many.
kernel_cache = functools.lru_cache(maxsize=64)


class ChunkProgram(Protocol):
    def __call__(self, xs: list[np.ndarray], a: int, b: int) -> jax.Array: ...


def split_base(xs: list, base: int) -> tuple:
    """``(xs[base], [every other x, in order])``."""
    return xs[base], [x for i, x in enumerate(xs) if i != base]


def load(method: MethodSpec) -> Callable[[StepContext], ChunkProgram]:
    """The prepare function a method's entry names."""
    module, _, name = method.program.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def prepare(ctx: StepContext) -> ChunkProgram:
    """The chunk program for ``ctx.step`` under the plan's merge method."""
    return load(ctx.plan.method)(ctx)
