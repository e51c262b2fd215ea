"""Host-side scalar arithmetic of the geometric methods, with torch's CPU semantics.

The geometric methods (slerp, nuslerp, multislerp, karcher, model_stock,
arcee_fusion) reduce whole vectors to a handful of scalars -- norms, dot
products, angles -- and then apply those scalars elementwise. The scalars are
computed here, on the host, from whole-tensor statistics
(:mod:`superswallow_jax.host.vecsum`), following the op sequence and dtypes
mergekit 0.1.5 uses on torch CPU:

* a value in working dtype ``d`` is an ``np.float32`` holding a ``d`` number;
  :func:`rnd` rounds to ``d`` (through float32, as torch does);
* ``torch.norm`` of a ``d`` tensor: the float32 sum of squares, ``sqrtf``,
  then one rounding to ``d`` (:func:`norm`);
* a sum of a ``d`` tensor: float32 accumulation, rounded to ``d``;
* transcendental functions are evaluated in float64 and rounded to float32,
  then to ``d`` (torch uses SLEEF's 1-ulp float32 versions; see
  :func:`f32fn`).

torch's float32 ``linalg.vector_norm`` (slerp, karcher) is reproduced bit
for bit (:class:`~superswallow_jax.host.vecsum.LaneSumSq`). For its other
reductions -- sums and dot products, whose float32 order depends on torch's
thread count, and ``torch.norm`` of ``d`` tensors, rounded to ``d`` -- the
statistics are the correctly rounded values instead: they agree with torch's
in most cases and differ by an ulp or so otherwise.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from ..dtypes import NP



def rnd(x, code: str) -> np.float32:
    """``x`` (Python float or float32) rounded to float32, then to dtype ``code``."""
    v = np.float32(x)
    if code == "F32":
        return v
    return np.float32(v.astype(NP[code]))


def rnd_array(x: np.ndarray, code: str) -> np.ndarray:
    """Elementwise :func:`rnd` of an array (float64 or float32 in, float32 out)."""
    v = np.asarray(x).astype(np.float32)
    if code == "F32":
        return v
    return v.astype(NP[code]).astype(np.float32)


def f32fn(fn: Callable[[float], float], x, code: str = "F32") -> np.float32:
    """``fn`` (a ``math`` function) of float32 ``x``, rounded to float32 then to ``code``.

    torch evaluates acos/sin/cos with SLEEF's float32 routines (error <= 1 ulp),
    which return the correctly rounded value in the vast majority of cases.
    """
    return rnd(np.float32(fn(float(np.float32(x)))), code)


def sqrt32(x) -> np.float32:
    return np.float32(np.sqrt(np.float32(x)))


def norm(sum_sq: float, code: str) -> np.float32:
    """``torch.norm`` of a vector whose exact sum of squares is ``sum_sq``: sqrtf(f32(sum)) in ``code``."""
    return rnd(sqrt32(np.float32(sum_sq)), code)


def seq_sum32(values: Iterable) -> np.float32:
    """Left-to-right float32 sum starting from +0.0 (a short torch reduction)."""
    acc = np.float32(0.0)
    for v in values:
        acc = np.float32(acc + np.float32(v))
    return acc


def clamp(x, lo: float, hi: float) -> np.float32:
    x = np.float32(x)
    return np.float32(min(max(x, np.float32(lo)), np.float32(hi)))


def fma32(x, y, z) -> np.float32:
    """Correctly rounded float32 ``x * y + z`` (float32 operands).

    The product is exact in float64; the float64 sum is rounded to odd, which
    makes the final rounding to float32 correct.
    """
    p = np.float64(np.float32(x)) * np.float64(np.float32(y))
    zz = np.float64(np.float32(z))
    s = p + zz
    bb = s - p
    err = (p - (s - bb)) + (zz - bb)
    bits = int(np.array(s, np.float64).view(np.uint64))
    if err != 0 and bits & 1 == 0:
        bits += 1 if (err > 0) == (s > 0) else -1
        s = np.array(bits, np.uint64).view(np.float64)[()]
    return np.float32(s)


def round_scalar(x: float, code: str) -> float:
    """:func:`rnd` as a Python float: a Python float rounded to dtype ``code`` through float32."""
    return float(rnd(x, code))
