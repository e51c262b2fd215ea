"""Tensor-name tables and the generic layers.N fallback: Llama, Qwen2 (biases), Gemma (tied), GPT-2 style."""

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from superswallow_jax.architecture import generic_architecture, layer_index
from superswallow_jax.config import parse_config
from superswallow_jax.plan import build_plan

BF16 = ml_dtypes.bfloat16


def make_model(folder, arch, names_shapes, n_layers):
    folder.mkdir()
    rng = np.random.default_rng(len(str(folder)))
    save_file({n: rng.standard_normal(s).astype(BF16) for n, s in names_shapes}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architectures": [arch], "num_hidden_layers": n_layers}))
    return folder


def llama_like(n_layers, bias=False, lm_head=True, prefix="model"):
    out = [(f"{prefix}.embed_tokens.weight", (10, 4))]
    for i in range(n_layers):
        p = f"{prefix}.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (4,)), (f"{p}.post_attention_layernorm.weight", (4,))]
        for m in "qkvo":
            out.append((f"{p}.self_attn.{m}_proj.weight", (4, 4)))
            if bias and m != "o":
                out.append((f"{p}.self_attn.{m}_proj.bias", (4,)))
        out += [(f"{p}.mlp.{m}_proj.weight", (4, 4)) for m in ("gate", "up", "down")]
    out.append((f"{prefix}.norm.weight", (4,)))
    if lm_head:
        out.append(("lm_head.weight", (10, 4)))
    return out


def plan_for(tmp_path, arch, shapes, n_layers):
    a = make_model(tmp_path / "a", arch, shapes, n_layers)
    b = make_model(tmp_path / "b", arch, shapes, n_layers)
    cfg = parse_config(f"""
models:
  - model: {a}
    parameters: {{weight: [0.0, 1.0]}}
  - model: {b}
    parameters: {{weight: 1.0}}
merge_method: linear
""")
    return build_plan(cfg)


@pytest.mark.parametrize("arch, bias, lm_head", [
    ("LlamaForCausalLM", False, True),
    ("MistralForCausalLM", False, True),
    ("Qwen2ForCausalLM", True, True),
    ("Qwen2ForCausalLM", True, False),  # tied embeddings: no lm_head tensor at all
])
def test_llama_family(tmp_path, arch, bias, lm_head):
    plan = plan_for(tmp_path, arch, llama_like(3, bias, lm_head), 3)
    names = [s.name for s in plan.steps]
    assert plan.arch.name == "llama"
    assert names[0] == "model.embed_tokens.weight"
    assert ("model.layers.2.self_attn.q_proj.bias" in names) == bias
    # an optional weight no model has (tied embeddings) is skipped, as in mergekit
    assert ("lm_head.weight" in names) == lm_head
    # gradient [0, 1] over 3 layers: t = 0, 0.5, 1
    w = {s.name: s.sources[0].params["weight"] for s in plan.steps}
    assert w["model.layers.0.mlp.up_proj.weight"] == 0.0
    assert w["model.layers.1.mlp.up_proj.weight"] == 0.5
    assert w["model.layers.2.mlp.up_proj.weight"] == 1.0
    assert w["model.norm.weight"] == 0.0  # t = 0 for non-layer tensors


def test_gemma(tmp_path):
    plan = plan_for(tmp_path, "GemmaForCausalLM", llama_like(2, lm_head=False), 2)
    names = [s.name for s in plan.steps]
    assert plan.arch.name == "gemma" and "lm_head.weight" not in names and names[-1] == "model.norm.weight"


def test_generic_fallback_gpt2_style(tmp_path):
    shapes = [("transformer.wte.weight", (10, 4))]
    for i in range(3):
        shapes += [(f"transformer.h.{i}.attn.c_attn.weight", (4, 12)), (f"transformer.h.{i}.ln_1.weight", (4,))]
    shapes.append(("transformer.ln_f.weight", (4,)))
    plan = plan_for(tmp_path, "GPT2LMHeadModel", shapes, 3)
    assert plan.arch.name == "generic"
    layers = {s.name: s.layer for s in plan.steps}
    assert layers["transformer.h.2.ln_1.weight"] == 2 and layers["transformer.wte.weight"] is None
    w = {s.name: s.sources[0].params["weight"] for s in plan.steps}
    assert w["transformer.h.1.attn.c_attn.weight"] == 0.5


def test_layer_index_patterns():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("gpt_neox.layers.0.attention.dense.weight") == 0
    assert layer_index("encoder.blocks.7.ff.weight") == 7
    assert layer_index("model.norm.weight") is None
    arch = generic_architecture([["x.blocks.0.a", "x.blocks.1.a", "x.emb"]])
    assert [t.name for t in arch.layer_templates] == ["x.blocks.${layer_index}.a"]


def test_tied_lm_head_falls_back_to_embeddings(tmp_path):
    """One model stores lm_head, the other ties it: the tied one supplies embed_tokens."""
    a = make_model(tmp_path / "a", "LlamaForCausalLM", llama_like(2, lm_head=True), 2)
    b = make_model(tmp_path / "b", "LlamaForCausalLM", llama_like(2, lm_head=False), 2)
    cfg = parse_config(f"models:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\nmerge_method: linear\n")
    step = build_plan(cfg).steps[-1]
    assert step.name == "lm_head.weight"
    assert [s.tensor.name for s in step.sources] == ["lm_head.weight", "model.embed_tokens.weight"]
