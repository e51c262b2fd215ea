#!/usr/bin/env python3
"""Write the checked-in fixtures of real torch / sentencepiece / transformers files.

The project's tests never need torch; these small files (tens of KB) are what
they read instead, so that the ``.bin`` reader and the sentencepiece
conversion are tested on bytes written by the real tools, not only by ours.

Run in a separate venv (torch 2.x CPU, transformers 4.46, sentencepiece,
protobuf, safetensors), for example::

    python3 -m venv /tmp/fx && /tmp/fx/bin/pip install torch==2.13.0 'transformers==4.46.3' sentencepiece protobuf safetensors
    /tmp/fx/bin/python scripts/make_published_fixtures.py tests/fixtures/published

Then record mergekit 0.1.5's results on them (its own venv, see
docs/mergekit-0.1.5-notes.md)::

    /work/oracle/venv/bin/python scripts/make_published_fixtures.py --mergekit tests/fixtures/published

What is written (``OUT/``):

* ``spm/base.model``: a sentencepiece BPE model trained on a small multilingual
  text (Llama-2's options: byte fallback, split digits, identity
  normalization, ids 0/1/2 = unk/bos/eos); ``spm/ext.model``: the same with
  Japanese pieces appended (how Swallow extended Llama-2's vocabulary).
* ``torch/*.bin``: ``torch.save`` files covering dtypes, 0-d and empty
  tensors, shared storages, views at an offset, parameters, a non-contiguous
  tensor, a float8 tensor, a uint16 tensor (``_rebuild_tensor_v3``) and the
  legacy pre-1.6 format; ``torch/expected.safetensors`` holds every readable
  tensor's values (written by ``safetensors.torch``); ``torch/mean_dim0.json``
  holds torch's ``mean(dim=0)`` under 1 to 4 threads (the embedding padding rows).
* ``models/{tulu,swallow,llama}``: tiny ``LlamaForCausalLM`` checkpoints saved
  by transformers 4.46 like the published repos: tulu as sharded ``.bin``,
  swallow as safetensors with the extended vocabulary, llama as one ``.bin``;
  each with only ``tokenizer.model`` + ``tokenizer_config.json`` +
  ``special_tokens_map.json`` (slow ``LlamaTokenizer.save_pretrained``).
* ``mergekit.json`` (``--mergekit``): for each config in ``configs/`` of the
  fixture folder, the sha256 of every tensor mergekit 0.1.5 writes, its
  ``vocab_size`` and the token ids of :data:`TEXT` under its tokenizer; for
  a multi-stage recipe (``configs/multi-stage.yaml``, written by hand, not by
  this script), the same for every named stage ``mergekit-multi`` writes.
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

TEXT = ("Hello world. Merging models 日本語のテキストです。東京は日本の首都です。\n"
        "def f(x):\n    return x ** 2  # code\t tabs 123456 🙂🚀 café naïve <s> ok</s>")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Merging models is fun and the weights stream from disk.",
    "日本語のテキストです。東京は日本の首都です。こんにちは、世界！ ひらがなとカタカナ、漢字を使います。",
    "def merge(a, b):\n    return [x + y for x, y in zip(a, b)]  # sum of two lists\n",
    "🙂🚀✨ café naïve résumé 12345 67890",
]
EXT_PIECES = ["日本語", "テキスト", "東京", "首都", "こんにちは", "世界", "ひらがな", "カタカナ", "漢字", "使います"]

CONFIGS = {
    "superswallow.yaml": """models:
  - model: ./models/swallow
  - model: ./models/tulu
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
base_model: ./models/swallow
dtype: bfloat16
tokenizer_source: union
""",
    "linear-base.yaml": """models:
  - model: ./models/tulu
    parameters: {weight: 0.6}
  - model: ./models/llama
    parameters: {weight: 0.4}
merge_method: linear
base_model: ./models/tulu
dtype: bfloat16
tokenizer_source: base
""",
    "linear-none.yaml": """models:
  - model: ./models/tulu
    parameters: {weight: 0.6}
  - model: ./models/llama
    parameters: {weight: 0.4}
merge_method: linear
dtype: bfloat16
""",
}


def train_spm(out: Path) -> None:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "base"), vocab_size=420, model_type="bpe", byte_fallback=True,
        split_digits=True, add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, allow_whitespace_only_pieces=True, character_coverage=0.9995,
        num_threads=1, minloglevel=2,
    )
    corpus.unlink()
    (out / "base.vocab").unlink()
    m = pb.ModelProto()
    m.ParseFromString((out / "base.model").read_bytes())
    have = {p.piece for p in m.pieces}
    low = min(p.score for p in m.pieces)
    for k, piece in enumerate(x for x in EXT_PIECES if x not in have):
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, low - 1 - k, pb.ModelProto.SentencePiece.NORMAL
    m.trainer_spec.vocab_size = len(m.pieces)
    (out / "ext.model").write_bytes(m.SerializeToString())


def torch_cases(out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    dtypes = {
        "bf16": r(3, 5).to(torch.bfloat16), "f16": r(4).to(torch.float16), "f32": r(2, 3, 4),
        "f64": r(3).to(torch.float64), "i64": torch.arange(-3, 4), "i32": torch.arange(5, dtype=torch.int32),
        "i16": torch.arange(3, dtype=torch.int16), "i8": torch.arange(-2, 2, dtype=torch.int8),
        "u8": torch.arange(6, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4), "ones_dim": r(1, 6, 1),
    }
    torch.save(dtypes, out / "dtypes.bin")
    w = r(6, 4).to(torch.bfloat16)
    big = r(20)
    rows = r(5, 3)
    views = {"embed.weight": w, "lm_head.weight": w, "part": big[2:9], "all": big, "row": rows[3], "rows": rows}
    torch.save(views, out / "views.bin")
    torch.save({"p": torch.nn.Parameter(r(2, 2))}, out / "param.bin")
    torch.save({"t": r(3, 4).t()}, out / "noncontig.bin")
    torch.save({"x": r(4)}, out / "legacy.bin", _use_new_zipfile_serialization=False)
    torch.save({"f8": r(4).to(torch.float8_e4m3fn)}, out / "float8.bin")
    torch.save({"u16": torch.tensor([0, 1, 2, 65535], dtype=torch.int32).to(torch.uint16)}, out / "uint16.bin")
    expect = {k: v.contiguous().clone() for k, v in {**dtypes, **views, "p": torch.load(out / "param.bin")["p"].detach()}.items()}
    expect["u16"] = torch.tensor([0, 1, 2, 65535], dtype=torch.int32).to(torch.uint16)
    save_file(expect, str(out / "expected.safetensors"))


#: (rows, hidden) of the torch mean(dim=0) cases: hidden % 32 != 0 and rows * hidden >= 32768,
#: where torch splits the columns among its threads.
MEAN_CASES = [(2000, 33), (600, 100), (1000, 250), (5000, 7), (300, 131), (4096, 72), (1500, 40)]


def torch_means(out: Path) -> None:
    """``torch.mean(x, dim=0)`` of float32 matrices under 1-4 intra-op threads (x from numpy's seed n*1000+hidden)."""
    import numpy as np
    import torch

    cases = []
    for n, h in MEAN_CASES:
        for t in (1, 2, 3, 4):
            torch.set_num_threads(t)
            x = np.random.default_rng(n * 1000 + h).standard_normal((n, h)).astype(np.float32)
            cases.append({"n": n, "hidden": h, "threads": t,
                          "mean_f32_hex": torch.from_numpy(x).mean(dim=0).numpy().tobytes().hex()})
    (out / "mean_dim0.json").write_text(json.dumps({"torch": torch.__version__, "cases": cases}, indent=1))


def save_models(out: Path, spm_dir: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    def model(vocab: int, seed: int, ancestor: dict | None) -> LlamaForCausalLM:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                          tie_word_embeddings=False, torch_dtype="bfloat16")
        torch.manual_seed(seed)
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
        if ancestor is not None:  # a fine-tune: the ancestor plus a small delta
            with torch.no_grad():
                for name, p in m.named_parameters():
                    a = ancestor[name]
                    if a.shape[0] < p.shape[0]:  # extended vocabulary: old rows from the ancestor
                        p[: a.shape[0]] = (a.float() + 0.01 * torch.randn_like(a.float())).to(p.dtype)
                    else:
                        p.copy_((a.float() + 0.01 * torch.randn_like(a.float())).to(p.dtype))
        return m

    base = model(420, 0, None)
    anc = {k: v.detach().clone() for k, v in base.named_parameters()}
    ext_size = 420 + len(EXT_PIECES)
    for name, m, sp, kw in (
        ("tulu", model(420, 1, anc), "base.model", {"safe_serialization": False, "max_shard_size": "20KB"}),
        ("swallow", model(ext_size, 2, anc), "ext.model", {"safe_serialization": True}),
        ("llama", base, "base.model", {"safe_serialization": False}),
    ):
        d = out / name
        if d.exists():
            shutil.rmtree(d)
        m.save_pretrained(d, **kw)
        LlamaTokenizer(vocab_file=str(spm_dir / sp), legacy=False).save_pretrained(d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg.pop("add_prefix_space", None)  # Llama-2-era repos do not set it
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def record_mergekit(root: Path) -> None:
    """Run mergekit 0.1.5 on every fixture config and record what it writes."""
    import transformers
    from safetensors.torch import load_file

    bin_dir = Path(sys.executable).parent
    root = root.resolve()
    cfg_dir = root / "configs"
    record = {"text": TEXT, "transformers": transformers.__version__, "configs": {}}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def outputs(out: Path) -> dict:
        tensors = {}
        for f in sorted(out.glob("*.safetensors")):
            for k, v in load_file(str(f)).items():
                raw = v.contiguous().reshape(-1).view(__import__('torch').uint8).numpy().tobytes()
                tensors[k] = [str(v.dtype).removeprefix('torch.'), list(v.shape), hashlib.sha256(raw).hexdigest()]
        tok = transformers.AutoTokenizer.from_pretrained(str(out))
        conf = json.loads((out / "config.json").read_text())
        return {"tensors": tensors, "vocab_size": conf["vocab_size"], "ids": tok.encode(TEXT), "vocab": len(tok.get_vocab())}

    for cfg in sorted(cfg_dir.glob("*.yaml")):
        out, inter = root / ".mk-out", root / ".mk-inter"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(inter, ignore_errors=True)
        if "\n---" in cfg.read_text():  # a multi-stage recipe: every named stage's output
            subprocess.run([str(bin_dir / "mergekit-multi"), str(cfg), "-I", str(inter), "--out-path", str(out)],
                           env=env, cwd=root, check=True, capture_output=True)
            stages = {d.name: outputs(d) for d in sorted(inter.iterdir())}
            record.setdefault("recipes", {})[cfg.name] = {"tool": "mergekit-multi", "stages": stages}
        else:
            subprocess.run([str(bin_dir / "mergekit-yaml"), str(cfg), str(out), "--random-seed", "0"], env=env,
                           cwd=root, check=True, capture_output=True)
            record["configs"][cfg.name] = outputs(out)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(inter, ignore_errors=True)
    (root / "mergekit.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--mergekit", action="store_true", help="record mergekit 0.1.5's outputs instead")
    a = ap.parse_args()
    if a.mergekit:
        record_mergekit(a.out)
        return
    train_spm(a.out / "spm")
    torch_cases(a.out / "torch")
    torch_means(a.out / "torch")
    save_models(a.out / "models", a.out / "spm")
    (a.out / "configs").mkdir(parents=True, exist_ok=True)
    for name, text in CONFIGS.items():
        (a.out / "configs" / name).write_text(text)


if __name__ == "__main__":
    main()
