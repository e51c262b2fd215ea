"""Tier 1: breadcrumbs, della, sce, ram, ramplus_tl against NumPy references (tests/reference_gta_family.py).

Chunk programs run on in-memory arrays through a fake input fetcher, in
1024-element chunks (which split the 176- and 300-wide rows) and whole:
results must be the same bytes for any chunking. Random
pruning (della) is checked against a reference that draws its Bernoulli masks
with ``jax.random.bernoulli`` on the reference probabilities, and by
statistics (keep fraction, rank dependence, rescale).
"""

from pathlib import Path
from types import SimpleNamespace

import jax
import ml_dtypes
import numpy as np
import pytest

from superswallow_jax import prng
from superswallow_jax.devices import Placement
from superswallow_jax.methods import ram as ram_m
from superswallow_jax.methods import sce as sce_m
from superswallow_jax.methods import sparsify as sp
from superswallow_jax.host import scalar as hs
from superswallow_jax.host import histogram as hh
from superswallow_jax.registry import METHODS
from superswallow_jax.plan import Source, Step
from superswallow_jax.programs import prepare
from superswallow_jax.programs.select import select_ranges
from superswallow_jax.stream import StepContext, bucket_for, chunk_size, pad

from . import reference as ref
from . import reference_gta_family as rx

BF16 = ml_dtypes.bfloat16


# ---------------------------------------------------------------- harness


class _Fetch:
    def __init__(self, arrays):
        self.arrays = [np.ascontiguousarray(a).reshape(-1) for a in arrays]

    def chunk(self, step, i, a, b):
        return self.arrays[i][a:b]

    def padded(self, step, i, a, b, n):
        return pad(self.arrays[i][a:b], n)

    def read(self, step, a, b, n, then):
        return [self.padded(step, i, a, b, n) for i in range(len(self.arrays))]

    def prefetch(self, step, a, b):
        pass

    def window(self, step):
        return 1 << 20

    def release(self, step, a, b):
        pass


def run_program(method, arrays, donor_params, global_params=None, *, base=0, work="BF16", chunk=1 << 20, seed=0,
                name="model.layers.0.mlp.up_proj.weight"):
    """Run ``method``'s chunk program over ``arrays`` (source 0..k, ``base`` the base) and return the output."""
    spec = METHODS[method]
    shape = arrays[0].shape
    defaults = {p: v.default for p, v in spec.per_model.items() if not v.required}
    sources, j = [], 0
    for i in range(len(arrays)):
        params = {} if i == base else {**defaults, **donor_params[j]}
        j += i != base
        sources.append(Source(i, None, params))
    gparams = {**{p: v.default for p, v in spec.global_.items()}, **(global_params or {})}
    out_dtype = spec.result_dtype if spec.result_dtype and len(arrays) > 1 else work
    step = Step(name, tuple(shape), out_dtype, work, tuple(sources), base, gparams, False, 0.0, 0)
    ch = chunk_size(chunk)
    plan = SimpleNamespace(method=spec, models=[SimpleNamespace(key=f"models/m{i}") for i in range(len(arrays))])
    ctx = StepContext(plan, step, seed, ch, bucket_for(step.numel, ch), _Fetch(arrays), Placement.local())
    program = prepare(ctx)
    parts = [np.asarray(program(ctx.inputs(a, b), a, b))[: b - a] for a, b in ctx.chunks()]
    return np.concatenate(parts).reshape(shape)


def same_bytes(a, b):
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def _models(rng, shape, k, dtype=BF16, quant=True):
    """Base and k fine-tunes with heavily tied (quantised) task vectors, zeros and sign flips."""
    base = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    xs = []
    for i in range(k):
        d = rng.standard_normal(shape) * 1e-3
        if quant:
            d = np.round(d * 4000) / 4000  # few distinct magnitudes -> ties everywhere
        x = (base + d).astype(dtype)
        x.reshape(-1)[: 50 * (i + 1)] = base.reshape(-1)[: 50 * (i + 1)].astype(dtype)  # exact zeros
        xs.append(x)
    return base.astype(dtype), xs


def _f32(a):
    return np.asarray(a).astype(np.float32)


# ---------------------------------------------------------------- registry


def test_registry_names_params_defaults():
    m = METHODS
    for name, cons, norm, resc in [("breadcrumbs", None, False, False), ("breadcrumbs_ties", "sum", False, False),
                                   ("della", "sum", True, True), ("della_linear", None, False, True)]:
        spec = m[name]
        assert spec.program == "gta:prepare_gta" and spec.consensus == cons and spec.base == "required"
        assert spec.needs_base_tensor and not spec.base_takes_model_params
        assert spec.global_["normalize"].default is norm and spec.global_["rescale"].default is resc
        assert spec.per_model["weight"].required and spec.per_model["density"].default == 1.0
    assert m["breadcrumbs"].per_model["gamma"].default == 0.01 and "epsilon" not in m["breadcrumbs"].per_model
    assert m["della"].per_model["epsilon"].default == 0.15 and "gamma" not in m["della"].per_model
    assert m["sce"].global_["select_topk"].default == 1.0 and not m["sce"].per_model
    assert m["ram"].global_["epsilon"].default == 1e-5 and m["ram"].result_dtype is None
    rp = m["ramplus_tl"]
    assert (rp.global_["r"].default, rp.global_["alpha"].default, rp.global_["epsilon"].default) == (0.1, 0.2, 1e-5)
    assert rp.result_dtype == "F32"


# ---------------------------------------------------------------- selection (breadcrumbs, sce top-k)


@pytest.mark.parametrize("n, density, gamma", [
    (1000, 0.5, 0.01), (1000, 0.9, 0.2), (64, 0.5, 0.01), (1000, 0.3, 0.0), (1000, -0.2, 0.01),
    (1000, 0.0, 0.1), (10, 0.95, 0.5), (1000, 0.5, -0.1), (7, 0.5, 3.0),
])
def test_outlier_range_is_mergekit_slice(n, density, gamma):
    key = np.arange(n, 0, -1).astype(np.float64)  # strictly descending: position == index
    want = np.flatnonzero(rx.magnitude_outliers_mask(key, density, gamma))
    start, stop = hh.outlier_range(density, gamma, n)
    assert want.tolist() == list(range(start, stop))


@pytest.mark.parametrize("work", ["BF16", "F32"])
def test_select_ranges_exact_for_any_chunking(work):
    rng = np.random.default_rng(1)
    n = 10_000
    vals = np.round(rng.standard_normal(n) * 30) / 1000  # many ties
    if work == "F32":
        vals = vals * (1 + rng.integers(0, 3, n) * 2.0**-20)  # equal high 16 bits, different low bits
    vals = ref.rnd(vals.astype(np.float32), work)
    vals[::97] = 0.0
    a = np.abs(vals)
    ranges = [(0, 1), (0, 3000), (137, 5000), (5000, n), (4000, 4000), (0, n)]
    bits = hh.abs_bits(vals, work)
    keep_fn = jax.jit(sp.range_keep)
    results = []
    for ch in (1024, 3072, n):
        chunks = [(s, min(n, s + ch)) for s in range(0, n, ch)]
        sels = select_ranges(lambda: chunks, lambda x, y: [bits[x:y]] * len(ranges), ranges, work, l1=True)
        masks = []
        for (start, stop), sel in zip(ranges, sels):
            cur = sel.quotas()
            parts = []
            for x, y in chunks:
                skip, quota = cur.next(x)
                seg = np.zeros(ch, np.float32)
                seg[: y - x] = a[x:y]
                parts.append(np.asarray(keep_fn(seg, np.float32(sel.top), np.int32(skip), np.float32(sel.bottom), np.int32(quota)))[: y - x])
            m = np.concatenate(parts)
            want = np.zeros(n, bool)
            want[rx.desc_order(a)[start:stop]] = True
            assert np.array_equal(m, want), (ch, start, stop)
            assert sel.l1_kept == pytest.approx(float(np.sum(a[want], dtype=np.float64)), rel=1e-12)
            masks.append((sel.top, sel.bottom, sel.l1_full, sel.l1_kept))
        results.append(masks)
    assert results[0] == results[1] == results[2]


# ---------------------------------------------------------------- breadcrumbs


@pytest.mark.parametrize("method, rescale, work", [("breadcrumbs", False, "BF16"), ("breadcrumbs_ties", True, "BF16"),
                                                   ("breadcrumbs_ties", False, "F32")])
def test_breadcrumbs_program_bit_exact(method, rescale, work):
    rng = np.random.default_rng(2)
    shape = (48, 176)
    base, xs = _models(rng, shape, 2, dtype=BF16 if work == "BF16" else np.float32)
    donors = [{"weight": 1.0, "density": 0.5, "gamma": 0.03}, {"weight": 0.6, "density": 0.3}]
    glob = {"rescale": rescale, "normalize": method == "breadcrumbs_ties"}
    outs = [run_program(method, [base, *xs], donors, glob, work=work, chunk=ch) for ch in (1024, 1 << 20)]
    assert same_bytes(outs[0], outs[1])
    b = _f32(base).reshape(-1)
    deltas = [ref.rnd(ref.rnd(_f32(x).reshape(-1), work) - ref.rnd(b, work), work) for x in xs]
    masks = [rx.magnitude_outliers_mask(dl, p["density"], p.get("gamma", 0.01)) for dl, p in zip(deltas, donors)]
    factors = [rx.l1_factor(dl, m, work) if rescale else 1.0 for dl, m in zip(deltas, masks)]
    want = ref.gta(b, [_f32(x).reshape(-1) for x in xs], [p["weight"] for p in donors], d=work,
                   consensus=METHODS[method].consensus, normalize=glob["normalize"], masks=masks, factors=factors)
    assert same_bytes(outs[0].reshape(-1), want)


# ---------------------------------------------------------------- della


@pytest.mark.parametrize("work, shape", [("BF16", (40, 176)), ("BF16", (3, 300)), ("F32", (30, 64))])
def test_della_probs_bit_exact(work, shape):
    rng = np.random.default_rng(3)
    d = ref.rnd((np.round(rng.standard_normal(shape) * 20) / 1e4).astype(np.float32), work)
    for dens, eps in ((0.5, 0.15), (0.3, 0.1), (0.45, 0.37)):
        rd, re = hs.round_scalar(dens - eps, work), np.float32(eps)
        got = np.asarray(jax.jit(lambda x, c, e: sp.della_probs(x, c, e, work=work))(d, np.float32(rd), re))
        want = rx.della_probs(d, dens, eps, work)
        assert same_bytes(got, want)


def test_bernoulli_keep_is_jax_bernoulli_in_chunks():
    key = prng.tensor_key_data(3, "t", 1)
    p = np.linspace(0.05, 0.95, 5000).astype(np.float32)
    want = np.asarray(jax.random.bernoulli(jax.random.wrap_key_data(key), p))
    f = jax.jit(sp.bernoulli_keep, static_argnums=3)
    got = np.concatenate([np.asarray(f(key, *prng.split_offset(a), 1000, p[a : a + 1000])) for a in range(0, 5000, 1000)])
    assert np.array_equal(got, want)


def _della_reference(base, xs, donors, method, work, seed, name, glob):
    """della with reference probabilities and JAX's own Bernoulli draw (same key scheme)."""
    shape = base.shape
    b = _f32(base).reshape(-1)
    masks, factors = [], []
    mwork = "BF16" if work == "BF16" else "F32"
    for j, (x, p) in enumerate(zip(xs, donors)):
        dl = ref.rnd(ref.rnd(_f32(x).reshape(-1), work) - ref.rnd(b, work), work)
        probs = rx.della_probs(dl.reshape(shape), p["density"], p.get("epsilon", 0.15), mwork).reshape(-1)
        key = jax.random.wrap_key_data(prng.tensor_key_data(seed, name, j + 1))
        m = np.asarray(jax.random.bernoulli(key, probs)).astype(np.float32)
        masks.append(m)
        factors.append(rx.l1_factor(dl, m, mwork) if glob["rescale"] else np.float32(1.0))
    return ref.gta(b, [_f32(x).reshape(-1) for x in xs], [p["weight"] for p in donors], d=work,
                   consensus=METHODS[method].consensus, normalize=glob["normalize"], masks=masks, factors=factors), masks


@pytest.mark.parametrize("method, work, shape", [("della", "BF16", (40, 176)), ("della_linear", "F32", (33, 64)),
                                                 ("della", "BF16", (700,))])
def test_della_program_matches_reference_for_any_chunking(method, work, shape):
    rng = np.random.default_rng(4)
    base, xs = _models(rng, shape, 2, dtype=BF16 if work == "BF16" else np.float32)
    donors = [{"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {"weight": 0.5, "density": 0.4}]
    glob = {"rescale": True, "normalize": method == "della"}
    name = "model.layers.1.self_attn.q_proj.weight"
    outs = [run_program(method, [base, *xs], donors, glob, work=work, chunk=ch, seed=5, name=name) for ch in (1024, 1 << 20)]
    assert same_bytes(outs[0], outs[1])
    want, _ = _della_reference(base, xs, donors, method, work, 5, name, glob)
    assert same_bytes(outs[0].reshape(-1), want)


def test_della_statistics():
    """Keep fraction ~ density, keep rate rising with the rank, L1 rescale ~ 1/density."""
    rng = np.random.default_rng(6)
    shape = (64, 512)
    base = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    x = base + (rng.standard_normal(shape) * 1e-2).astype(np.float32)  # F32: no ties, no zero deltas
    dens, eps = 0.4, 0.15
    out = run_program("della_linear", [base, x], [{"weight": 1.0, "density": dens, "epsilon": eps}],
                      {"rescale": False}, work="F32", chunk=4096)
    delta = x - base
    kept = out != base
    assert abs(kept.mean() - dens) < 0.01
    rank = np.argsort(np.argsort(np.abs(delta), axis=1), axis=1)  # 0 = smallest in the row
    lo, hi = kept[rank < 51].mean(), kept[rank >= 461].mean()  # bottom / top 10% of each row
    assert abs(lo - (dens - eps * 0.9)) < 0.03 and abs(hi - (dens + eps * 0.9)) < 0.03
    out_r = run_program("della_linear", [base, x], [{"weight": 1.0, "density": dens, "epsilon": eps}],
                        {"rescale": True}, work="F32", chunk=4096)
    assert np.array_equal(out_r != base, kept)  # same masks with and without rescale
    ratio = np.abs(out_r - base)[kept].sum() / np.abs(delta)[kept].sum()
    full = np.abs(delta).sum() / np.abs(delta)[kept].sum()
    assert ratio == pytest.approx(full, rel=1e-3) and 1 / dens * 0.8 < full < 1 / dens


def test_della_rejects_bad_epsilon_and_zero_density():
    from superswallow_jax.errors import ConfigError

    rng = np.random.default_rng(7)
    base, xs = _models(rng, (8, 64), 1)
    check = METHODS["della"].validate  # run by the planner for every tensor, with every model's parameters

    def one(p):
        return {}, [("models/m0", {}, True), ("models/m1", p, False)], "t"

    with pytest.raises(ConfigError, match="models/m1: della needs 0 < density -/\\+ epsilon"):
        check(*one({"weight": 1.0, "density": 0.9, "epsilon": 0.15}))
    check(*one({"weight": 1.0, "density": 0.5, "epsilon": 0.15}))
    check(*one({"weight": 1.0, "density": 0.0, "epsilon": 0.15}))  # zero: allowed
    assert METHODS["della_linear"].validate is check and METHODS["ties"].validate is None
    out = run_program("della", [base, *xs], [{"weight": 1.0, "density": 0.0}])  # zeros_like: the base
    assert np.array_equal(_f32(out), _f32(base))


# ---------------------------------------------------------------- sce


def test_sce_variance_is_exact_welford():
    rng = np.random.default_rng(8)
    for k in (2, 3, 5):
        taus = [ref.rnd((rng.standard_normal(300) * rng.choice([1e-3, 1e-6, 1.0], 300)).astype(np.float32), "BF16")
                for _ in range(k)]
        assert same_bytes(sce_m.variance(taus, "BF16"), rx.exact_variance(taus, "BF16"))
        f = [t + np.float32(1e-9) for t in taus]
        assert same_bytes(sce_m.variance(f, "F32"), rx.exact_variance(f, "F32"))


@pytest.mark.parametrize("topk, work", [(0.5, "BF16"), (1.0, "BF16"), (0.3, "F32"), (0.0, "BF16")])
def test_sce_program_bit_exact(topk, work):
    rng = np.random.default_rng(9)
    shape = (40, 176)
    base, xs = _models(rng, shape, 3, dtype=BF16 if work == "BF16" else np.float32)
    outs = [run_program("sce", [base, *xs], [{}, {}, {}], {"select_topk": topk}, work=work, chunk=ch) for ch in (1024, 1 << 20)]
    assert same_bytes(outs[0], outs[1])
    b = _f32(base).reshape(-1)
    taus = [ref.rnd(ref.rnd(_f32(x).reshape(-1), work) - ref.rnd(b, work), work) for x in xs]
    var = sce_m.variance(taus, work)  # exactness of the variance: test above
    want = rx.sce(b, [_f32(x).reshape(-1) for x in xs], topk, work, var=var)
    assert same_bytes(outs[0].reshape(-1), want)


# ---------------------------------------------------------------- ram, ramplus_tl


@pytest.mark.parametrize("work", ["BF16", "F32"])
def test_ram_program_bit_exact(work):
    rng = np.random.default_rng(10)
    shape = (40, 176)
    base, xs = _models(rng, shape, 3, dtype=BF16 if work == "BF16" else np.float32)
    eps = 2.5e-4
    outs = [run_program("ram", [base, *xs], [{}] * 3, {"epsilon": eps}, work=work, chunk=ch) for ch in (1024, 1 << 20)]
    assert same_bytes(outs[0], outs[1])
    b = _f32(base).reshape(-1)
    want = rx.ram(b, [_f32(x).reshape(-1) for x in xs], eps, work)
    assert same_bytes(outs[0].reshape(-1), want)


@pytest.mark.parametrize("work", ["BF16", "F32"])
def test_ramplus_program_bit_exact_float32_result(work):
    rng = np.random.default_rng(11)
    shape = (40, 176)
    base, xs = _models(rng, shape, 3, dtype=BF16 if work == "BF16" else np.float32)
    eps, r, alpha = 2.5e-4, 0.5, 0.4
    glob = {"epsilon": eps, "r": r, "alpha": alpha}
    outs = [run_program("ramplus_tl", [base, *xs], [{}] * 3, glob, work=work, chunk=ch) for ch in (1024, 1 << 20)]
    assert outs[0].dtype == np.float32
    assert same_bytes(outs[0], outs[1])
    b = _f32(base).reshape(-1)
    want, lam = rx.ramplus(b, [_f32(x).reshape(-1) for x in xs], eps, r, alpha, work)
    assert same_bytes(outs[0].reshape(-1), want)
    assert any(v != 1 for v in lam)
    assert same_bytes(ram_m.ramplus_lambdas([3, 0, 10], [4, 0, 0], 0.1, 0.2, 1e-5),
                      np.array([1 + np.float32(0.1) * np.float32(0.2), 1, 1 + np.float32(0.1) * np.float32(0.2)], np.float32))


# ---------------------------------------------------------------- end to end on tiny checkpoints

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from superswallow_jax.tiny import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("models_extra"))


# della's chunk invariance (whole rows read around each chunk) is covered above on 1-D and 2-D tensors;
# its tiny-model run compiles a dozen kernels (~7 s), so it is left to the parity harness.
@pytest.mark.parametrize("name", ["breadcrumbs-ties", "sce", "ramplus-tl"])
def test_chunked_equals_whole(tiny, tmp_path, name):
    from superswallow_jax.config import parse_config
    from superswallow_jax.io.checkpoint import Checkpoint
    from superswallow_jax.merge import run_merge
    from superswallow_jax.options import MergeOptions

    text = (ROOT / "configs" / "examples" / f"{name}.yaml").read_text().replace("models/", str(Path(tiny["llama"]).parent) + "/")
    outs = []
    for ch in (1 << 24, 1024 * 3):  # 3072 splits the 176-wide rows
        out = tmp_path / str(ch)
        run_merge(parse_config(text), out, MergeOptions(fsync=False, chunk_elems=ch))
        ck = Checkpoint(out)
        outs.append({n: (ck.tensors[n].dtype, np.ascontiguousarray(ck.view(n)).tobytes()) for n in ck.tensors})
    assert outs[0] == outs[1]
    if name == "ramplus-tl":
        assert {dt for dt, _ in outs[0].values()} == {"F32"}
