"""Tests for superswallow_jax.prng: bit-exact agreement with JAX's threefry streams.

The reference for every stream is JAX itself (``jax.random.bits`` /
``jax.random.bernoulli`` / ``jax.random.fold_in`` / the ``threefry2x32``
primitive). Counters beyond ``2**32`` cannot be drawn from JAX without
allocating ``2**32`` elements, so there the reference is the per-element
definition ``bits[i] = xor(threefry2x32(key, (i >> 32, i & 0xFFFFFFFF)))``
evaluated with the NumPy threefry (itself checked against JAX's primitive).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.extend.random import threefry2x32_p

from superswallow_jax import prng

REPO_ROOT = Path(__file__).resolve().parents[1]
U32 = st.integers(0, 2**32 - 1)
FULL_N = 4096  # length of the whole-tensor reference draws
CHUNK_SIZES = (1, 3, 64, 1000)  # static n values: one compile each
PROBS = (0.0, 1e-7, 0.1, 0.3, 0.5, 0.9, 0.999, 1.0)


def _key(key_data) -> jax.Array:
    return jax.random.wrap_key_data(np.asarray(key_data, dtype=np.uint32))


_jax_bits = jax.jit(lambda key: jax.random.bits(key, (FULL_N,), jnp.uint32))
_jax_bernoulli = jax.jit(lambda key, p: jax.random.bernoulli(key, p, (FULL_N,)))


@functools.cache
def _jit_bits(n: int):
    return jax.jit(lambda key_data, hi, lo: prng.random_bits(key_data, hi, lo, n))


@functools.cache
def _jit_bernoulli(n: int):
    return jax.jit(lambda key_data, hi, lo, p: prng.bernoulli_mask(key_data, hi, lo, n, p))


def _reference_bits(key_data, offset: int, n: int) -> np.ndarray:
    """The defining formula, one element at a time, with explicit 64-bit counters."""
    index = [offset + j for j in range(n)]
    hi = np.array([i >> 32 for i in index], dtype=np.uint32)
    lo = np.array([i & 0xFFFFFFFF for i in index], dtype=np.uint32)
    y0, y1 = prng.threefry2x32_numpy(key_data[0], key_data[1], hi, lo)
    return y0 ^ y1


def _reference_uniform(bits: np.ndarray) -> np.ndarray:
    """JAX's float32 ``uniform`` from 32-bit draws: top 23 bits as mantissa of [1, 2), minus 1."""
    return ((bits >> np.uint32(9)) | np.uint32(0x3F800000)).view(np.float32) - np.float32(1)


# --- threefry2x32 ------------------------------------------------------------


def test_threefry_matches_jax_primitive():
    rng = np.random.default_rng(0)
    k0, k1, x0, x1 = (rng.integers(0, 2**32, size=(3, 257), dtype=np.uint32) for _ in range(4))
    want = [np.asarray(w) for w in threefry2x32_p.bind(*map(jnp.asarray, (k0, k1, x0, x1)))]
    for got in (
        prng.threefry2x32(k0, k1, x0, x1),
        jax.jit(prng.threefry2x32)(k0, k1, x0, x1),
        prng.threefry2x32_numpy(k0, k1, x0, x1),
    ):
        for g, w in zip(got, want):
            assert g.dtype == np.uint32 and g.shape == (3, 257)
            np.testing.assert_array_equal(np.asarray(g), w)


def test_threefry_scalar_key_broadcasts():
    x0 = np.arange(10, dtype=np.uint32)
    x1 = np.arange(10, 20, dtype=np.uint32) * np.uint32(2654435761)
    k0, k1 = np.uint32(0xDEADBEEF), np.uint32(7)
    want = threefry2x32_p.bind(jnp.uint32(k0), jnp.uint32(k1), jnp.asarray(x0), jnp.asarray(x1))
    for got in (prng.threefry2x32(k0, k1, x0, x1), prng.threefry2x32_numpy(k0, k1, x0, x1)):
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    y0, y1 = prng.threefry2x32_numpy(1, 2, 3, 4)  # all scalars -> 0-d arrays
    assert y0.shape == y1.shape == ()


def test_threefry_rejects_non_uint32_arrays():
    with pytest.raises(TypeError, match="uint32"):
        prng.threefry2x32(np.int32(1), np.uint32(2), np.uint32(3), np.uint32(4))


# --- random_bits / bernoulli_mask vs jax.random ------------------------------


def test_one_compile_serves_all_keys_and_offsets():
    traces = []

    @jax.jit
    def draw(key_data, hi, lo, p):
        traces.append(1)
        return prng.random_bits(key_data, hi, lo, 64), prng.bernoulli_mask(key_data, hi, lo, 64, p)

    rng = np.random.default_rng(1)
    for _ in range(20):
        key_data = rng.integers(0, 2**32, size=2, dtype=np.uint32)
        off = int(rng.integers(0, FULL_N - 64))
        p = np.float32(rng.random())
        bits, mask = draw(key_data, *prng.split_offset(off), p)
        np.testing.assert_array_equal(bits, np.asarray(_jax_bits(_key(key_data)))[off : off + 64])
        want_mask = np.asarray(_jax_bernoulli(_key(key_data), p))[off : off + 64]
        np.testing.assert_array_equal(mask, want_mask)
    assert len(traces) == 1


@settings(max_examples=60, deadline=None)
@given(key=st.tuples(U32, U32), n=st.sampled_from(CHUNK_SIZES), data=st.data())
def test_random_bits_matches_jax_bits(key, n, data):
    off = data.draw(st.integers(0, FULL_N - n), label="off")
    key_data = np.array(key, dtype=np.uint32)
    got = _jit_bits(n)(key_data, *prng.split_offset(off))
    assert got.dtype == np.uint32 and got.shape == (n,)
    np.testing.assert_array_equal(got, np.asarray(_jax_bits(_key(key_data)))[off : off + n])


@settings(max_examples=60, deadline=None)
@given(
    key=st.tuples(U32, U32),
    n=st.sampled_from(CHUNK_SIZES),
    p=st.one_of(st.sampled_from(PROBS), st.floats(0.0, 1.0, width=32)),
    data=st.data(),
)
def test_bernoulli_mask_matches_jax_bernoulli(key, n, p, data):
    off = data.draw(st.integers(0, FULL_N - n), label="off")
    key_data = np.array(key, dtype=np.uint32)
    p32 = np.float32(p)
    got = _jit_bernoulli(n)(key_data, *prng.split_offset(off), p32)
    assert got.dtype == np.bool_ and got.shape == (n,)
    want = np.asarray(_jax_bernoulli(_key(key_data), p32))[off : off + n]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 4), (4, 1, 33), (0,), (5, 0)])
def test_flat_chunks_of_multidim_draws(shape):
    key_data = prng.tensor_key_data(3, "layer.weight", 1)
    size = int(np.prod(shape))
    bits = np.asarray(jax.random.bits(_key(key_data), shape, jnp.uint32)).reshape(-1)
    mask = np.asarray(jax.random.bernoulli(_key(key_data), jnp.float32(0.7), shape)).reshape(-1)
    np.testing.assert_array_equal(prng.random_bits(key_data, 0, 0, size), bits)
    np.testing.assert_array_equal(prng.bernoulli_mask(key_data, 0, 0, size, 0.7), mask)
    off, n = size // 3, size - size // 3 - size // 4
    np.testing.assert_array_equal(prng.random_bits(key_data, 0, off, n), bits[off : off + n])


def test_bernoulli_boundary_is_strict_less_than():
    """p equal to a drawn uniform value drops that element (JAX: ``uniform < p``)."""
    key_data = prng.tensor_key_data(9, "edge", 0)
    uniform = _reference_uniform(np.asarray(_jax_bits(_key(key_data))))
    j = int(np.argmax(uniform > 0))
    for p in (uniform[j], np.nextafter(uniform[j], np.float32(1))):
        got = prng.bernoulli_mask(key_data, 0, 0, FULL_N, p)
        np.testing.assert_array_equal(got, _jax_bernoulli(_key(key_data), p))
        assert bool(got[j]) == (p > uniform[j])


def test_python_float_p_is_cast_to_float32():
    key_data = prng.tensor_key_data(0, "w", 0)
    for p in (0.1, jnp.bfloat16(0.3), np.float64(0.7)):
        want = jax.random.bernoulli(_key(key_data), jnp.float32(p), (FULL_N,))
        np.testing.assert_array_equal(prng.bernoulli_mask(key_data, 0, 0, FULL_N, p), want)


@settings(max_examples=25, deadline=None)
@given(key=st.tuples(U32, U32), sizes=st.lists(st.sampled_from(CHUNK_SIZES), min_size=1, max_size=4))
def test_chunks_concatenate_to_whole_draw(key, sizes):
    key_data = np.array(key, dtype=np.uint32)
    starts = np.cumsum([0, *sizes[:-1]])
    chunks = [(*prng.split_offset(int(s)), n) for s, n in zip(starts, sizes)]
    bits = np.concatenate([prng.random_bits(key_data, hi, lo, n) for hi, lo, n in chunks])
    mask = np.concatenate([prng.bernoulli_mask(key_data, hi, lo, n, 0.5) for hi, lo, n in chunks])
    total = sum(sizes)  # <= FULL_N, so the whole draw is a prefix of the reference
    key = _key(key_data)
    np.testing.assert_array_equal(bits, np.asarray(_jax_bits(key))[:total])
    np.testing.assert_array_equal(mask, np.asarray(_jax_bernoulli(key, np.float32(0.5)))[:total])


# --- 64-bit counters ---------------------------------------------------------


def test_reference_definition_matches_jax_below_2_32():
    key_data = prng.tensor_key_data(11, "ref", 0)
    want = np.asarray(_jax_bits(_key(key_data)))
    np.testing.assert_array_equal(_reference_bits(key_data, 0, FULL_N), want)


@pytest.mark.parametrize(
    "offset",
    [2**32 - 64, 2**32 - 3, 2**32, 2**32 + 5, 2**33 - 1, 5 * 2**32 - 3, 2**63 + 2**32 - 1, 2**64 - 64],
)
def test_counter_carries_into_high_word(offset):
    key_data = prng.tensor_key_data(5, "big.tensor", 2)
    want = _reference_bits(key_data, offset, 64)
    np.testing.assert_array_equal(_jit_bits(64)(key_data, *prng.split_offset(offset)), want)
    np.testing.assert_array_equal(prng.random_bits(key_data, *prng.split_offset(offset), 64), want)
    mask = _jit_bernoulli(64)(key_data, *prng.split_offset(offset), np.float32(0.4))
    np.testing.assert_array_equal(mask, _reference_uniform(want) < np.float32(0.4))


def test_split_offset():
    assert prng.split_offset(0) == (0, 0)
    hi, lo = prng.split_offset(5 * 2**32 - 3)
    assert (hi, lo) == (4, 2**32 - 3) and hi.dtype == lo.dtype == np.uint32
    assert prng.split_offset(2**64 - 1) == (2**32 - 1, 2**32 - 1)
    for bad in (-1, 2**64):
        with pytest.raises(ValueError):
            prng.split_offset(bad)


# --- keys --------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 42, 2**31 - 1, 2**31, 2**32 - 1])
def test_root_key_data_matches_jax_key(seed):
    got = prng.root_key_data(seed)
    assert got.dtype == np.uint32 and got.shape == (2,)
    np.testing.assert_array_equal(got, jax.random.key_data(jax.random.key(seed)))


def test_root_key_data_large_and_invalid_seeds():
    np.testing.assert_array_equal(prng.root_key_data(2**40 + 7), [2**8, 7])
    np.testing.assert_array_equal(prng.root_key_data(2**64 - 1), [2**32 - 1, 2**32 - 1])
    for bad in (-1, 2**64):
        with pytest.raises(ValueError):
            prng.root_key_data(bad)
    with pytest.raises(TypeError):
        prng.root_key_data(1.5)


def _jax_fold_in_chain(seed: int, name: str, source_index: int) -> np.ndarray:
    key = _key(prng.root_key_data(seed))
    for word in (*prng.stable_name_words(name), source_index):
        key = jax.random.fold_in(key, word)
    return np.asarray(jax.random.key_data(key))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), name=st.text(max_size=40), source_index=U32)
def test_tensor_key_data_matches_jax_fold_in_chain(seed, name, source_index):
    got = prng.tensor_key_data(seed, name, source_index)
    assert got.dtype == np.uint32 and got.shape == (2,)
    np.testing.assert_array_equal(got, _jax_fold_in_chain(seed, name, source_index))


def test_tensor_key_data_from_jax_key_constructor():
    key = jax.random.key(1234)
    for word in (*prng.stable_name_words("model.layers.3.mlp.up_proj.weight"), 2):
        key = jax.random.fold_in(key, word)
    got = prng.tensor_key_data(1234, "model.layers.3.mlp.up_proj.weight", 2)
    np.testing.assert_array_equal(got, jax.random.key_data(key))


def test_key_scheme_golden_values():
    """Pins the scheme: if this fails, the streams changed and PRNG_SCHEME must too."""
    assert prng.PRNG_SCHEME == "superswallow-threefry2x32-partitionable-v1"
    assert prng.stable_name_words("model.embed_tokens.weight") == (4241769388, 2600723754)
    key_data = prng.tensor_key_data(0, "model.embed_tokens.weight", 0)
    np.testing.assert_array_equal(key_data, [319711774, 4169164726])
    np.testing.assert_array_equal(
        prng.random_bits(key_data, 0, 0, 4), [1160269794, 2317802679, 2180713546, 1230390968]
    )


def test_tensor_key_data_rejects_bad_source_index():
    for bad in (-1, 2**32):
        with pytest.raises(ValueError):
            prng.tensor_key_data(0, "w", bad)


_SUBPROCESS_SCRIPT = """
import json, sys
import jax, numpy as np
from superswallow_jax import prng
names = ["model.embed_tokens.weight", "lm_head.weight", "ñ/層.weight", ""]
key_data = prng.tensor_key_data(7, "model.layers.0.self_attn.q_proj.weight", 1)
hi, lo = prng.split_offset(2**32 - 20)
print(json.dumps({
    "x64": bool(jax.config.jax_enable_x64),
    "hash_differs": hash("abc"),
    "keys": [prng.tensor_key_data(seed, n, i).tolist()
             for seed in (0, 2**40 + 7) for n in names for i in (0, 3)],
    "root": prng.root_key_data(2**40 + 7).tolist(),
    "bits": prng.random_bits(key_data, hi, lo, 40).tolist(),
    "bits_int_offsets": prng.random_bits(key_data, int(hi), int(lo), 40).tolist(),
    "mask": prng.bernoulli_mask(key_data, hi, lo, 40, 0.3).tolist(),
}))
"""


def _run_isolated(hash_seed: str, x64: str) -> dict:
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, JAX_ENABLE_X64=x64, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_SCRIPT],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_stable_across_processes_hash_seeds_and_x64():
    runs = [_run_isolated("1", "0"), _run_isolated("2", "1")]
    assert [r["x64"] for r in runs] == [False, True]
    assert runs[0]["hash_differs"] != runs[1]["hash_differs"]  # the seeds really differ
    for r in runs:
        r.pop("x64"), r.pop("hash_differs")
    assert runs[0] == runs[1]
    here = runs[0]
    key_data = prng.tensor_key_data(7, "model.layers.0.self_attn.q_proj.weight", 1)
    assert here["bits"] == here["bits_int_offsets"]
    assert here["bits"] == _reference_bits(key_data, 2**32 - 20, 40).tolist()
    assert here["mask"] == (_reference_uniform(np.array(here["bits"], np.uint32)) < np.float32(0.3)).tolist()
    assert here["root"] == [256, 7]
    names = ["model.embed_tokens.weight", "lm_head.weight", "ñ/層.weight", ""]
    want_keys = [prng.tensor_key_data(s, n, i).tolist() for s in (0, 2**40 + 7) for n in names for i in (0, 3)]
    assert here["keys"] == want_keys


# --- compile time inside merge kernels ----------------------------------------


def _dare_like_kernel(n):
    """A DARE chunk kernel's shape: bf16 in, mask, a chain of bf16 roundings, bf16 out."""
    rp = functools.partial(jax.lax.reduce_precision, exponent_bits=8, mantissa_bits=7)

    @jax.jit
    def run(x0, x1, key_data, hi, lo, p, w, factor):
        b = x0.astype(jnp.float32)
        delta = rp(x1.astype(jnp.float32) - b)
        keep = prng.bernoulli_mask(key_data, hi, lo, n, p).astype(jnp.float32)
        bits = prng.random_bits(key_data, hi, lo, n)  # della's path: bits -> uniform < p
        keep2 = (jax.lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32) - 1.0) < p
        kept = rp(rp(rp(delta * keep) * factor) * keep2.astype(jnp.float32))
        return rp(b + rp(w * kept)).astype(jnp.bfloat16)

    return run


def test_stream_stays_out_of_consumer_fusions():
    """The threefry must not fuse into the caller's kernel (see "Fusion barrier" in prng)."""
    n = 256
    args = (jnp.zeros(n, jnp.bfloat16), jnp.ones(n, jnp.bfloat16), np.array([1, 2], np.uint32),
            np.uint32(0), np.uint32(0), np.float32(0.5), np.float32(0.5), np.float32(2.0))
    text = _dare_like_kernel(n).lower(*args).as_text()
    assert text.count("optimization_barrier") >= 2


def test_dare_like_kernel_compiles_quickly():
    """Regression: with jaxlib 0.11.2 this kernel took ~10 s (LLVM, exponential) to compile on CPU
    when the mask fused into it; with the barrier it takes ~0.1 s. The bound is generous."""
    import time

    n = 4096
    args = (jnp.zeros(n, jnp.bfloat16), jnp.ones(n, jnp.bfloat16), np.array([1, 2], np.uint32),
            np.uint32(0), np.uint32(0), np.float32(0.5), np.float32(0.5), np.float32(2.0))
    lowered = _dare_like_kernel(n).lower(*args)
    start = time.perf_counter()
    compiled = lowered.compile()
    assert time.perf_counter() - start < 5.0
    out = np.asarray(compiled(*args).astype(jnp.float32))
    keep = np.asarray(prng.bernoulli_mask(args[2], 0, 0, n, 0.5))  # keep2 draws the same uniforms
    np.testing.assert_array_equal(out, np.where(keep, 1.0, 0.0).astype(np.float32))


# --- statistics and hygiene --------------------------------------------------


def test_keep_fraction_and_extreme_probabilities():
    key_data = prng.tensor_key_data(0, "stats", 0)
    n = 2**20
    frac = float(np.mean(prng.bernoulli_mask(key_data, 0, 0, n, 0.5)))
    assert abs(frac - 0.5) < 0.005  # within 1% of p (std is ~0.0005)
    assert not np.any(prng.bernoulli_mask(key_data, 0, 0, n, 0.0))
    assert np.all(prng.bernoulli_mask(key_data, 0, 0, n, 1.0))


def test_arguments_are_not_mutated():
    key_data = np.array([1, 2], dtype=np.uint32)
    x = np.arange(8, dtype=np.uint32)
    hi, lo = np.uint32(0), np.uint32(5)
    prng.random_bits(key_data, hi, lo, 8)
    prng.bernoulli_mask(key_data, hi, lo, 8, np.float32(0.5))
    prng.threefry2x32_numpy(key_data[0], key_data[1], x, x)
    prng.threefry2x32(key_data[0], key_data[1], x, x)
    np.testing.assert_array_equal(key_data, [1, 2])
    np.testing.assert_array_equal(x, np.arange(8))
    a = prng.root_key_data(3)
    a[:] = 0
    np.testing.assert_array_equal(prng.root_key_data(3), [0, 3])  # fresh array each call


@pytest.mark.parametrize(
    "args, error",
    [
        ((np.array([1, 2], dtype=np.int32), 0, 0, 4), TypeError),
        ((np.array([1, 2, 3], dtype=np.uint32), 0, 0, 4), ValueError),
        ((np.array([1, 2], dtype=np.uint32), np.int64(0), 0, 4), TypeError),
        ((np.array([1, 2], dtype=np.uint32), 0, 2**32, 4), ValueError),
        ((np.array([1, 2], dtype=np.uint32), 0, -1, 4), ValueError),
        ((np.array([1, 2], dtype=np.uint32), 0, 0, -1), ValueError),
    ],
)
def test_random_bits_validates_arguments(args, error):
    with pytest.raises(error):
        prng.random_bits(*args)
