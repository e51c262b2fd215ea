#!/usr/bin/env python3
"""Write the checked-in LoRA fixtures with the real ``peft``, and record mergekit 0.1.5's results on them.

The project's tests never need torch or peft; these small files (a few KB
each) are what they read instead, so that ``base+adapter`` references are
tested on adapters written by the real tool and against what mergekit
writes from them. Run in the oracle venv (torch, transformers 5, peft,
mergekit 0.1.5)::

    .venv/bin/superswallow tiny /tmp/lora-tiny --model llama --model swallow --model tulu
    /work/oracle/venv/bin/python scripts/make_lora_fixtures.py tests/fixtures/lora --tiny /tmp/lora-tiny
    /work/oracle/venv/bin/python scripts/make_lora_fixtures.py tests/fixtures/lora --tiny /tmp/lora-tiny --mergekit

What is written (``OUT/``):

* ``models/gpt2``: a tiny ``GPT2LMHeadModel`` in float32 (its layers are
  ``Conv1D``, stored ``[in, out]``: where PEFT's ``fan_in_fan_out`` applies).
* ``adapters/<name>``: PEFT LoRA adapters (``adapter_config.json`` plus
  ``adapter_model.safetensors`` or ``.bin``), listed in :data:`ADAPTERS`: rank
  8 and 16, several target modules, ``rank_pattern``/``alpha_pattern``,
  embedding LoRA with ``modules_to_save`` (the saved copies changed, as
  training changes them), ``use_rslora``, ``fan_in_fan_out`` on GPT-2,
  weights saved in bfloat16 and as a pickled ``.bin``. Their weights are
  drawn from a seeded generator (A like PEFT's Kaiming init, B small), so
  every delta is non-zero.
* ``configs/*.yaml`` (:data:`CONFIGS`): merges that use them, on the
  published fixture models (``../published/models``, linked as
  ``models/{llama,swallow,tulu}``) and on ``superswallow tiny`` models
  (``tiny/``, linked to ``--tiny``; not checked in: the tests make them).
* ``mergekit.json`` (``--mergekit``): for every config, the sha256 of every
  tensor ``mergekit-yaml --lora-merge-cache`` writes, its ``vocab_size``
  and the token ids of a text; and the sha256 of every tensor of the
  ``--tiny`` base models (the tests check that they made the same ones).

``extract.json`` (mergekit-extract-lora's per-tensor errors) is written by
``scripts/lora_extract_compare.py --record``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

TEXT = "Hello world. Merging models 日本語のテキストです。 def f(x): return x ** 2"

#: name -> (base model folder under OUT, LoraConfig keywords, save options)
ADAPTERS = {
    # rank 8 on every projection of a safetensors base (swallow: the extended vocabulary)
    "r8": ("models/swallow", dict(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), {"bf16": False, "bin": False}),
    # rank 16 on a sharded .bin base, saved in bfloat16 as a pickled adapter_model.bin
    "r16": ("models/tulu", dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
            {"bf16": True, "bin": True}),
    # ranks and alphas per module, a regex target, the second layer only
    "pattern": ("models/llama", dict(r=8, lora_alpha=16, target_modules=r".*\.(q_proj|k_proj|down_proj|gate_proj)",
                                     rank_pattern={"down_proj": 4, "layers.1.self_attn.q_proj": 12},
                                     alpha_pattern={"q_proj": 7, "gate_proj": 3}), {"bf16": False, "bin": False}),
    # embedding LoRA, modules_to_save (lm_head), excluded modules and chosen layers
    "embed": ("models/swallow", dict(r=8, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "o_proj"],
                                     modules_to_save=["lm_head"], exclude_modules=["model.layers.0.self_attn.o_proj"]),
              {"bf16": False, "bin": False, "perturb": ["model.embed_tokens.base_layer.weight", "lm_head"]}),
    # rsLoRA: alpha / sqrt(r) (not a power of two)
    "rslora": ("models/llama", dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "o_proj", "gate_proj"],
                                    layers_to_transform=[1]), {"bf16": False, "bin": False}),
    # GPT-2's Conv1D layers: fan_in_fan_out
    "gpt2-fifo": ("models/gpt2", dict(r=8, lora_alpha=16, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]),
                  {"bf16": False, "bin": False}),
    # on a `superswallow tiny` llama: rows of 176 (down_proj) cross the tests' 1024-element chunks; embedding LoRA
    "tiny-down": ("tiny/llama", dict(r=8, lora_alpha=16, target_modules=["down_proj", "embed_tokens", "q_proj"]),
                  {"bf16": True, "bin": False, "embedding_layers": False}),
}

CONFIGS = {
    "linear-r8.yaml": """models:
  - model: ./models/swallow+./adapters/r8
    parameters: {weight: 1.0}
merge_method: linear
dtype: bfloat16
""",
    "superswallow-lora.yaml": """models:
  - model: ./models/swallow+./adapters/embed
  - model: ./models/tulu+./adapters/r16
    parameters:
      density: 1
      weight:
        - filter: mlp.down_proj
          value: [0.3, 0.25, 0.25, 0.15, 0.1]
        - filter: mlp.gate_proj
          value: [0.7, 0.25, 0.5, 0.45, 0.4]
        - filter: mlp.up_proj
          value: [0.7, 0.25, 0.5, 0.45, 0.4]
        - filter: self_attn
          value: [0.7, 0.25, 0.5, 0.45, 0.4]
        - value: 0
merge_method: dare_ties
base_model: ./models/swallow+./adapters/embed
dtype: bfloat16
tokenizer_source: union
""",
    "linear-shared.yaml": """models:
  - model: ./models/tulu+./adapters/pattern
    parameters: {weight: 0.5}
  - model: ./models/llama+./adapters/pattern
    parameters: {weight: 0.3}
  - model: ./models/llama
    parameters: {weight: 0.2}
merge_method: linear
dtype: bfloat16
""",
    "linear-rslora.yaml": """models:
  - model: ./models/llama+./adapters/rslora
    parameters: {weight: 1.0}
merge_method: linear
dtype: float32
""",
    "gpt2-fifo.yaml": """models:
  - model: ./models/gpt2+./adapters/gpt2-fifo
    parameters: {weight: 1.0}
merge_method: linear
dtype: float32
""",
    "tiny-linear.yaml": """models:
  - model: ./tiny/llama+./adapters/tiny-down
    parameters: {weight: 1.0}
merge_method: linear
dtype: bfloat16
""",
    "tiny-superswallow.yaml": """models:
  - model: ./tiny/swallow
  - model: ./tiny/tulu+./adapters/tiny-down
    parameters:
      density: 1
      weight:
        - filter: mlp.down_proj
          value: [0.3, 0.25, 0.25, 0.15, 0.1]
        - filter: self_attn
          value: [0.7, 0.25, 0.5, 0.45, 0.4]
        - value: 0.5
merge_method: dare_ties
base_model: ./tiny/swallow
dtype: bfloat16
tokenizer_source: union
""",
}


def make_gpt2(out: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=24, n_layer=2, n_head=2, tie_word_embeddings=True)
    m = GPT2LMHeadModel(cfg)
    shutil.rmtree(out, ignore_errors=True)
    m.save_pretrained(out)


def _fill(model, seed: int) -> None:
    """Seeded LoRA weights: A ~ U(+-1/sqrt(fan_in)) (PEFT's Kaiming-uniform scale), B ~ N(0, 0.02)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_embedding_A" in name:
                fan_in = p.shape[1] if "lora_A" in name else p.shape[0]
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) / fan_in ** 0.5)
            elif "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _perturb(model, names: list[str], seed: int) -> None:
    """Change saved copies (an embedding's base_layer, a modules_to_save module) as training would."""
    import torch

    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in names) and ("base_layer" in name or "modules_to_save" in name):
                p.copy_((p.float() + 0.01 * torch.randn(p.shape, generator=g)).to(p.dtype))


def make_adapters(out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for k, (name, (base, kw, opts)) in enumerate(ADAPTERS.items()):
        model = AutoModelForCausalLM.from_pretrained(str(out / base))
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **kw))
        _fill(peft_model, k)
        _perturb(peft_model, opts.get("perturb", []), k)
        if opts["bf16"]:
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.data = p.data.to(torch.bfloat16)
        d = out / "adapters" / name
        shutil.rmtree(d, ignore_errors=True)
        peft_model.save_pretrained(str(d), safe_serialization=not opts["bin"],
                                   save_embedding_layers=opts.get("embedding_layers", "auto"))
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = base  # not this machine's path
        (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (d / "README.md").unlink(missing_ok=True)


def _sha_dir(folder: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            raw = v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            tensors[k] = [str(v.dtype).removeprefix("torch."), list(v.shape), hashlib.sha256(raw).hexdigest()]
    return tensors


def record_mergekit(root: Path) -> None:
    """Run mergekit-yaml --lora-merge-cache on every config and record what it writes."""
    import transformers
    import peft

    bin_dir = Path(sys.executable).parent
    root = root.resolve()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    record = {"text": TEXT, "transformers": transformers.__version__, "peft": peft.__version__, "configs": {},
              "tiny": {m: _sha_dir(root / "tiny" / m) for m in ("llama", "swallow", "tulu")}}
    for cfg in sorted((root / "configs").glob("*.yaml")):
        out, cache = root / ".mk-out", root / ".mk-cache"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        run = subprocess.run([str(bin_dir / "mergekit-yaml"), str(cfg), str(out), "--random-seed", "0",
                              "--lora-merge-cache", str(cache)], env=env, cwd=root, capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"{cfg.name}: mergekit-yaml failed:\n{run.stderr[-3000:]}")
        entry = {"tensors": _sha_dir(out), "vocab_size": json.loads((out / "config.json").read_text())["vocab_size"]}
        ids = transformers.AutoTokenizer.from_pretrained(str(out)).encode(TEXT) if any(out.glob("tokenizer*")) else []
        if ids:  # not the empty tokenizer transformers makes up for a model without one (gpt2 here)
            entry["ids"] = ids
        record["configs"][cfg.name] = entry
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    (root / "mergekit.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")


def link_models(out: Path, tiny: Path) -> None:
    """models/{llama,swallow,tulu} -> the published fixtures; tiny -> ``--tiny`` (both links, not checked in)."""
    (out / "models").mkdir(parents=True, exist_ok=True)
    for m in ("llama", "swallow", "tulu"):
        link = out / "models" / m
        if not link.exists():
            os.symlink(f"../../published/models/{m}", link)
    if (out / "tiny").is_symlink():
        (out / "tiny").unlink()
    os.symlink(tiny.resolve(), out / "tiny")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--tiny", type=Path, required=True, help="folder of `superswallow tiny` models (llama, swallow, tulu)")
    ap.add_argument("--mergekit", action="store_true", help="record mergekit 0.1.5's outputs instead")
    a = ap.parse_args()
    link_models(a.out, a.tiny)
    try:
        if a.mergekit:
            record_mergekit(a.out)
            return
        make_gpt2(a.out / "models" / "gpt2")
        make_adapters(a.out)
        (a.out / "configs").mkdir(parents=True, exist_ok=True)
        for name, text in CONFIGS.items():
            (a.out / "configs" / name).write_text(text)
    finally:
        for m in ("llama", "swallow", "tulu"):
            (a.out / "models" / m).unlink(missing_ok=True)
        (a.out / "tiny").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
