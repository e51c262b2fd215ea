"""Rounding rules shared by the kernels.

mergekit (torch) evaluates each elementwise op on bf16/fp16 tensors in f32 and
rounds the result to the tensor dtype. The kernels here carry every value as
float32 and call :func:`rounder` after each op. Rounding to bf16
uses ``lax.reduce_precision``, which XLA never removes, unlike a
``convert(convert(x, bf16), f32)`` pair that excess-precision passes may fold
away; it also stops XLA from contracting a multiply and an add into an FMA.
fp16 rounds through a real conversion, because ``reduce_precision`` flushes
fp16 subnormals to zero (tests check bit-exactness against NumPy).

Sums over the model axis start from +0.0, like torch's reductions: a sum of
negative zeros is +0.0.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax.numpy as jnp
from jax import lax
import numpy as np

from ..dtypes import CODES

#: (exponent bits, mantissa bits) for each working dtype code.
PRECISION = {"BF16": (8, 7)}


def rounder(code: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """f32 -> f32 function rounding to dtype ``code`` (identity for F32)."""
    if code in PRECISION:
        e, m = PRECISION[code]
        return lambda x: lax.reduce_precision(x, exponent_bits=e, mantissa_bits=m)
    if code == "F16":
        # reduce_precision flushes fp16 subnormals to zero; torch keeps them, so
        # round through a real float16 conversion (tested not to be folded away).
        return lambda x: x.astype(jnp.float16).astype(jnp.float32)
    if code == "F32":
        return fp_barrier
    raise ValueError(f"unsupported working dtype {code}")


def fp_barrier(x: jnp.ndarray, key: jnp.ndarray | None = None) -> jnp.ndarray:
    """Identity on float32 values that the compiler cannot see through.

    XLA:CPU contracts ``a * b + c`` into an FMA (one rounding instead of two),
    whatever the fast-math flags say; torch rounds the product first. Passing
    the product through an integer XOR with a data-dependent zero (``isnan``,
    which only touches NaN payload bits) keeps it a separately rounded value.

    ``key`` (default ``x``) is what the zero depends on. LLVM can prove some
    products never NaN (an int-to-float value times a constant) and then drops
    the XOR; keying on a kernel input, which it cannot predict, prevents that.
    The result differs from ``x`` only where ``key`` is NaN.
    """
    u = lax.bitcast_convert_type(x, jnp.uint32)
    k = x if key is None else key
    return lax.bitcast_convert_type(u ^ jnp.isnan(k).astype(jnp.uint32), jnp.float32)


def divide(num: jnp.ndarray, den: jnp.ndarray) -> jnp.ndarray:
    """``num / den`` as a true IEEE division, also when ``den`` is a scalar.

    XLA rewrites ``x / broadcast(s)`` into ``x * (1 / s)``, which is off by an
    ulp for about 40% of values. A divisor that depends on ``num`` (equal to
    ``den`` except where ``num`` is NaN, where the result is NaN anyway) is not
    a broadcast, so the division stays a division.
    """
    return num / jnp.where(jnp.isnan(num), jnp.float32(1.0), den)


def sum_f32(terms: Sequence[jnp.ndarray]) -> jnp.ndarray:
    """Left-to-right f32 sum that starts from +0.0 (torch's reduction identity)."""
    acc = terms[0]
    for t in terms[1:]:
        acc = acc + t
    return jnp.where(acc == 0, jnp.float32(0.0), acc)


def to_bf16(x: jnp.ndarray) -> jnp.ndarray:
    """float32 -> bfloat16, round to nearest even, with integer ops only.

    The same bits as XLA:CPU's ``convert`` for every float32 input (tested on
    all classes: normal, subnormal, ties, overflow to inf, NaN -> sign | 0x7FC0,
    which is also ml_dtypes'), but XLA:CPU lowers that convert to a call
    (``xla.fptrunc.f32.to.bf16``) that LLVM cannot vectorize (about twice the
    time; docs/performance.md). Being plain integer
    arithmetic, it also gives the same bits on every backend.
    """
    u = lax.bitcast_convert_type(x, jnp.uint32)
    rounded = (u + jnp.uint32(0x7FFF) + ((u >> 16) & jnp.uint32(1))) >> 16
    nan = ((u >> 16) & jnp.uint32(0x8000)) | jnp.uint32(0x7FC0)
    return lax.bitcast_convert_type(jnp.where(jnp.isnan(x), nan, rounded).astype(jnp.uint16), jnp.bfloat16)


def cast_out(x: jnp.ndarray, dtype) -> jnp.ndarray:
    """``x`` as ``dtype`` (bfloat16 through :func:`to_bf16`, which equals ``astype`` there)."""
    if x.dtype == jnp.float32 and jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16):
        return to_bf16(x)
    return x.astype(dtype)


def as_f32(x: jnp.ndarray) -> jnp.ndarray:
    return x.astype(jnp.float32)


def to_work(x: jnp.ndarray, code: str) -> jnp.ndarray:
    """``x`` (any float dtype) as float32 holding dtype-``code`` values.

    The cast to ``code`` is skipped when ``x`` already has that dtype (exact).
    """
    y = as_f32(x)
    return y if CODES.get(np.dtype(x.dtype)) == code else rounder(code)(y)


def _two_sum(a: jnp.ndarray, b: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Knuth's TwoSum: s = RN(a + b) and the exact error e = a + b - s (float32)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Veltkamp split of float32 ``x`` into 12-bit halves, hi + lo == x exactly."""
    c = fp_barrier(x * jnp.float32(4097.0))
    hi = c - (c - x)
    return hi, x - hi


def _round_to_odd_sum(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """a + b rounded to odd: if inexact, the neighbour whose last significand bit is 1."""
    s, e = _two_sum(a, b)
    bits = lax.bitcast_convert_type(s, jnp.uint32)
    fix = (e != 0) & ((bits & jnp.uint32(1)) == 0)
    toward_larger_magnitude = (e > 0) == (s > 0)
    adj = jnp.where(toward_larger_magnitude, bits + jnp.uint32(1), bits - jnp.uint32(1))
    return lax.bitcast_convert_type(jnp.where(fix, adj, bits), jnp.float32)


def fma(x: jnp.ndarray, c: jnp.ndarray, acc: jnp.ndarray) -> jnp.ndarray:
    """Correctly rounded float32 ``x * c + acc`` (one rounding), on any backend.

    torch's CPU ``linear`` accumulation is a chain of fused multiply-adds; XLA
    has no FMA op and decides contraction itself, so it is emulated exactly:
    Dekker's product gives ``x * c = p + err`` exactly, and the three-term sum
    ``acc + p + err`` is rounded once with Boldo and Melquiond's round-to-odd
    algorithm. Exact for normal numbers (XLA:CPU flushes subnormals).
    """
    p = fp_barrier(x * c)
    xh, xl = _split(x)
    ch, cl = _split(c)
    err = ((xh * ch - p) + xh * cl + xl * ch) + xl * cl
    uh, ul = _two_sum(p, err)
    th, tl = _two_sum(acc, uh)
    return th + _round_to_odd_sum(tl, ul)
