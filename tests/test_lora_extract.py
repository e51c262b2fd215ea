"""``extract-lora``: the SVDs on small arrays, which tensors go where, and end to end against mergekit-extract-lora.

``tests/fixtures/lora/extract.json`` holds, per pair, the relative Frobenius error of every
LoRA tensor of the adapter mergekit-extract-lora 0.1.5 writes (scripts/lora_extract_compare.py,
computed in float64 from the files) and its modules_to_save.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from superswallow_jax import prng
from superswallow_jax.config import parse_config
from superswallow_jax.errors import ConfigError, ModelError, OutputError
from superswallow_jax.io.checkpoint import Checkpoint
from superswallow_jax.lora import svd
from superswallow_jax.lora.adapter import Adapter
from superswallow_jax.lora.extract import ExtractOptions, run_extract
from superswallow_jax.lora.extract_plan import plan_extraction
from superswallow_jax.merge import run_merge
from superswallow_jax.options import MergeOptions
from superswallow_jax.tiny import make_tiny_models

FIX = Path(__file__).parent / "fixtures"
PUB = FIX / "published" / "models"
RECORD = json.loads((FIX / "lora" / "extract.json").read_text())
OPTS = dict(fsync=False)


def _source(d: np.ndarray, rows: int = 37):
    def blocks():
        for r0 in range(0, d.shape[0], rows):
            yield r0, min(d.shape[0], r0 + rows), jax.device_put(d[r0 : r0 + rows])

    return blocks


def _decaying(m: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((m, min(m, n))))[0]
    v = np.linalg.qr(rng.standard_normal((n, min(m, n))))[0]
    s = np.exp(-np.arange(min(m, n)) / 20.0)
    return ((u * s) @ v.T).astype(np.float32), s


def _err(d: np.ndarray, u, s, vt, r: int) -> float:
    rec = (np.asarray(u, np.float64)[:, :r] * np.asarray(s, np.float64)[:r]) @ np.asarray(vt, np.float64)[:r]
    return float(np.linalg.norm(d - rec) / np.linalg.norm(d))


# ---------------------------------------------------------------- tier 1: the SVDs


def test_test_matrix_is_a_function_of_the_key():
    k = prng.tensor_key_data(0, "model.layers.0.mlp.up_proj.weight", 0, "extract-lora")
    a, b = np.asarray(svd.test_matrix(k, 50, 6)), np.asarray(svd.test_matrix(k, 50, 6))
    assert np.array_equal(a, b) and a.shape == (50, 6) and a.min() >= -1 and a.max() < 1
    assert not np.array_equal(a, np.asarray(svd.test_matrix(prng.tensor_key_data(1, "x", 0), 50, 6)))
    assert np.array_equal(a * 2**23, np.round(a * 2**23))  # 24-bit values: exact on every backend


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_gram_and_randomized_svd_against_the_exact_one(shape):
    d, s = _decaying(*shape)
    r = 8
    opt = np.sqrt((s[r:] ** 2).sum() / (s**2).sum())
    u, sg, vt = svd.gram_svd(_source(d), r)
    assert u.shape == (shape[0], r) and vt.shape == (r, shape[1])
    assert np.allclose(np.asarray(sg), s[:r], rtol=1e-5)
    assert _err(d, u, sg, vt, r) <= opt * (1 + 1e-5)
    key = prng.tensor_key_data(0, "t", 0)
    u1, s1, v1 = svd.randomized_svd(_source(d), shape[1], 2 * r, key, 4)
    assert _err(d, u1, s1, v1, r) <= opt * (1 + 1e-3)  # an approximation: within 0.1% of the optimum here
    u2, s2, v2 = svd.randomized_svd(_source(d), shape[1], 2 * r, key, 4)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in ((u1, u2), (s1, s2), (v1, v2)))


# ---------------------------------------------------------------- tier 2: what goes where


def _plan(ft: Path, base: Path, **kw):
    conf = json.loads((ft / "config.json").read_text())
    return plan_extraction(Checkpoint(ft), Checkpoint(base), conf, {"model.embed_tokens.weight", "lm_head.weight"}, **kw)


def test_plan_sorts_tensors_as_mergekit():
    p = _plan(PUB / "tulu", PUB / "llama")
    assert len(p.factorise) == 14 and not p.left_out
    assert {s.key for s in p.save} == {"embed_tokens", "lm_head", "input_layernorm", "post_attention_layernorm", "norm"}
    attn = _plan(PUB / "tulu", PUB / "llama", modules=[r"self_attn\.(q|v)_proj"], skip_embeddings=True)
    assert sorted(f.module.rsplit(".", 1)[-1] for f in attn.factorise) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    why = dict(attn.left_out)
    assert why["lm_head.weight"].startswith("an embedding") and why["model.layers.0.mlp.up_proj.weight"] == "not matched by --modules"
    with pytest.raises(ConfigError, match="--modules"):
        _plan(PUB / "tulu", PUB / "llama", modules=["(bad"])


def _pair(tmp_path: Path, ft_extra: dict | None = None, base_extra: dict | None = None) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 6)) * 0.1).astype(np.float32)
    common = {"m.proj.weight": w, "m.proj.bias": np.zeros(8, np.float32), "m.norm.weight": np.ones(6, np.float32)}
    out = []
    for name, extra in (("ft", ft_extra or {}), ("base", base_extra or {})):
        d = tmp_path / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"architectures": ["X"], "torch_dtype": "float32"}))
        save_file({**common, **extra}, str(d / "model.safetensors"))
        out.append(d)
    return out[0], out[1]


def test_plan_refuses_or_reports_what_a_lora_cannot_hold(tmp_path):
    ft, base = _pair(tmp_path, {"m.proj.bias": np.ones(8, np.float32)})
    p = _plan(ft, base)
    assert [f.name for f in p.factorise] == ["m.proj.weight"] and not p.save  # an unchanged norm is not saved
    assert "bias of a linear layer changed" in dict(p.left_out)["m.proj.bias"]
    ft2, base2 = _pair(tmp_path / "b", {"m.extra.weight": np.ones((2, 2), np.float32)})
    with pytest.raises(ModelError, match="m.extra.weight of the fine-tune is not in the base"):
        _plan(ft2, base2)
    ft3, base3 = _pair(tmp_path / "c", {"m.norm.weight": np.ones(7, np.float32)})
    with pytest.raises(ModelError, match=r"m.norm.weight: \[7\] in the fine-tune, \[6\] in the base"):
        _plan(ft3, base3)


# ---------------------------------------------------------------- tier 3: end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("tiny"), models=["llama", "tulu"])


def _round_trip(base: Path, adapter: Path, out: Path) -> Path:
    cfg = f"models:\n  - model: {base}+{adapter}\n    parameters: {{weight: 1}}\nmerge_method: linear\ndtype: float32\n"
    run_merge(parse_config(cfg + "out_dtype: float32\n"), out, MergeOptions(fsync=False))
    return out


def _check_round_trip(ft: Path, base: Path, adapter: Path, out: Path) -> None:
    """The adapter merged into the base (a base+adapter reference) differs from the fine-tune by exactly the
    reported merged error; saved tensors come back exactly."""
    report = {t["name"]: t for t in json.loads((adapter / "extract_report.json").read_text())["tensors"]}
    rt, f, b = Checkpoint(_round_trip(base, adapter, out)), Checkpoint(ft), Checkpoint(base)
    for name, t in report.items():
        got, want = np.asarray(rt.view(name), np.float64), np.asarray(f.view(name), np.float64)
        if t["kind"] == "lora":
            rel = np.linalg.norm(got - want) / np.linalg.norm(want - np.asarray(b.view(name), np.float64))
            assert rel == pytest.approx(t["merged_error"], rel=1e-5)  # float32 block sums vs float64 here
        elif t["kind"] == "saved":
            assert np.array_equal(got, want)


@pytest.mark.parametrize("pair, kw", [("published-tulu-llama-r8", {}), ("tiny-tulu-llama-r16", {}),
                                      ("tiny-tulu-llama-r16", {"full_max": 0})])
def test_no_worse_than_mergekit_and_round_trips(pair, kw, tiny, tmp_path):
    rec = RECORD[pair]
    ft, base = (PUB / "tulu", PUB / "llama") if pair.startswith("published") else (tiny["tulu"], tiny["llama"])
    res = run_extract(str(ft), str(base), tmp_path / "ad", ExtractOptions(rank=rec["rank"], **OPTS, **kw))
    ours = {t.name: t.error for t in res.tensors if t.kind == "lora"}
    assert ours.keys() == rec["mergekit_errors"].keys()
    assert all(ours[n] <= rec["mergekit_errors"][n] for n in ours), \
        {n: (ours[n], rec["mergekit_errors"][n]) for n in ours if ours[n] > rec["mergekit_errors"][n]}
    assert {t.svd for t in res.tensors if t.kind == "lora"} == ({"exact", "gram"} if kw else {"exact"})
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == rec["mergekit_modules_to_save"] and cfg["r"] == cfg["lora_alpha"] == rec["rank"]
    ad = Adapter("ad", tmp_path / "ad")  # our reader takes it: every factor targeted, every rank as configured
    assert len(ad.factors) == len(ours) and not ad.warnings
    _check_round_trip(ft, base, tmp_path / "ad", tmp_path / "rt")


def test_rank_by_energy_and_rank_pattern(tmp_path):
    res = run_extract(str(PUB / "tulu"), str(PUB / "llama"), tmp_path / "ad",
                      ExtractOptions(rank=12, energy=0.8, **OPTS))
    lora = [t for t in res.tensors if t.kind == "lora"]
    assert {t.rank for t in lora} != {12} and all(t.energy >= 0.8 or t.rank == 12 for t in lora)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == max(t.rank for t in lora) and cfg["rank_pattern"] == cfg["alpha_pattern"]
    ad = Adapter("ad", tmp_path / "ad")
    assert {m: f.rank for m, f in ad.factors.items()} == {t.name[: -len(".weight")]: t.rank for t in lora}
    assert all(ad.config.scale(m) == 1.0 for m in ad.factors)
    _check_round_trip(PUB / "tulu", PUB / "llama", tmp_path / "ad", tmp_path / "rt")


def test_randomized_svd_is_deterministic_and_conv1d_is_transposed(tmp_path):
    """A GPT-2 fine-tune (Conv1D layers stored [in, out]), every tensor through the randomized SVD."""
    g = FIX / "lora" / "models" / "gpt2"
    ft = tmp_path / "ft"
    shutil.copytree(g, ft)
    ck = Checkpoint(g)
    rng = np.random.default_rng(1)
    save_file({n: np.asarray(ck.view(n)) + (rng.standard_normal(ck.tensors[n].shape) * 0.01).astype(np.float32)
               for n in ck.tensors}, str(ft / "model.safetensors"))
    opts = ExtractOptions(rank=4, full_max=0, gram_max=0, dtype="BF16", **OPTS)
    outs = []
    for i, seed in enumerate((0, 0, 1)):
        outs.append(tmp_path / f"ad{i}")
        run_extract(str(ft), str(g), outs[-1], ExtractOptions(**{**opts.__dict__, "seed": seed}))
    data = [(o / "adapter_model.safetensors").read_bytes() for o in outs]
    assert data[0] == data[1] and data[0] != data[2]
    ad = Adapter("ad", outs[0])
    f = ad.factors["transformer.h.0.mlp.c_fc"]  # W [24, 96]: A [4, in=24], B [out=96, 4]
    assert (f.a.shape, f.b.shape, f.a.dtype) == ((4, 24), (96, 4), "BF16") and ad.config.fan_in_fan_out
    assert "wpe" in ad.config.modules_to_save and "wte" in ad.config.modules_to_save
    _check_round_trip(ft, g, outs[0], tmp_path / "rt")


def test_cli_summary_and_one_line_errors(tmp_path):
    cmd = [sys.executable, "-m", "superswallow_jax.cli", "extract-lora", str(PUB / "tulu"), str(PUB / "llama")]
    ok = subprocess.run(cmd + [str(tmp_path / "ad"), "--rank", "4", "-q", "--no-fsync"], capture_output=True, text=True)
    assert ok.returncode == 0 and "14 LoRA modules (rank <= 4), 7 tensors saved whole" in ok.stdout
    again = subprocess.run(cmd + [str(tmp_path / "ad"), "--rank", "4"], capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.strip() == f"error: {tmp_path / 'ad'}: already holds an adapter; use --force to replace it"
    bad = subprocess.run(cmd + [str(tmp_path / "x"), "--rank", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --rank: must be a positive integer, got 0"
    inside = subprocess.run(cmd + [str(PUB / "llama" / "ad"), "--rank", "2"], capture_output=True, text=True)
    assert inside.returncode == 2 and "refusing to write over input model" in inside.stderr
    assert not (PUB / "llama" / "ad").exists()


def test_models_by_hub_id_are_downloaded_unless_offline(tmp_path, monkeypatch):
    """Both models by id from a stand-in hub: --offline with an empty cache is one line; online they are
    downloaded and the adapter has the bytes of an extraction from the folders."""
    from superswallow_jax.io.hub import HubAccess

    from .hub_server import StandInHub

    files = {m: {p.name: p.read_bytes() for p in (PUB / m).iterdir() if p.is_file()} for m in ("tulu", "llama")}
    opts = ExtractOptions(rank=4, fsync=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("SUPERSWALLOW_MODEL_CACHE", raising=False)
    with StandInHub() as hub:
        for m, f in files.items():
            hub.add(f"acme/{m}", f)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(ModelError, match="^model 'acme/tulu': .*not in the Hugging Face cache .*--offline"):
            run_extract("acme/tulu", "acme/llama", tmp_path / "no", opts, hub=HubAccess(offline=True))
        assert hub.downloads() == []
        run_extract("acme/tulu", "acme/llama", tmp_path / "by-id", opts)
        assert hub.downloads()
    run_extract(str(PUB / "tulu"), str(PUB / "llama"), tmp_path / "by-path", opts)
    name = "adapter_model.safetensors"
    assert (tmp_path / "by-id" / name).read_bytes() == (tmp_path / "by-path" / name).read_bytes()
    by_id, by_path = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("by-id", "by-path"))
    assert by_id.pop("base_model_name_or_path") == "acme/llama"  # so PEFT finds the base by its id
    by_path.pop("base_model_name_or_path")
    assert by_id == by_path
