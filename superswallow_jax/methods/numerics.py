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


def fp_barrier(x: jnp.ndarray) -> jnp.ndarray:
    """Identity on float32 values that the compiler cannot see through.

    XLA:CPU contracts ``a * b + c`` into an FMA (one rounding instead of two),
    whatever the fast-math flags say; torch rounds the product first. Passing
    the product through an integer XOR with a data-dependent zero (``isnan``,
    which only touches NaN payload bits) keeps it a separately rounded value.
    """
    u = lax.bitcast_convert_type(x, jnp.uint32)
    return lax.bitcast_convert_type(u ^ jnp.isnan(x).astype(jnp.uint32), jnp.float32)


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


def as_f32(x: jnp.ndarray) -> jnp.ndarray:
    return x.astype(jnp.float32)
