"""Tier 1: merge kernels on tiny arrays against op-by-op references and hand-computed cases."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from superswallow_jax.host import blocks, histogram
from superswallow_jax.methods import gta, sparsify
from superswallow_jax.methods.linear import linear
from superswallow_jax.methods.numerics import rounder

from . import reference as ref

BF16 = ml_dtypes.bfloat16


def _models(rng, n, k, dtype=BF16, scale=0.02, dscale=1e-3):
    base = (rng.standard_normal(n) * scale).astype(np.float32)
    xs = [(base + rng.standard_normal(n) * dscale).astype(dtype) for _ in range(k)]
    # sprinkle exact equalities, signed zeros and sign flips
    base = base.astype(dtype)
    xs[0][:7] = base[:7]
    base[7:10] = -0.0
    return base, xs


def _gta_jax(base, xs, weights, *, d, consensus, normalize, lam=1.0):
    @jax.jit
    def f(base, xs, w, lam_):
        b, deltas = gta.task_vectors(base, xs, d=d)
        return gta.combine(b, deltas, w, lam_ if lam != 1.0 else None, d=d, consensus=consensus, normalize=normalize)

    w = np.array([ref.rnd(np.float32(x), d) for x in weights], np.float32)
    out = f(base, xs, w, np.float32(lam))
    return np.asarray(out).astype(ref.D[d])


@pytest.mark.parametrize("d", ["BF16", "F32", "F16"])
@pytest.mark.parametrize("consensus", ["sum", None])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_gta_bit_exact_against_reference(d, consensus, normalize, k):
    rng = np.random.default_rng(k * 7 + normalize)
    base, xs = _models(rng, 50_000, k)
    weights = [0.7, -0.3, 0.45][:k]
    got = _gta_jax(base, xs, weights, d=d, consensus=consensus, normalize=normalize, lam=0.9 if k == 3 else 1.0)
    want = ref.gta(
        base.astype(np.float32), [x.astype(np.float32) for x in xs], weights,
        d=d, consensus=consensus, normalize=normalize, lam=0.9 if k == 3 else 1.0,
    )
    assert got.view(np.uint8).tobytes() == want.view(np.uint8).tobytes()


def test_superswallow_single_donor_formula():
    """MERGE_SEMANTICS 2.3.1: out = rnd(B + rnd(rnd(w) * rnd(X - B))) for one donor at density 1."""
    rng = np.random.default_rng(0)
    base, (x,) = _models(rng, 100_000, 1)
    for w in (0.69921875, 0.2470703125, 0.3):
        got = _gta_jax(base, [x], [w], d="BF16", consensus="sum", normalize=False)
        b = base.astype(np.float32)
        delta = ref.rnd(x.astype(np.float32) - b, "BF16")
        want = ref.rnd(b + ref.rnd(np.float32(ref.rnd(np.float32(w), "BF16")) * delta, "BF16"), "BF16").astype(BF16)
        assert got.view(np.uint16).tolist() == want.view(np.uint16).tolist()
    # w = 0: exactly the base up to the sign of zero (the pipeline's sums start at +0.0)
    zero = _gta_jax(base, [x], [0.0], d="BF16", consensus="sum", normalize=False)
    assert np.array_equal(zero.astype(np.float32), base.astype(np.float32))


def test_gta_hand_computed_consensus():
    base = np.zeros(4, np.float32)
    xs = [np.array([1.0, -1.0, 2.0, 0.0], np.float32), np.array([-3.0, -1.0, 1.0, 0.0], np.float32)]
    out = _gta_jax(base, xs, [1.0, 1.0], d="F32", consensus="sum", normalize=False)
    # element 0: S=-2 -> sigma=-1 -> only -3 kept; element 1: both; element 2: both; element 3: zeros never vote
    assert out.tolist() == [-3.0, -2.0, 3.0, 0.0]
    out = _gta_jax(base, xs, [1.0, 1.0], d="F32", consensus="sum", normalize=True)
    assert out.tolist() == [-3.0, -1.0, 1.5, 0.0]


@pytest.mark.parametrize("d", ["BF16", "F32"])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_reference(d, normalize):
    rng = np.random.default_rng(3)
    xs = [(rng.standard_normal(30_000) * 0.02).astype(BF16) for _ in range(3)]
    w = [0.3, 0.5, 0.2]
    got = np.asarray(jax.jit(lambda xs, w: linear(xs, w, normalize=normalize, work=d))(xs, np.float32(w)))
    want = ref.linear([x.astype(np.float32) for x in xs], w, d=d, normalize=normalize).astype(np.float32)
    assert got.view(np.uint32).tolist() == want.view(np.uint32).tolist()


_normal = st.floats(-1e4, 1e4, allow_nan=False, width=32).filter(lambda v: v == 0 or abs(v) > 1e-15)


# XLA:CPU flushes float32 subnormals to zero (torch does not); products here stay normal.
@given(_normal, _normal)
@settings(max_examples=200, deadline=None)
def test_rounding_is_round_to_nearest_even(a, b):
    f = jax.jit(lambda x, y: rounder("BF16")(x * y))
    got = np.float32(f(np.float32(a), np.float32(b)))
    want = np.float32(np.float32(np.float32(a) * np.float32(b)).astype(BF16))
    assert got.tobytes() == want.tobytes()


def test_rescale_factor_rules():
    assert blocks.rescale_factor(10.0, 5.0, "BF16") == 2.0
    assert blocks.rescale_factor(0.0, 0.0, "BF16") == 1.0
    assert blocks.rescale_factor(1.0, 1e-9, "F32") == 1.0
    # ratio rounded to bf16
    assert blocks.rescale_factor(1.0, 3.0, "BF16") == float(np.float32(1 / 3).astype(BF16))


def test_magnitude_threshold_exact():
    rng = np.random.default_rng(0)
    vals = rng.standard_normal(10_001).astype(BF16).astype(np.float32)
    bits = histogram.abs_bits(vals, "BF16")
    hist = np.bincount(bits.astype(np.int64), minlength=1 << 15)
    for k in (1, 17, 5000, 10_001):
        tb, above = histogram.magnitude_threshold(hist, k)
        thr = histogram.bits_to_value(tb, "BF16")
        a = np.abs(vals)
        assert (a > thr).sum() == above
        assert above < k <= above + (a == thr).sum()
        # TIES keeps positions [0, k) of the descending order: top = the maximum, nothing skipped
        a32 = jnp.asarray(np.abs(vals))
        keep = np.asarray(jax.jit(sparsify.range_keep)(a32, np.float32(np.abs(vals).max()), np.int32(0), np.float32(thr), np.int32(k - above)))
        assert keep.sum() == k
        # ties broken by lowest flat index
        tie_idx = np.flatnonzero(a == thr)
        assert keep[tie_idx[: k - above]].all() and not keep[tie_idx[k - above :]].any()


def test_range_keep_equals_the_prefix_count_definition():
    """The scan is skipped where it cannot matter; the result must not change (many ties, all quota cases)."""
    n = 2048
    keep_fn = jax.jit(sparsify.range_keep)

    def ref(a, top, skip, bottom, quota):
        idx = lambda t: np.cumsum(t) - t  # noqa: E731  ties before each position
        tt, tb = a == top, a == bottom
        return ((a < top) | (tt & (idx(tt) >= skip))) & ((a > bottom) | (tb & (idx(tb) < quota)))

    rng = np.random.default_rng(5)
    for _ in range(200):
        a = rng.integers(0, 5, n).astype(np.float32)  # few distinct magnitudes: hundreds of ties each
        top, bottom = (np.float32(rng.integers(0, 5)) for _ in range(2))
        skip, quota = (np.int32(rng.choice([rng.integers(-5, 5), rng.integers(0, n + 5), n + 100])) for _ in range(2))
        got = np.asarray(keep_fn(jnp.asarray(a), top, skip, bottom, quota))
        np.testing.assert_array_equal(got, ref(a, top, skip, bottom, quota))


@pytest.mark.parametrize("work, dt", [("BF16", BF16), ("F16", np.float16)])
def test_della_packed_key_sort_equals_payload_sort(work, dt):
    """16-bit work dtypes rank rows with one packed uint32 key; the general path sorts (key, column) pairs."""
    rng = np.random.default_rng(3)
    for shape in [(7, 33), (16, 512), (3, 1)]:
        for kind in range(3):
            x = rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 3)
            if kind == 1:
                x = np.round(x * 4) / 4  # many ties
            if kind == 2:
                x[rng.random(shape) < 0.1] = np.inf
                x[rng.random(shape) < 0.2] = 0.0
                x[rng.random(shape) < 0.1] = -0.0
            d = jnp.asarray(x.astype(dt).astype(np.float32))
            fast = np.asarray(jax.jit(lambda d: sparsify._descending_positions(d, work))(d))
            general = np.asarray(jax.jit(lambda d: sparsify._descending_positions(d, "F32"))(d))
            np.testing.assert_array_equal(fast, general)
            assert (np.sort(fast, axis=1) == np.arange(shape[1])).all()  # a permutation per row


def test_magnitude_k():
    assert histogram.magnitude_k(0.5, 11) == 5
    assert histogram.magnitude_k(0.01, 10) == 1
    assert histogram.magnitude_k(0.0, 10) == 0


def test_fma_emulation_is_correctly_rounded():
    from superswallow_jax.methods.numerics import fma

    rng = np.random.default_rng(5)
    x = (rng.standard_normal(200_000) * 0.05).astype(np.float32)
    acc = (rng.standard_normal(200_000) * 0.01).astype(np.float32)
    for c in (0.3, 0.6, 1 / 3, -0.7, 1e-3):
        got = np.asarray(jax.jit(fma)(x, np.float32(c), acc))
        want = ref.fma(x, np.float32(c), acc)
        assert got.view(np.uint32).tolist() == want.view(np.uint32).tolist()
    # cases where separate rounding differs from a fused multiply-add
    sep = (x * np.float32(1 / 3)) + acc
    assert np.count_nonzero(sep != ref.fma(x, np.float32(1 / 3), acc)) > 0


def test_block_sums_fixed_tree_and_chunk_invariant():
    rng = np.random.default_rng(9)
    x = np.abs(rng.standard_normal(8 * blocks.BLOCK).astype(np.float32))
    got = np.asarray(jax.jit(sparsify.block_sums)(x))
    # reference: the same adjacent-pairs tree in NumPy
    y = x.reshape(-1, blocks.BLOCK)
    while y.shape[1] > 1:
        y = y[:, 0::2] + y[:, 1::2]
    assert got.tolist() == y[:, 0].tolist()
    parts = np.concatenate([np.asarray(jax.jit(sparsify.block_sums)(x[: 3 * blocks.BLOCK])),
                            np.asarray(jax.jit(sparsify.block_sums)(x[3 * blocks.BLOCK:]))])
    assert parts.tolist() == got.tolist()
    assert abs(float(got.astype(np.float64).sum()) - float(x.astype(np.float64).sum())) < 1e-3


# ---------------------------------------------------------------- output conversion


def _bf16_patterns():
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2**32, 1 << 18, dtype=np.uint64).astype(np.uint32)
    bits[:4000] &= 0x807FFFFF  # subnormals and zeros
    bits[4000:8000] |= 0x7F800000  # infinities and NaNs (both signs, all payloads)
    bits[8000:12000] = (bits[8000:12000] & 0xFFFF0000) | 0x8000  # exact ties: round to even
    bits[12000:16000] = 0x7F7F0000 | (bits[12000:16000] & 0x8000FFFF)  # around the largest finite: overflow to inf
    bits[16000:16008] = [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001]
    return bits


def test_to_bf16_equals_xla_convert_and_ml_dtypes_on_every_class():
    from superswallow_jax.methods.numerics import cast_out, to_bf16

    bits = _bf16_patterns()
    x = jnp.asarray(bits.view(np.float32))
    ours = np.asarray(jax.jit(to_bf16)(x)).view(np.uint16)
    xla = np.asarray(jax.jit(lambda v: v.astype(jnp.bfloat16))(x)).view(np.uint16)
    with np.errstate(invalid="ignore"):
        mld = bits.view(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    assert np.array_equal(ours, xla)
    assert np.array_equal(ours, mld)
    assert [hex(v) for v in ours[16000:16008]] == ["0x0", "0x8000", "0x7f80", "0xff80", "0x7fc0", "0xffc0", "0x7fc0", "0xffc0"]
    assert np.asarray(jax.jit(lambda v: cast_out(v, jnp.bfloat16))(x)).view(np.uint16).tobytes() == ours.tobytes()
    assert np.asarray(cast_out(x, np.float16)).dtype == np.float16  # other dtypes: astype


@pytest.mark.parametrize("work, n, lam", [("BF16", 3, 1.0), ("BF16", 4, 0.7), ("F16", 2, 1.3), ("F32", 5, 1.0)])
def test_task_median_against_numpy(work, n, lam):
    from superswallow_jax.dtypes import NP
    from superswallow_jax.methods.task_median import task_median

    d = NP[work]
    rng = np.random.default_rng(n)
    base = (rng.standard_normal(4096) * 0.02).astype(np.float32).astype(d)
    xs = [(base.astype(np.float32) + rng.standard_normal(4096) * 2e-3).astype(d) for _ in range(n)]
    xs[0][:3] = [np.inf, -np.inf, np.nan]  # NaN sorts last, as in torch

    def rnd(v):
        return np.asarray(v, np.float32).astype(d).astype(np.float32)

    b = rnd(base)
    deltas = np.stack([rnd(rnd(x) - b) for x in xs])
    m = np.sort(deltas, axis=0)[(n - 1) // 2]
    want = rnd(b + rnd(m * np.float32(lam)))
    got = np.asarray(jax.jit(lambda bb, *xx: task_median(bb, list(xx), jnp.float32(lam), work=work))(base, *xs))
    assert got.dtype == np.float32 and got.tobytes() == want.tobytes()
