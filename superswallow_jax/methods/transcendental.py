"""``exp`` and ``log`` in float32 with the same bits on every backend.

XLA's ``exp`` and ``log`` are approximations chosen per backend: XLA:CPU and
XLA:GPU round differently in the last bit for some inputs, so a kernel using
them is not reproducible across backends (``arcee_fusion`` gave one different
tensor of 39 on an H200 against the CPU). These versions use only operations
IEEE 754 rounds exactly (``+ - *``, comparisons, integer bit operations),
every product passed through an integer barrier (:func:`_mul`) so no
compiler can contract it into an FMA, so any backend computes the same float32 result.

Shapes: elementwise; float32 in, float32 out.

Algorithms: Cody-Waite range reduction with Cephes' minimax polynomials
(``expf``, ``logf``); error at most about 1 ulp against the true value
(``tests/test_transcendental.py`` measures it against float64). Results that
would be subnormal are flushed to zero and subnormal inputs are read as zero,
as XLA:CPU does anyway, so backends that keep subnormals agree too.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from .numerics import fp_barrier

F32 = jnp.float32
FLT_MIN = 1.1754943508222875e-38
LOG2E = 1.44269504088896341
LN2_HI = 0.693359375  # 9 significant bits: n * LN2_HI is exact for |n| < 2^15
LN2_LO = -2.12194440e-4
EXP_HI = 88.72283935546875  # largest x with a finite expf
EXP_LO = -87.33654022216797  # smallest x with a normal expf
SQRT_HALF = 0.70710678118654752440

_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_LOG_P = (
    7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
    -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1,
)


def _mul(a, b, dep):
    """``a * b`` rounded on its own, never fused with a following add.

    The barrier is keyed on ``dep``, the function's input: keyed on the
    product itself, LLVM proved ``int * const`` products non-NaN and removed
    it (seen on XLA:CPU: 9 of 300,000 logs changed).
    """
    return fp_barrier(a * b, dep)


def _horner(coeffs, x, dep):
    acc = jnp.full_like(x, F32(coeffs[0]))
    for c in coeffs[1:]:
        acc = _mul(acc, x, dep) + F32(c)
    return acc


def _pow2(k):
    """float32 2^k for int32 ``k`` in [-126, 127] (built from its bits)."""
    return lax.bitcast_convert_type((k + 127).astype(jnp.uint32) << 23, F32)


def _flush(y):
    return jnp.where(jnp.abs(y) < F32(FLT_MIN), F32(0.0), y)


def exp(x: jnp.ndarray) -> jnp.ndarray:
    """float32 ``e**x``: overflow gives +inf, results below FLT_MIN give 0, NaN stays NaN."""
    x = _flush(x.astype(F32))
    n = jnp.round(_mul(x, F32(LOG2E), x))  # half to even; |n| <= 128 in the kept range
    r = (x - _mul(n, F32(LN2_HI), x)) - _mul(n, F32(LN2_LO), x)
    y = (_mul(_horner(_EXP_P, r, x), _mul(r, r, x), x) + r) + F32(1.0)
    k = jnp.clip(n, -150, 150).astype(jnp.int32)
    half = k // 2  # two exact power-of-two scalings cover k in [-252, 254]
    y = _mul(_mul(y, _pow2(jnp.clip(half, -126, 127)), x), _pow2(jnp.clip(k - half, -126, 127)), x)
    y = jnp.where(x > F32(EXP_HI), F32(jnp.inf), y)
    y = jnp.where(x < F32(EXP_LO), F32(0.0), _flush(y))
    return jnp.where(jnp.isnan(x), x, y)


def log(x: jnp.ndarray) -> jnp.ndarray:
    """float32 natural log: log(0) = -inf (subnormals read as 0), log(<0) = NaN, log(inf) = inf."""
    x = _flush(x.astype(F32))
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    e = ((bits >> 23) & jnp.uint32(0xFF)).astype(jnp.int32) - 126  # x = m * 2^e, m in [0.5, 1)
    m = lax.bitcast_convert_type((bits & jnp.uint32(0x007FFFFF)) | jnp.uint32(0x3F000000), F32)
    small = m < F32(SQRT_HALF)
    e = jnp.where(small, e - 1, e)
    f = jnp.where(small, m + m, m) - F32(1.0)  # exact (Sterbenz); f in [-0.293, 0.414]
    ef = e.astype(F32)
    z = _mul(f, f, x)
    y = _mul(_mul(_horner(_LOG_P, f, x), f, x), z, x)
    y = y + _mul(ef, F32(LN2_LO), x)
    y = y - _mul(z, F32(0.5), x)
    y = (f + y) + _mul(ef, F32(LN2_HI), x)
    y = jnp.where(x == F32(0.0), F32(-jnp.inf), y)
    y = jnp.where(x < F32(0.0), F32(jnp.nan), y)
    y = jnp.where(x == F32(jnp.inf), x, y)
    return jnp.where(jnp.isnan(x), x, y)
