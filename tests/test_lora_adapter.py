"""Tier 2: PEFT adapter folders: configs, the tensors of real peft files, hostile files, the adapted model's layout.

``tests/fixtures/lora/adapters`` were written by peft 0.21 (scripts/make_lora_fixtures.py);
the hostile cases are written here with ``safetensors.numpy``.
"""

import json
import math
import os
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from superswallow_jax.config import parse_config
from superswallow_jax.errors import ConfigError, ModelError
from superswallow_jax.io.checkpoint import Checkpoint
from superswallow_jax.lora.adapted import AdaptedCheckpoint, load_dtype
from superswallow_jax.lora.adapter import Adapter
from superswallow_jax.lora.config import UNSUPPORTED, parse_adapter_config
from superswallow_jax.lora.reference import split_reference

FIX = Path(__file__).parent / "fixtures"
ADAPTERS = FIX / "lora" / "adapters"
MODELS = {"llama": FIX / "published" / "models" / "llama", "swallow": FIX / "published" / "models" / "swallow",
          "tulu": FIX / "published" / "models" / "tulu", "gpt2": FIX / "lora" / "models" / "gpt2"}
P = "base_model.model."


def _cfg(**kw):
    return parse_adapter_config({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], **kw},
                                Path("adapter_config.json"))


# ---------------------------------------------------------------- references and configs


def test_split_reference():
    assert split_reference("org/base@rev+org/ad@main") == ("org/base@rev", "org/ad@main")
    assert split_reference("models/x") == ("models/x", None)
    with pytest.raises(ConfigError, match="at most one"):
        split_reference("a+b+c")
    with pytest.raises(ConfigError, match="either side"):
        split_reference("a+")
    cfg = parse_config("models:\n  - model: m+ad\nmerge_method: linear\nparameters: {weight: 1}\n")
    assert cfg.referenced_models() == ("m+ad",)


def test_targets_follow_peft_rules():
    c = _cfg(target_modules=["q_proj", "model.layers.1.mlp.up_proj"], exclude_modules=["layers.0.self_attn.q_proj"])
    assert c.targets("model.layers.1.self_attn.q_proj")  # a suffix after "."
    assert not c.targets("model.layers.0.self_attn.q_proj")  # excluded
    assert not c.targets("model.layers.1.self_attn.xq_proj")  # not after a "."
    assert c.targets("model.layers.1.mlp.up_proj") and not c.targets("model.layers.0.mlp.up_proj")
    r = _cfg(target_modules=r".*\.layers\.[01]\.self_attn\.(q|v)_proj", exclude_modules=r".*\.1\.self_attn\.v_proj")
    assert r.targets("model.layers.0.self_attn.v_proj") and not r.targets("model.layers.1.self_attn.v_proj")
    assert not r.targets("model.layers.2.self_attn.q_proj")  # a regex matches the whole name
    layers = _cfg(target_modules=["q_proj"], layers_to_transform=[1])
    assert layers.targets("model.layers.1.self_attn.q_proj") and not layers.targets("model.layers.0.self_attn.q_proj")
    pattern = _cfg(target_modules=["c_attn"], layers_to_transform=2, layers_pattern="h")
    assert pattern.targets("transformer.h.2.attn.c_attn") and not pattern.targets("transformer.h.1.attn.c_attn")
    saved = _cfg(target_modules=["lm_head", "q_proj"], modules_to_save=["lm_head"])
    assert not saved.targets("lm_head") and saved.saved_module("lm_head")
    every = _cfg(target_modules="all-linear")
    assert every.targets("model.layers.0.mlp.down_proj") and not every.targets("lm_head")


def test_rank_and_alpha_patterns_first_match_in_file_order():
    c = _cfg(r=8, lora_alpha=16, rank_pattern={"down_proj": 4, "layers.1.self_attn.q_proj": 12},
             alpha_pattern={"q_proj": 7})
    assert c.rank_alpha("model.layers.1.self_attn.q_proj") == (12, 7)
    assert c.rank_alpha("model.layers.0.self_attn.q_proj") == (8, 7)
    assert c.rank_alpha("model.layers.0.mlp.down_proj") == (4, 16)
    assert c.scale("model.layers.0.mlp.down_proj") == 4.0
    assert _cfg(r=8, lora_alpha=16, use_rslora=True).scale("x.q_proj") == 16 / math.sqrt(8)


@pytest.mark.parametrize("key", sorted(UNSUPPORTED))
def test_unsupported_options_are_one_line_naming_them(key):
    value = True if key in ("use_dora", "lora_bias", "use_qalora", "ensure_weight_tying") else [1]
    with pytest.raises(ModelError, match=key) as e:
        _cfg(**{key: value})
    assert "\n" not in str(e.value) and "not supported" in str(e.value)
    _cfg(**{key: False if value is True else None})  # the default value is fine


@pytest.mark.parametrize("kw, needle", [
    ({"peft_type": "IA3"}, "peft_type"),
    ({"bias": "all"}, "bias"),
    ({"future_option": {"on": 1}}, "future_option"),
    ({"r": 0}, "r: must be a positive integer"),
    ({"r": True}, "r: must be a positive integer"),
    ({"lora_alpha": float("nan")}, "lora_alpha"),
    ({"target_modules": "(unclosed"}, "target_modules"),
    ({"target_modules": 3}, "target_modules"),
    ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern.q_proj"),
    ({"layers_to_transform": ["1"]}, "layers_to_transform"),
    ({"target_modules": "x" * 2000}, "at most 1000"),
])
def test_bad_configs_name_the_key(kw, needle):
    with pytest.raises(ModelError, match=needle.replace("(", r"\(")):
        _cfg(**kw)


def test_training_only_options_are_ignored():
    c = _cfg(lora_dropout=0.1, init_lora_weights="gaussian", loftq_config={}, future_option=None, task_type="CAUSAL_LM")
    assert c.r == 8


# ---------------------------------------------------------------- real peft files


def test_reads_every_peft_fixture():
    r8 = Adapter("r8", ADAPTERS / "r8")
    assert len(r8.factors) == 14 and not r8.saved and not r8.warnings  # 7 projections x 2 layers
    q = r8.factors["model.layers.0.self_attn.q_proj"]
    assert (q.a.shape, q.b.shape, q.a.dtype, q.embedding) == ((8, 16), (16, 8), "F32", False)
    r16 = Adapter("r16", ADAPTERS / "r16")  # a pickled adapter_model.bin, bfloat16 factors
    assert r16.file.path.name == "adapter_model.bin" and r16.factors["model.layers.1.mlp.up_proj"].b.dtype == "BF16"
    assert {f.rank for f in r16.factors.values()} == {16}
    pat = Adapter("pattern", ADAPTERS / "pattern")
    assert pat.factors["model.layers.1.self_attn.q_proj"].rank == 12 and pat.factors["model.layers.0.mlp.down_proj"].rank == 4
    assert pat.config.scale("model.layers.1.self_attn.q_proj") == 7 / 12
    emb = Adapter("embed", ADAPTERS / "embed")
    assert emb.factors["model.embed_tokens"].embedding
    assert set(emb.saved) == {"lm_head.weight", "model.embed_tokens.weight"}  # modules_to_save, base_layer
    assert "model.layers.0.self_attn.o_proj" not in emb.factors  # exclude_modules
    rs = Adapter("rslora", ADAPTERS / "rslora")
    assert set(rs.factors) == {"model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.o_proj",
                               "model.layers.1.mlp.gate_proj"}
    assert rs.config.scale("model.layers.1.mlp.gate_proj") == 16 / math.sqrt(8)
    assert Adapter("fifo", ADAPTERS / "gpt2-fifo").config.fan_in_fan_out


def test_adapted_layout_of_the_fixtures():
    llama = AdaptedCheckpoint(Checkpoint(MODELS["swallow"]), Adapter("embed", ADAPTERS / "embed"),
                              json.loads((MODELS["swallow"] / "config.json").read_text()), "model x")
    assert llama.dtype == "BF16"
    emb = llama.adaptation("model.embed_tokens.weight")
    assert emb.delta.transposed and emb.delta.embedding and llama.tensors["model.embed_tokens.weight"].path.name == \
        "adapter_model.safetensors"  # the saved base_layer replaces the base's
    assert llama.adaptation("lm_head.weight") is None  # a bf16 replacement, read as stored
    assert llama.adaptation("model.layers.0.mlp.up_proj.weight") is None
    assert not llama.adaptation("model.layers.1.self_attn.q_proj.weight").delta.transposed
    gpt2 = AdaptedCheckpoint(Checkpoint(MODELS["gpt2"]), Adapter("fifo", ADAPTERS / "gpt2-fifo"),
                             json.loads((MODELS["gpt2"] / "config.json").read_text()), "model g")
    d = gpt2.adaptation("transformer.h.0.mlp.c_fc.weight").delta  # Conv1D: W [24, 96] = (B [96, 8] @ A [8, 24])^T
    assert gpt2.dtype == "F32" and d.transposed and d.b.shape == (96, 8)


# ---------------------------------------------------------------- hostile adapters


def _adapter(tmp_path: Path, tensors: dict, **cfg) -> Path:
    d = tmp_path / "ad"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                        "target_modules": ["q_proj"], **cfg}))
    save_file({P + k: v for k, v in tensors.items()}, str(d / "adapter_model.safetensors"))
    return d


def _ab(r=2, i=16, o=16, dtype=np.float32):
    return np.ones((r, i), dtype), np.ones((o, r), dtype)


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("tensors, needle", [
    ({f"{Q}.lora_A.weight": _ab()[0]}, "lora_B is missing"),
    ({f"{Q}.lora_A.weight": _ab()[0], f"{Q}.lora_B.weight": _ab(r=3)[1]}, "do not multiply"),
    ({f"{Q}.lora_A.weight": _ab(r=3)[0], f"{Q}.lora_B.weight": _ab(r=3)[1]}, "rank 3 in the file, 2 in"),
    ({f"{Q}.lora_A.weight": _ab()[0], f"{Q}.lora_B.weight": _ab()[1], f"{Q}.lora_magnitude_vector": np.ones(16, np.float32)},
     "DoRA"),
    ({f"{Q}.lora_A.weight": _ab()[0], f"{Q}.lora_B.weight": _ab()[1], f"{Q}.lora_B.bias": np.ones(16, np.float32)},
     "LoRA bias"),
    ({f"{Q}.lora_A.weight": _ab(dtype=np.int32)[0], f"{Q}.lora_B.weight": _ab()[1]}, "not a float"),
    ({"model.norm.weight": np.ones(16, np.float32)}, "nor a tensor of modules_to_save"),
])
def test_hostile_adapter_tensors_are_one_line(tmp_path, tensors, needle):
    with pytest.raises(ModelError, match=needle) as e:
        Adapter("ad", _adapter(tmp_path, tensors))
    assert "\n" not in str(e.value) and "adapter_model.safetensors" in str(e.value)


def test_tensors_without_the_peft_prefix_are_refused(tmp_path):
    d = _adapter(tmp_path, {})
    save_file({f"{Q}.lora_A.weight": _ab()[0]}, str(d / "adapter_model.safetensors"))
    with pytest.raises(ModelError, match="names start with base_model.model."):
        Adapter("ad", d)


def test_untargeted_factors_are_left_out_with_a_warning(tmp_path):
    k = "model.layers.0.self_attn.k_proj"
    a, b = _ab()
    ad = Adapter("ad", _adapter(tmp_path, {f"{Q}.lora_A.weight": a, f"{Q}.lora_B.weight": b,
                                           f"{k}.lora_A.weight": a, f"{k}.lora_B.weight": b}))
    assert list(ad.factors) == [Q] and "k_proj is not a target" in ad.warnings[0]


def test_missing_and_malformed_adapter_files(tmp_path):
    d = tmp_path / "ad"
    d.mkdir()
    with pytest.raises(ModelError, match="adapter_config.json: missing"):
        Adapter("ad", d)
    (d / "adapter_config.json").write_text("{nope")
    with pytest.raises(ModelError, match="not valid JSON"):
        Adapter("ad", d)
    (d / "adapter_config.json").write_text(json.dumps({"r": 2, "target_modules": ["q_proj"]}))
    with pytest.raises(ModelError, match="no adapter weights"):
        Adapter("ad", d)
    outside = tmp_path / "elsewhere.safetensors"
    save_file({P + f"{Q}.lora_A.weight": _ab()[0]}, str(outside))
    os.symlink(outside, d / "adapter_model.safetensors")
    with pytest.raises(ModelError, match="outside the model folder"):
        Adapter("ad", d)


def test_adapted_checkpoint_checks_shapes_and_dtype(tmp_path):
    base = MODELS["llama"]
    conf = json.loads((base / "config.json").read_text())
    a, b = _ab(o=8)  # q_proj is [16, 16]
    with pytest.raises(ModelError, match=r"LoRA of module .*q_proj is \[8, 16\] but .*q_proj.weight of the base is \[16, 16\]"):
        AdaptedCheckpoint(Checkpoint(base), Adapter("ad", _adapter(tmp_path, {f"{Q}.lora_A.weight": a,
                                                                               f"{Q}.lora_B.weight": b})), conf, "model m")
    d = _adapter(tmp_path, {"lm_head.weight": np.ones((4, 16), ml_dtypes.bfloat16)}, modules_to_save=["lm_head"])
    with pytest.raises(ModelError, match=r"tensor lm_head.weight of the adapter is \[4, 16\]"):
        AdaptedCheckpoint(Checkpoint(base), Adapter("ad", d), conf, "model m")
    d = _adapter(tmp_path, {"model.layers.0.self_attn.zz_proj.lora_A.weight": _ab()[0],
                            "model.layers.0.self_attn.zz_proj.lora_B.weight": _ab()[1]}, target_modules=["zz_proj"])
    with pytest.raises(ModelError, match="has no tensor model.layers.0.self_attn.zz_proj.weight"):
        AdaptedCheckpoint(Checkpoint(base), Adapter("ad", d), conf, "model m")
    # the load dtype: config.json's dtype (v5) or torch_dtype, else the weights' one dtype
    ck = Checkpoint(base)
    assert load_dtype({"dtype": "float32"}, ck, "m") == "F32" and load_dtype({"torch_dtype": "torch.float16"}, ck, "m") == "F16"
    assert load_dtype({}, ck, "m") == "BF16"
    with pytest.raises(ModelError, match="float64"):
        load_dtype({"torch_dtype": "float64"}, ck, "m")
    mixed = tmp_path / "mixed"
    shutil.copytree(MODELS["gpt2"], mixed)
    save_file({"a": np.ones(2, np.float32), "b": np.ones(2, np.float16)}, str(mixed / "model.safetensors"))
    with pytest.raises(ModelError, match="mix F16, F32"):
        load_dtype({}, Checkpoint(mixed), "model mixed")
    # float32 tensors of a bfloat16 model are cast on load: adapted without a delta
    cast = AdaptedCheckpoint(Checkpoint(MODELS["gpt2"]), Adapter("fifo", ADAPTERS / "gpt2-fifo"),
                             {**json.loads((MODELS["gpt2"] / "config.json").read_text()), "dtype": "bfloat16"}, "m")
    ln = cast.adaptation("transformer.h.0.ln_1.weight")
    assert ln.dtype == "BF16" and ln.delta is None
