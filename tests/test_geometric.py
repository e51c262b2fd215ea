"""Tier 1: the geometric methods (slerp, nuslerp, multislerp, karcher, model_stock,
nearswap, arcee_fusion) against whole-array NumPy references, chunked vs whole,
and arcee_fusion's quantile sampling by statistics."""

import math
from types import SimpleNamespace

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from superswallow_jax import prng
from superswallow_jax.errors import ConfigError
from superswallow_jax.host import vecsum
from superswallow_jax.registry import METHODS
from superswallow_jax.programs import load
from superswallow_jax.programs import geometric as geo
from superswallow_jax.stream import ChunkPasses, StepContext, bucket_for, pad

from . import reference_geometric as ref

BF16 = ml_dtypes.bfloat16


class FakeCtx(ChunkPasses):
    """The parts of a StepContext the chunk programs use, over in-memory arrays."""

    stage = None
    tensor_key = StepContext.tensor_key

    def __init__(self, arrays, *, work, out=None, params=None, per_model=None, base=None, chunk=1 << 20, seed=0, name="t"):
        shape = arrays[0].shape
        numel = math.prod(shape)
        per_model = per_model or [{} for _ in arrays]
        self.arrays = [np.ascontiguousarray(x).reshape(-1) for x in arrays]
        self.step = SimpleNamespace(
            name=name, shape=shape, numel=numel, work_dtype=work, out_dtype=out or work, base=base,
            params=params or {}, sources=tuple(SimpleNamespace(params=p, model=i) for i, p in enumerate(per_model)),
            donors=tuple(i for i in range(len(arrays)) if i != base),
        )
        self.seed, self.chunk, self.bucket = seed, chunk, bucket_for(numel, chunk)

    def chunks(self):
        for a in range(0, self.step.numel, self.chunk):
            yield a, min(self.step.numel, a + self.chunk)

    def inputs(self, a, b):
        return [pad(x[a:b], self.bucket) for x in self.arrays]

    def release(self, a, b):
        pass


def run(kind, arrays, chunk=1 << 20, **kw):
    ctx = FakeCtx(arrays, chunk=chunk, **kw)
    prog = load(METHODS[kind])(ctx)
    parts = [np.asarray(prog(ctx.inputs(a, b), a, b))[: b - a] for a, b in ctx.chunks()]
    return np.concatenate(parts).reshape(ctx.step.shape)


def same_bits(x, y):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    bad = np.flatnonzero(x.view(np.uint8) != y.view(np.uint8))
    assert bad.size == 0, f"{bad.size} bytes differ"


def models(rng, shape, k, dtype=BF16, scale=0.02, dscale=2e-3):
    base = (rng.standard_normal(shape) * scale).astype(np.float32)
    xs = [(base + rng.standard_normal(shape) * dscale).astype(dtype) for _ in range(k)]
    return base.astype(dtype), xs


SHAPE = (24, 100)  # 2400 elements: rows cross the 1024-element chunk grid
CHUNKED = 1024


# ---------------------------------------------------------------- nearswap


@pytest.mark.parametrize("d", ["BF16", "F16", "F32"])
def test_nearswap_bit_exact(d):
    rng = np.random.default_rng(1)
    a, (b,) = models(rng, SHAPE, 1)
    b[0, :5] = a[0, :5]  # |a - b| = 0 -> weight min(1, t / 1e-6)
    got = run("nearswap", [a, b], work=d, params={"t": 0.003}, base=0)
    same_bits(got, ref.nearswap(a.astype(np.float32), b.astype(np.float32), 0.003, d))
    same_bits(run("nearswap", [a, b], chunk=CHUNKED, work=d, params={"t": 0.003}, base=0), got)


# ---------------------------------------------------------------- slerp


@pytest.mark.parametrize("d", ["BF16", "F32"])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.75])
def test_slerp_bit_exact(d, t):
    rng = np.random.default_rng(2)
    _, (x0, x1) = models(rng, SHAPE, 2, dscale=0.02)
    got = run("slerp", [x1, x0], work=d, params={"t": t}, base=1)  # base is the second source
    same_bits(got, ref.slerp(x0.astype(np.float32), x1.astype(np.float32), t, d))
    same_bits(run("slerp", [x1, x0], chunk=CHUNKED, work=d, params={"t": t}, base=1), got)


def test_slerp_linear_branch_and_parts():
    # nearly parallel: |dot| > 0.9995 -> linear coefficients
    assert geo.slerp_coefficients(np.float32(0.9999), np.float32(0.25)) == (np.float32(0.75), np.float32(0.25))
    # the norm of per-2^20-part norms: one part gives its norm back exactly
    assert geo.slerp_norm([2.0]) == np.float32(np.sqrt(np.float32(2.0)))
    assert geo.slerp_norm([1.0, 3.0]) == np.float32(2.0)


# ---------------------------------------------------------------- nuslerp


@pytest.mark.parametrize("mode", ["flat", "rows", "cols"])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_bit_exact(mode, with_base):
    rng = np.random.default_rng(3)
    base, (x0, x1) = models(rng, SHAPE, 2)
    x1[3] = x0[3]  # a colinear row
    params = {"nuslerp_flatten": mode == "flat", "nuslerp_row_wise": mode == "cols"}
    arrays = [x0, x1] + ([base] if with_base else [])
    pm = [{"weight": 0.6}, {"weight": 0.3}] + ([{"weight": None}] if with_base else [])
    kw = dict(work="BF16", params=params, per_model=pm, base=2 if with_base else None)
    got = run("nuslerp", arrays, **kw)
    want = ref.nuslerp(*(x.astype(np.float32) for x in (x0, x1)), 0.6, 0.3, "BF16",
                       base=base.astype(np.float32) if with_base else None,
                       flatten=mode == "flat", row_wise=mode == "cols")
    same_bits(got, want)
    same_bits(run("nuslerp", arrays, chunk=CHUNKED, **kw), got)


# ---------------------------------------------------------------- multislerp


@pytest.mark.parametrize("d", ["BF16", "F32"])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_bit_exact(d, normalize):
    rng = np.random.default_rng(4)
    base, xs = models(rng, SHAPE, 3)
    w = [0.5, 0.3, 0.2]
    kw = dict(work=d, params={"normalize_weights": normalize, "eps": 1e-8}, per_model=[{}] + [{"weight": x} for x in w], base=0)
    got = run("multislerp", [base, *xs], **kw)
    same_bits(got, ref.multislerp([x.astype(np.float32) for x in xs], w, d, base=base.astype(np.float32), normalize=normalize))
    same_bits(run("multislerp", [base, *xs], chunk=CHUNKED, **kw), got)


def test_multislerp_single_model_is_copied():
    rng = np.random.default_rng(5)
    base, (x,) = models(rng, SHAPE, 1)
    got = run("multislerp", [base, x], work="BF16", params={"normalize_weights": True, "eps": 1e-8},
              per_model=[{}, {"weight": 0.4}], base=0)
    same_bits(got, x)


# ---------------------------------------------------------------- karcher


@pytest.mark.parametrize("d", ["BF16", "F32"])
def test_karcher_bit_exact(d):
    rng = np.random.default_rng(6)
    base, xs = models(rng, SHAPE, 2, dscale=0.01)
    arrays = [base, *xs]
    kw = dict(work=d, params={"max_iter": 10, "tol": 1e-5}, base=0)
    got = run("karcher", arrays, **kw)
    same_bits(got, ref.karcher([x.astype(np.float32) for x in arrays], d))
    if d == "BF16":  # (each chunking compiles the iteration kernels again)
        same_bits(run("karcher", arrays, chunk=CHUNKED, **kw), got)


def test_karcher_zero_inputs_and_iterations():
    z = np.zeros(SHAPE, np.float32)
    assert not run("karcher", [z, z], work="F32", params={"max_iter": 3, "tol": 1e-5}).any()
    rng = np.random.default_rng(7)
    _, xs = models(rng, SHAPE, 3, dtype=np.float32, dscale=0.02)
    for it in (0, 1, 3):
        got = run("karcher", xs, work="F32", params={"max_iter": it, "tol": 1e-5})
        same_bits(got, ref.karcher(xs, "F32", max_iter=it))
    # a huge tol: every input is "zero" -> zeros; a loose tol stops the iteration early
    assert not run("karcher", xs, work="F32", params={"max_iter": 3, "tol": 1e9}).any()
    same_bits(run("karcher", xs, work="F32", params={"max_iter": 10, "tol": 0.05}), ref.karcher(xs, "F32", tol=0.05))


# ---------------------------------------------------------------- model_stock


@pytest.mark.parametrize("d", ["BF16", "F32"])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_bit_exact(d, filter_wise):
    rng = np.random.default_rng(8)
    base, xs = models(rng, SHAPE, 3)
    kw = dict(work=d, params={"filter_wise": filter_wise}, base=0)
    got = run("model_stock", [base, *xs], **kw)
    same_bits(got, ref.model_stock(base.astype(np.float32), [x.astype(np.float32) for x in xs], d, filter_wise))
    same_bits(run("model_stock", [base, *xs], chunk=CHUNKED, **kw), got)


def test_model_stock_zero_offsets_keep_base():
    rng = np.random.default_rng(9)
    base, _ = models(rng, SHAPE, 0)
    got = run("model_stock", [base, base, base], work="BF16", params={"filter_wise": False}, base=0)
    assert np.array_equal(got.astype(np.float32), base.astype(np.float32))


# ---------------------------------------------------------------- arcee_fusion


@pytest.mark.parametrize("d", ["BF16", "F32"])
def test_arcee_fusion_bit_exact(d):
    rng = np.random.default_rng(10)
    a, (b,) = models(rng, SHAPE, 1, dscale=0.01)
    exp = lambda x: np.asarray(jnp.exp(jnp.asarray(x, jnp.float32)))  # noqa: E731  (XLA's float32 exp)
    log = lambda x: np.asarray(jnp.log(jnp.asarray(x, jnp.float32)))  # noqa: E731
    got = run("arcee_fusion", [a, b], work=d, out="F32", base=0)
    want = ref.arcee_fusion(a.astype(np.float32), b.astype(np.float32), d, exp=exp, log=log)
    same_bits(got, want)
    mask = got != a.astype(np.float32)
    assert 0 < mask.mean() < 0.5
    same_bits(run("arcee_fusion", [a, b], chunk=CHUNKED, work=d, out="F32", base=0), got)


def test_arcee_fusion_sample_is_uniform_and_seeded():
    n = 3_000_001
    key = prng.tensor_key_data(0, "model.layers.0.mlp.up_proj.weight", 1)
    idx = geo.sample_indices(key, n)
    assert idx.size == 1_000_000 and idx.min() >= 0 and idx.max() < n and np.all(np.diff(idx) >= 0)
    counts = np.bincount(idx * 20 // n, minlength=20)  # 20 equal bins: 50000 expected each
    chi2 = float(((counts - 50_000.0) ** 2 / 50_000.0).sum())
    assert chi2 < 45.3  # 99.99th percentile of chi2(19)
    assert np.array_equal(idx, geo.sample_indices(key, n))
    other = geo.sample_indices(prng.tensor_key_data(1, "model.layers.0.mlp.up_proj.weight", 1), n)
    assert not np.array_equal(idx, other)


def test_arcee_fusion_sampled_threshold_close_to_exact():
    """Above 10^6 elements the quartiles come from 10^6 draws: the threshold (and so
    the mask) is close to the one from all elements."""
    rng = np.random.default_rng(11)
    vals = np.abs(rng.standard_normal(2_500_000)).astype(np.float32)
    exact = geo.quartile_threshold(vals, "F32")
    key = prng.tensor_key_data(0, "t", 1)
    sampled = geo.quartile_threshold(vals[geo.sample_indices(key, vals.size)], "F32")
    assert abs(sampled - exact) / exact < 0.01
    flips = np.count_nonzero((vals >= exact) != (vals >= sampled)) / vals.size
    assert flips < 2e-3


def test_arcee_fusion_large_tensor_uses_sample_and_is_chunk_invariant():
    rng = np.random.default_rng(12)
    shape = (1100, 1000)
    a = (rng.standard_normal(shape) * 0.02).astype(BF16)
    b = (a.astype(np.float32) + rng.standard_normal(shape) * 2e-3).astype(BF16)
    whole = run("arcee_fusion", [a, b], work="BF16", out="F32", base=0, chunk=1 << 21)
    chunked = run("arcee_fusion", [a, b], work="BF16", out="F32", base=0, chunk=1 << 18)
    same_bits(whole, chunked)
    mask = whole != a.astype(np.float32)
    ref_mask = ref.arcee_fusion(a.astype(np.float32), b.astype(np.float32), "BF16") != a.astype(np.float32)
    assert np.count_nonzero(mask != ref_mask) / mask.size < 2e-3


# ---------------------------------------------------------------- statistics helpers


@pytest.mark.parametrize("kind", ["flat", "rows", "cols"])
def test_vector_sums_do_not_depend_on_chunking(kind):
    rng = np.random.default_rng(13)
    shape = (37, 300)
    v = rng.standard_normal(shape) * np.exp(rng.uniform(-20, 20, shape))
    lay = getattr(vecsum.Layout, kind)(shape)
    results = []
    for chunk in (1024, 3072, 1 << 20):
        s = vecsum.VectorSums(lay, 1)
        for a in range(0, v.size, chunk):
            b = min(v.size, a + chunk)
            s.add(a, b, [v.reshape(-1)[a:b]])
        results.append(s.totals())
    assert all(np.array_equal(results[0], r) for r in results[1:])
    exact = {"flat": [math.fsum(v.ravel())], "rows": [math.fsum(r) for r in v],
             "cols": [math.fsum(c) for c in v.T]}[kind]
    np.testing.assert_allclose(results[0][0], exact, rtol=1e-12, atol=0)


def test_lane_sum_of_squares_is_torchs_order_for_any_chunking():
    rng = np.random.default_rng(14)
    for n in (5, 1024, 4100, 9 * 1024 + 3, 100_003):  # the last: 12,500 rows in one NumPy reduction
        x = (rng.standard_normal(n) * np.exp(rng.uniform(-5, 5, n))).astype(np.float32)
        want = ref.torch_norm32(x)
        for chunk in (1024, 2048, 1 << 20):
            acc = vecsum.LaneSumSq(n, 1)
            for a in range(0, n, chunk):
                acc.add(a, min(n, a + chunk), [x[a : a + chunk]])
            assert np.sqrt(acc.sums()[0, 0]) == want
    # parts: each 2048-element slice is its own vector
    x = rng.standard_normal(5000).astype(np.float32)
    acc = vecsum.LaneSumSq(5000, 1, part=2048)
    for a in range(0, 5000, 1024):
        acc.add(a, min(5000, a + 1024), [x[a : a + 1024]])
    want = [ref.torch_norm32(x[p : p + 2048]) for p in range(0, 5000, 2048)]
    assert np.array_equal(np.sqrt(acc.sums()[0]), np.array(want, np.float32))


def test_lane_sums_of_several_vectors_at_once_equal_each_alone():
    """k vectors reduced side by side ([rows, k * 8]) give each vector's torch-order bits."""
    rng = np.random.default_rng(15)
    for n, k in ((100_003, 3), (9 * 1024 + 3, 7), (4100, 16)):
        xs = [(rng.standard_normal(n) * np.exp(rng.uniform(-5, 5, n))).astype(np.float32) for _ in range(k)]
        acc = vecsum.LaneSumSq(n, k)
        for a in range(0, n, 2048):
            acc.add(a, min(n, a + 2048), [x[a : a + 2048] for x in xs])
        assert np.array_equal(np.sqrt(acc.sums()[:, 0]), np.array([ref.torch_norm32(x) for x in xs], np.float32))


@pytest.mark.parametrize("rows,width", [(8192, 8), (12_500, 24), (20_001, 16), (5, 8), (0, 8)])
def test_lane_chain_adds_each_column_in_row_order(rows, width, monkeypatch):
    """The XLA:CPU scan (long chains, zero-padded to a power of two) and the NumPy
    reduction (short chains, or no CPU backend) both equal a sequential float32 loop."""
    rng = np.random.default_rng(rows + width)
    sq = (rng.standard_normal((rows, width)) * np.exp(rng.uniform(-8, 8, (rows, width)))).astype(np.float32) ** 2
    if rows:
        sq[0] += (rng.standard_normal(width).astype(np.float32) ** 2) * np.float32(rows)  # a running total
    want = np.add.accumulate(np.concatenate([np.zeros((1, width), np.float32), sq]), axis=0, dtype=np.float32)[-1]
    before = sq.copy()
    got = vecsum.lane_chain(sq)
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.array_equal(sq, before)  # argument untouched
    if rows >= vecsum.CHAIN_MIN_ROWS:
        assert vecsum._chain_program() is not None  # the scan ran
        monkeypatch.setattr(vecsum, "_chain_program", lambda: None)  # a JAX without a CPU backend
        assert np.array_equal(vecsum.lane_chain(sq).view(np.uint32), want.view(np.uint32))


def test_statistics_pass_dispatches_ahead_and_consumes_in_order():
    """Chunk k + 1's computation starts before chunk k is reduced; the host sees chunks in order."""
    from superswallow_jax.programs.geometric import _each_chunk

    log = []

    class Ctx(ChunkPasses):  # the primitive every multi-pass method uses (StepContext.each_chunk)
        def chunks(self):
            return iter([(0, 4), (4, 8), (8, 10)])

        def inputs(self, a, b):
            log.append(("read", a))
            return [a]

        def release(self, a, b):
            log.append(("release", a))

    _each_chunk(Ctx(), lambda a, b, xs: log.append(("dispatch", a)) or xs[0] * 10,
                lambda a, b, out: log.append(("consume", a, out)))
    assert log == [
        ("read", 0), ("dispatch", 0),
        ("read", 4), ("dispatch", 4), ("consume", 0, 0), ("release", 0),
        ("read", 8), ("dispatch", 8), ("consume", 4, 40), ("release", 4),
        ("consume", 8, 80), ("release", 8),
    ]


def test_fma32_is_correctly_rounded():
    from fractions import Fraction

    from superswallow_jax.host.scalar import fma32

    rng = np.random.default_rng(15)
    x, y, z = (rng.standard_normal((3, 2000)) * np.exp(rng.uniform(-8, 8, (3, 2000)))).astype(np.float32)
    for a, b, c in zip(x, y, z):
        got = fma32(a, b, c)
        exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
        near = [np.nextafter(got, np.float32(np.inf)), np.nextafter(got, np.float32(-np.inf))]
        err = abs(Fraction(float(got)) - exact)
        # nearest float32, ties to even
        assert all(err < abs(Fraction(float(n)) - exact) or (err == abs(Fraction(float(n)) - exact)
                   and int(np.array(got).view(np.uint32)) % 2 == 0) for n in near)


# ---------------------------------------------------------------- registry and plan


def test_registry_names_and_defaults():
    m = METHODS
    assert m["slerp"].global_["t"].required and m["slerp"].base == "required"
    assert m["nuslerp"].global_["nuslerp_flatten"].default is True
    assert m["nuslerp"].global_["nuslerp_row_wise"].default is False
    assert m["multislerp"].global_["eps"].default == 1e-8 and m["multislerp"].global_["normalize_weights"].default
    assert m["karcher"].global_["max_iter"].default == 10 and m["karcher"].global_["max_iter"].type is int
    assert m["karcher"].global_["tol"].default == 1e-5
    assert m["model_stock"].global_["filter_wise"].default is False
    assert m["nearswap"].global_["t"].required
    assert m["arcee_fusion"].result_dtype == "F32" and not m["arcee_fusion"].params


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from superswallow_jax.tiny import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("geo_models"))


def _config(tiny_models, text):
    from superswallow_jax.config import parse_config

    root = str(tiny_models["llama"].parent) + "/"
    return parse_config(text.replace("models/", root))


def _plan_text(method, models_, base, params=""):
    lines = ["models:"] + [f"  - model: {x}" for x in models_]
    return "\n".join(lines) + f"\nmerge_method: {method}\n" + (f"base_model: {base}\n" if base else "") + params + "tokenizer_source: union\n"


@pytest.mark.parametrize("method, models_, base, needle", [
    ("slerp", ["models/llama", "models/tulu", "models/hermes"], "models/llama", "exactly 2 input models"),
    ("nearswap", ["models/tulu"], "models/llama", None),
    ("model_stock", ["models/llama", "models/tulu"], "models/llama", "at least 3 input models"),
    ("nuslerp", ["models/tulu", "models/hermes", "models/swallow"], None, "exactly 2 models besides the base"),
    ("slerp", ["models/llama", "models/tulu"], None, "needs a base model"),
])
def test_input_contract_errors(tiny_models, method, models_, base, needle):
    from superswallow_jax.plan import build_plan

    params = "parameters:\n  t: 0.5\n" if method in ("slerp", "nearswap") else ""
    cfg = _config(tiny_models, _plan_text(method, models_, base, params))
    if needle is None:
        build_plan(cfg)  # the base is appended: exactly base + one other
        return
    with pytest.raises(ConfigError, match=needle):
        build_plan(cfg)


def test_nuslerp_base_needs_no_weight_and_karcher_max_iter_is_int(tiny_models):
    from superswallow_jax.plan import build_plan

    text = _plan_text("nuslerp", ["models/tulu", "models/hermes"], "models/llama")
    text = text.replace("models/tulu\n", "models/tulu\n    parameters: {weight: 0.5}\n")
    text = text.replace("models/hermes\n", "models/hermes\n    parameters: {weight: 0.5}\n")
    plan = build_plan(_config(tiny_models, text))
    assert plan.steps[0].base == 2 and "weight" not in plan.steps[0].sources[2].params
    plan = build_plan(_config(tiny_models, _plan_text("karcher", ["models/llama", "models/tulu"], None, "parameters:\n  max_iter: 4\n")))
    assert plan.steps[0].params["max_iter"] == 4 and isinstance(plan.steps[0].params["max_iter"], int)
    with pytest.raises(ConfigError, match="expected int"):
        build_plan(_config(tiny_models, _plan_text("karcher", ["models/llama", "models/tulu"], None, "parameters:\n  max_iter: 2.5\n")))


def test_arcee_fusion_writes_float32(tiny_models):
    from superswallow_jax.plan import build_plan

    plan = build_plan(_config(tiny_models, _plan_text("arcee_fusion", ["models/llama", "models/tulu"], "models/llama") + "dtype: bfloat16\n"))
    assert {s.out_dtype for s in plan.steps} == {"F32"} and {s.work_dtype for s in plan.steps} == {"BF16"}


@pytest.mark.parametrize("name", ["slerp.yaml", "model-stock.yaml"])
def test_chunked_equals_whole_end_to_end(tiny_models, tmp_path, name):
    """A merge with chunks that split rows writes the same bytes as one with whole tensors."""
    from pathlib import Path

    from superswallow_jax.io.checkpoint import Checkpoint
    from superswallow_jax.merge import run_merge
    from superswallow_jax.options import MergeOptions

    text = (Path(__file__).resolve().parents[1] / "configs" / "examples" / name).read_text()
    if name == "model-stock.yaml":
        text = text.replace("merge_method: model_stock", "merge_method: model_stock\nparameters:\n  filter_wise: true")
    cfg = _config(tiny_models, text)
    outs = []
    for sub, chunk in (("whole", 1 << 24), ("chunked", 1024 * 3)):
        run_merge(cfg, tmp_path / sub, MergeOptions(fsync=False, chunk_elems=chunk))
        ck = Checkpoint(tmp_path / sub)
        outs.append({n: np.ascontiguousarray(ck.view(n)).tobytes() for n in sorted(ck.tensors)})
    assert outs[0] == outs[1]


def test_layout_take_equals_index_gather():
    """Layout.take (repeat / tile) must give exactly values[ids(a, b)] for every layout and range."""
    rng = np.random.default_rng(21)
    for _ in range(300):
        shape = (int(rng.integers(1, 200)), int(rng.integers(1, 200)))
        n = shape[0] * shape[1]
        for lay in (vecsum.Layout.rows(shape), vecsum.Layout.cols(shape), vecsum.Layout.flat(shape)):
            vals = rng.standard_normal(lay.count).astype(np.float32)
            a = int(rng.integers(0, n))
            b = int(rng.integers(a, n + 1))
            np.testing.assert_array_equal(lay.take(vals, a, b), vals[lay.ids(a, b)])
