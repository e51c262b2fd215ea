"""Fixed 1024-element block sums in float64: whole-tensor L1 norms that do not depend on the chunking.

Chunk offsets are multiples of :data:`BLOCK`, so the blocks -- and their
``math.fsum`` -- are the same for any chunk size, device count or order.
"""

from __future__ import annotations

import math

import numpy as np

from .scalar import round_scalar

__all__ = ["BLOCK", "block_l1", "rescale_factor", "total"]

BLOCK = 1 << 10


def block_l1(values: np.ndarray) -> list[float]:
    """Per-block (BLOCK = 1024 elements, from the array start) float64 sums of |values|.

    Chunk offsets are multiples of BLOCK, so the blocks -- and the total
    ``math.fsum`` of them -- do not depend on the chunking. |x| is exact in
    float32 for bf16/fp16/f32 values, and each block is summed in float64 with
    NumPy's pairwise summation (the same for a block wherever it lies).
    """
    a = np.abs(np.asarray(values, dtype=np.float32))
    nfull = a.size // BLOCK
    sums = a[: nfull * BLOCK].reshape(nfull, BLOCK).sum(axis=1, dtype=np.float64).tolist() if nfull else []
    if a.size % BLOCK:
        sums.append(float(a[nfull * BLOCK :].sum(dtype=np.float64)))
    return sums

def total(blocks: list[float]) -> float:
    return math.fsum(blocks)


def rescale_factor(l1_full: float, l1_kept: float, work: str) -> float:
    """mergekit's L1 rescale: ||delta||_1 / ||delta*m||_1 in the work dtype, or 1.0.

    Both norms are rounded to ``work`` first; below 1e-7 the vector is left unscaled.
    """
    a = round_scalar(l1_full, work)
    b = round_scalar(l1_kept, work)
    if a < 1e-7 or b < 1e-7:
        return 1.0
    return round_scalar(float(np.float32(a) / np.float32(b)), work)
