"""Exact references for the LoRA kernels, with Python's rationals: no floating-point op of numpy or XLA.

``fma32(a, b, c)`` is ``a * b + c`` of float32 numbers rounded once to
float32 (nearest, ties to even), computed exactly as a :class:`Fraction`;
``seq_dot`` is torch's CPU matmul order for LoRA shapes: each element
accumulated over the rank with one such fma per step, from zero.
"""

from fractions import Fraction

import numpy as np

from .reference import D


def rn32(q: Fraction) -> np.float32:
    """``q`` rounded to the nearest float32, ties to an even significand."""
    c0 = np.float32(float(q))  # within one float32 step of the answer
    cands = [np.nextafter(c0, np.float32(-np.inf)), c0, np.nextafter(c0, np.float32(np.inf))]
    return min(cands, key=lambda c: (abs(Fraction(float(c)) - q), int(np.array(c).view(np.uint32)) & 1))


def fma32(a, b, c) -> np.float32:
    return rn32(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))


def seq_dot(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``lhs @ rhs`` (float32 ``[R, r]`` and ``[r, C]``), each element a chain of exact fmas from zero."""
    out = np.zeros((lhs.shape[0], rhs.shape[1]), np.float32)
    for i in range(lhs.shape[0]):
        for j in range(rhs.shape[1]):
            acc = np.float32(0)
            for k in range(lhs.shape[1]):
                acc = fma32(lhs[i, k], rhs[k, j], acc)
            out[i, j] = acc
    return out


def merged_rows(w, lhs, rhs, scale, code: str, round_delta: bool = False) -> np.ndarray:
    """PEFT's merge of rows: ``RN_d(f32(RN_d(w)) + RN32(seq_dot * f32(scale)))`` (``round_delta``: the
    delta rounded to ``d`` first, as its embedding merge does)."""
    d = D[code]
    delta = seq_dot(lhs.astype(np.float32), rhs.astype(np.float32)) * np.float32(scale)  # one float32 rounding
    if round_delta:
        delta = delta.astype(d).astype(np.float32)
    return (np.asarray(w).astype(d).astype(np.float32) + delta).astype(d)
