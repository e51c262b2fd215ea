"""Tier 1: the LoRA kernels on tiny arrays against exact rational references."""

import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from superswallow_jax.lora import kernel
from superswallow_jax.lora.fetch import chunk_rows

from . import reference_lora as ref

_fma_dot = jax.jit(kernel.fma_dot)


def _f32(rng, shape, lo=-20, hi=20):
    """float32 values with random signs and exponents over a wide range."""
    return (rng.standard_normal(shape) * np.exp2(rng.integers(lo, hi, shape))).astype(np.float32)


def test_split_and_two_prod_are_exact():
    rng = np.random.default_rng(0)
    a, b = _f32(rng, 20_000), _f32(rng, 20_000)
    hi, lo = map(np.asarray, jax.jit(kernel.split)(a))
    assert np.array_equal(hi.astype(np.float64) + lo.astype(np.float64), a.astype(np.float64))
    # each half has at most 12 significant bits: scaled to an integer it is below 2**12
    for h in (hi, lo):
        nz = h != 0
        m, _ = np.frexp(h[nz].astype(np.float64))
        assert np.all(np.abs(m * 2**12) == np.round(np.abs(m * 2**12)))

    def tp(a, b):
        ah, al = kernel.split(a)
        bh, bl = kernel.split(b)
        return kernel.two_prod(a, ah, al, b, bh, bl)

    p, e = map(np.asarray, jax.jit(tp)(a, b))
    assert np.array_equal(p, a * b)
    assert np.array_equal(p.astype(np.float64) + e.astype(np.float64), a.astype(np.float64) * b.astype(np.float64))


def test_odd_sum_rounds_to_odd():
    x = np.array([1.0, 1.0, 1.0, -1.0, 3.0, 2.0**24], np.float32)
    y = np.array([2.0**-30, -(2.0**-30), 2.0**-23, -(2.0**-30), 0.0, 1.0], np.float32)
    got = np.asarray(jax.jit(kernel.odd_sum)(x, y))
    up, down = np.nextafter(np.float32(1), np.float32(2)), np.nextafter(np.float32(1), np.float32(0))
    # inexact sums land on the odd neighbour toward the exact value; exact ones stay
    assert got.tolist() == [up, down, np.float32(1 + 2.0**-23), -up, 3.0, np.float32(2.0**24 + 2)]


def test_fma_chain_matches_exact_reference_on_near_ties():
    """Few-bit factors make a*b + acc land on or next to a half-way point, where a float64 emulation
    (product exact, sum rounded twice) goes wrong; the kernel does not."""
    rng = np.random.default_rng(1)
    lhs = (rng.integers(1, 1 << 12, (6, 8)) * np.exp2(rng.integers(-14, -8, (6, 8))) * rng.choice([-1, 1], (6, 8)))
    rhs = (rng.integers(1, 1 << 12, (8, 7)) * np.exp2(rng.integers(-14, -8, (8, 7))) * rng.choice([-1, 1], (8, 7)))
    lhs[:, 0] *= 2.0**20  # a large first term: later products fall near its rounding points
    lhs, rhs = lhs.astype(np.float32), rhs.astype(np.float32)
    want = ref.seq_dot(lhs, rhs)
    assert np.array_equal(np.asarray(_fma_dot(lhs, rhs)), want)
    naive = lhs.astype(np.float64) @ rhs.astype(np.float64)
    assert not np.array_equal(naive.astype(np.float32), want)  # the order matters on these values


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_fma_chain_matches_exact_reference(seed):
    rng = np.random.default_rng(seed)
    lhs, rhs = _f32(rng, (4, 6), -12, 4), _f32(rng, (6, 5), -12, 4)
    assert np.array_equal(np.asarray(_fma_dot(lhs, rhs)), ref.seq_dot(lhs, rhs))


@pytest.mark.parametrize("code", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("round_delta", [False, True])
def test_lora_rows_follow_peft_order(code, round_delta):
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((5, 6)) * 0.02).astype(np.float32)  # stored float32, loaded as `code`
    lhs = (rng.standard_normal((5, 4)) * 0.02).astype(ml_dtypes.bfloat16)
    rhs = rng.uniform(-0.5, 0.5, (4, 6)).astype(np.float32)
    scale = 16 / np.sqrt(8)  # rsLoRA: not a float32 number
    got = jax.jit(lambda *x: kernel.lora_rows(*x, code, round_delta))(w, lhs, rhs, np.float32(scale))
    want = ref.merged_rows(w, lhs, rhs, scale, code, round_delta)
    assert np.asarray(got).dtype == want.dtype
    assert np.array_equal(np.asarray(got).view(np.uint8), want.view(np.uint8))
    # used inside a bigger float32 computation, the roundings stay (XLA may fold a convert pair away)
    wider = jax.jit(lambda *x: kernel.lora_rows(*x, code, round_delta).astype(np.float32) - x[0])(
        w, lhs, rhs, np.float32(scale))
    assert np.array_equal(np.asarray(wider), want.astype(np.float32) - w)


def test_lora_chunk_cuts_and_zero_pads():
    rng = np.random.default_rng(3)
    cols, n = 7, 16
    rows = chunk_rows(n, cols)
    assert rows * cols >= cols - 1 + n  # any start in a row fits
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    lhs, rhs = rng.standard_normal((rows, 3)).astype(np.float32), rng.standard_normal((3, cols)).astype(np.float32)
    full = ref.merged_rows(w, lhs, rhs, 2.0, "F32").reshape(-1)
    f = jax.jit(lambda *x: kernel.lora_chunk(*x, "F32", n))
    for off, count in [(0, n), (6, 9), (3, 1)]:
        got = np.asarray(f(w, lhs, rhs, np.float32(2.0), np.int32(off), np.int32(count)))
        assert np.array_equal(got[:count], full[off : off + count]) and not got[count:].any()
