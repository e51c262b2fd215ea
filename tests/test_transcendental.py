"""Backend-independent exp/log: accuracy against float64, and the exact op sequence.

The second kind of test is the one that matters for reproducibility: NumPy
evaluates every float32 operation on its own, correctly rounded, so if the
jitted kernel equals a NumPy replay of the same sequence bit for bit, XLA did
not fuse, contract or reassociate anything, and any IEEE backend that honours
the barriers gives these bits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from superswallow_jax.methods import transcendental as T

F = np.float32


def _np_horner(coeffs, x):
    acc = np.full_like(x, F(coeffs[0]))
    for c in coeffs[1:]:
        acc = acc * x + F(c)
    return acc


def _np_flush(y):
    return np.where(np.abs(y) < F(T.FLT_MIN), F(0), y).astype(F)


def _np_pow2(k):
    return ((k + 127).astype(np.uint32) << 23).view(F)


def np_exp(x):
    """NumPy replay of :func:`T.exp`, op by op in float32."""
    with np.errstate(all="ignore"):
        x = _np_flush(x.astype(F))
        n = np.round(x * F(T.LOG2E))
        r = (x - n * F(T.LN2_HI)) - n * F(T.LN2_LO)
        y = (_np_horner(T._EXP_P, r) * (r * r) + r) + F(1)
        k = np.clip(n, -150, 150).astype(np.int32)
        half = k // 2
        y = (y * _np_pow2(np.clip(half, -126, 127))) * _np_pow2(np.clip(k - half, -126, 127))
        y = np.where(x > F(T.EXP_HI), F(np.inf), y)
        y = np.where(x < F(T.EXP_LO), F(0), _np_flush(y))
        return np.where(np.isnan(x), x, y).astype(F)


def np_log(x):
    """NumPy replay of :func:`T.log`, op by op in float32."""
    with np.errstate(all="ignore"):
        x = _np_flush(x.astype(F))
        bits = x.view(np.uint32)
        e = ((bits >> 23) & 0xFF).astype(np.int32) - 126
        m = ((bits & np.uint32(0x007FFFFF)) | np.uint32(0x3F000000)).view(F)
        small = m < F(T.SQRT_HALF)
        e = np.where(small, e - 1, e)
        f = np.where(small, m + m, m) - F(1)
        ef = e.astype(F)
        z = f * f
        y = (_np_horner(T._LOG_P, f) * f) * z
        y = y + ef * F(T.LN2_LO)
        y = y - z * F(0.5)
        y = (f + y) + ef * F(T.LN2_HI)
        y = np.where(x == 0, F(-np.inf), y)
        y = np.where(x < 0, F(np.nan), y)
        y = np.where(x == np.inf, x, y)
        return np.where(np.isnan(x), x, y).astype(F)


def _ulps(got, x, fn):
    ref = fn(x.astype(np.float64))
    spacing = np.spacing(np.abs(ref).astype(F)).astype(np.float64)
    ok = np.isfinite(ref) & (np.abs(ref) >= T.FLT_MIN)
    return np.abs(got.astype(np.float64)[ok] - ref[ok]) / spacing[ok]


def _exp_inputs(n=400_000, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.uniform(-87.3, 88.7, n), rng.uniform(-1, 1, n), rng.uniform(-1e-3, 1e-3, n // 4)]).astype(F)


def _log_inputs(n=400_000, seed=1):
    rng = np.random.default_rng(seed)
    return np.concatenate([np.exp(rng.uniform(-85, 85, n)), rng.uniform(0.5, 2, n), rng.uniform(0.99, 1.01, n)]).astype(F)


def test_exp_accuracy_within_one_ulp():
    x = _exp_inputs()
    u = _ulps(np.asarray(jax.jit(T.exp)(x)), x, np.exp)
    assert u.max() < 1.0, u.max()


def test_log_accuracy_within_one_ulp():
    x = _log_inputs()
    u = _ulps(np.asarray(jax.jit(T.log)(x)), x, np.log)
    assert u.max() < 1.0, u.max()


@pytest.mark.parametrize("fn,ref,inputs", [(T.exp, np_exp, _exp_inputs), (T.log, np_log, _log_inputs)])
def test_jit_equals_ieee_replay(fn, ref, inputs):
    x = inputs(100_000, seed=7)
    got = np.asarray(jax.jit(fn)(x))
    np.testing.assert_array_equal(got.view(np.uint32), ref(x).view(np.uint32))


@settings(max_examples=200, deadline=None)
@given(st.floats(width=32, allow_nan=True, allow_infinity=True))
def test_any_float_equals_replay(v):
    x = np.array([v], F)
    for fn, ref in ((T.exp, np_exp), (T.log, np_log)):
        got = np.asarray(jax.jit(fn)(x))
        want = ref(x)
        assert (np.isnan(got) & np.isnan(want)).all() or got.view(np.uint32)[0] == want.view(np.uint32)[0], (fn, v, got, want)


def test_special_values():
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, 88.73, -87.4, -100.0, 1.0], F)
    e = np.asarray(T.exp(jnp.asarray(x)))
    np.testing.assert_array_equal(e[[0, 1, 2, 3, 5, 6, 7, 8]], F([1, 1, np.inf, 0, 1, np.inf, 0, 0]))
    assert np.isnan(e[4]) and e[9] == F(np.e)
    y = np.array([0.0, -0.0, 1e-40, np.inf, -1.0, np.nan, 1.0], F)
    lg = np.asarray(T.log(jnp.asarray(y)))
    np.testing.assert_array_equal(lg[[0, 1, 2, 3, 6]], F([-np.inf, -np.inf, -np.inf, np.inf, 0]))
    assert np.isnan(lg[4]) and np.isnan(lg[5])
