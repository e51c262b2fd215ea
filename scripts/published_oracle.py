#!/usr/bin/env python3
"""Published-format parity: ours vs mergekit 0.1.5 on tiny Llama-2-style pairs in every input form.

For each (input forms, recipe) case this script

1. makes the tiny models with ``superswallow tiny --published`` and derives
   the other forms from them (``.bin`` single / sharded, safetensors, each
   with a sentencepiece-only tokenizer);
2. merges with mergekit 0.1.5 (``--mergekit-bin``, offline) and with ours;
3. compares every tensor bit for bit (``scripts/mergekit_parity.py --compare-dirs``),
   ``config.json``'s ``vocab_size``, and the token ids of :data:`TEXT`: mergekit's
   output loaded by transformers v5 against ours loaded by v5 (``--v5-python``)
   and by 4.46 (``--v46-python``, fast and, where ``tokenizer.model`` is
   written, slow).

Example (oracle venvs as in docs/mergekit-0.1.5-notes.md)::

    .venv/bin/python scripts/published_oracle.py --work /tmp/pub-oracle \\
        --mergekit-bin /work/oracle/venv/bin/mergekit-yaml \\
        --v5-python /work/oracle/venv/bin/python --v46-python /work/oracle/venv46/bin/python

It prints one line per case and exits non-zero if anything differs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("Hello world. Merging models is fun. 日本語のテキストです。東京は日本の首都です。\n"
        "def f(x):\n    return x ** 2  # code\t tabs 123456 🙂🚀 café naïve </s> <s>ok")

RECIPES = {
    "superswallow": (ROOT / "configs" / "superswallow-tiny.yaml").read_text(),
    "linear-base": """models:
  - model: models/A
    parameters: {weight: 0.6}
  - model: models/B
    parameters: {weight: 0.4}
merge_method: linear
base_model: models/A
dtype: bfloat16
tokenizer_source: base
""",
    "linear-none": """models:
  - model: models/A
    parameters: {weight: 0.6}
  - model: models/B
    parameters: {weight: 0.4}
merge_method: linear
dtype: bfloat16
""",
}

#: name -> (recipe, {placeholder in the recipe: model folder under the work dir})
CASES = {
    "superswallow: swallow st+sp, tulu bin-sharded+sp (mixed)": ("superswallow", {"swallow": "pub/swallow", "tulu": "pub/tulu"}),
    "superswallow: swallow st+sp, tulu bin-single+sp (mixed)": ("superswallow", {"swallow": "pub/swallow", "tulu": "forms/tulu-bin1"}),
    "superswallow: swallow bin-sharded+sp, tulu st+sp (mixed)": ("superswallow", {"swallow": "forms/swallow-bin", "tulu": "forms/tulu-st"}),
    "linear-base: tulu bin-sharded+sp, llama bin-single+sp": ("linear-base", {"A": "pub/tulu", "B": "pub/llama"}),
    "linear-base: tulu st+sp, llama st+sp": ("linear-base", {"A": "forms/tulu-st", "B": "forms/llama-st"}),
    "linear-none: tulu bin-sharded+sp, llama bin-single+sp": ("linear-none", {"A": "pub/tulu", "B": "pub/llama"}),
    "linear-none: tulu st+sp, llama st+sp": ("linear-none", {"A": "forms/tulu-st", "B": "forms/llama-st"}),
    "superswallow, 4.46-saved tokenizer configs": ("superswallow", {"swallow": "forms/swallow-46", "tulu": "forms/tulu-46"}),
    "linear-base, 4.46-saved tokenizer configs": ("linear-base", {"A": "forms/tulu-46", "B": "forms/llama-46"}),
}

#: tokenizer_config.json as transformers 4.46's LlamaTokenizer.save_pretrained writes it.
CONFIG_46 = {
    "add_bos_token": True, "add_eos_token": False, "add_prefix_space": True, "bos_token": "<s>",
    "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": True, "model_max_length": 4096,
    "pad_token": None, "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
    "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False,
    "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True}
                             for i, t in enumerate(("<unk>", "<s>", "</s>"))},
}

ENCODE = r"""
import json, sys, os
from transformers import AutoTokenizer
folder, text, use_fast = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
t = AutoTokenizer.from_pretrained(folder, use_fast=use_fast)
print(json.dumps({"ids": t.encode(text), "n": len(t.get_vocab()), "cls": type(t).__name__}))
"""


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def make_forms(work: Path) -> None:
    """The published twins plus the same weights in the other forms."""
    sys.path.insert(0, str(ROOT))
    from superswallow_jax.io.checkpoint import Checkpoint
    from superswallow_jax.tiny import make_tiny_models
    from superswallow_jax.tiny_published import write_torch_bin
    from safetensors.numpy import save_file

    pub = make_tiny_models(work / "pub", models=["llama", "swallow", "tulu"], published=True)
    forms = work / "forms"
    forms.mkdir(exist_ok=True)

    def derive(src: Path, dst: Path, fmt: str) -> None:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.bin", "*.safetensors", "*.index.json"))
        ck = Checkpoint(src)
        arrays = {n: ck.view(n) for n in ck.tensors}
        if fmt == "bin1":
            write_torch_bin(dst / "pytorch_model.bin", arrays)
        elif fmt == "st":
            save_file(arrays, str(dst / "model.safetensors"), metadata={"format": "pt"})
        else:  # bin, two shards
            names = list(arrays)
            half = len(names) // 2
            wmap = {}
            for k, part in enumerate((names[:half], names[half:])):
                fname = f"pytorch_model-{k + 1:05d}-of-00002.bin"
                write_torch_bin(dst / fname, {n: arrays[n] for n in part})
                wmap.update({n: fname for n in part})
            (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
        ck.close()

    derive(pub["tulu"], forms / "tulu-bin1", "bin1")
    derive(pub["tulu"], forms / "tulu-st", "st")
    derive(pub["llama"], forms / "llama-st", "st")
    derive(pub["swallow"], forms / "swallow-bin", "bin")
    for name in ("swallow", "tulu", "llama"):
        dst = forms / f"{name}-46"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(pub[name], dst)
        (dst / "tokenizer_config.json").write_text(json.dumps(CONFIG_46, indent=2))


def config_for(work: Path, recipe: str, models: dict[str, str]) -> Path:
    text = RECIPES[recipe]
    for key, folder in models.items():
        text = text.replace(f"models/{key}", str(work / folder))
    path = work / "cfg" / f"{recipe}-{abs(hash(tuple(sorted(models.items()))))}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def encode(python: str, folder: Path, fast: bool) -> dict:
    r = sh([python, "-c", ENCODE, str(folder), TEXT, "1" if fast else "0"], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_case(a: argparse.Namespace, work: Path, name: str, recipe: str, models: dict[str, str]) -> bool:
    cfg = config_for(work, recipe, models)
    mk, ours = work / "out" / f"mk-{cfg.stem}", work / "out" / f"ours-{cfg.stem}"
    for d in (mk, ours):
        shutil.rmtree(d, ignore_errors=True)
    r = sh([a.mergekit_bin, str(cfg), str(mk), "--random-seed", "0"], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode:
        print(f"FAIL {name}: mergekit failed: {r.stderr.strip().splitlines()[-1]}")
        return False
    r = sh([str(ROOT / ".venv" / "bin" / "superswallow"), "merge", str(cfg), str(ours), "--seed", "0", "--no-fsync"])
    if r.returncode:
        print(f"FAIL {name}: ours failed: {r.stdout.strip()[-300:]} {r.stderr.strip()[-300:]}")
        return False
    par = sh([sys.executable, str(ROOT / "scripts" / "mergekit_parity.py"), "--compare-dirs", str(mk), str(ours),
              "--config", str(cfg)])
    tensors_ok = par.returncode == 0
    vs = [json.loads((d / "config.json").read_text())["vocab_size"] for d in (mk, ours)]
    ref = encode(a.v5_python, mk, True)
    got = {"v5": encode(a.v5_python, ours, True), "4.46 fast": encode(a.v46_python, ours, True)}
    if (ours / "tokenizer.model").is_file():
        got["4.46 slow"] = encode(a.v46_python, ours, False)
    mk46 = encode(a.v46_python, mk, True)
    ids_ok = all(g.get("ids") == ref.get("ids") and "error" not in g for g in got.values()) and "error" not in ref
    ok = tensors_ok and vs[0] == vs[1] and ids_ok
    lines = [x.strip() for x in par.stdout.splitlines() if "bit-exact" in x]
    summary = lines[-1].split(": ", 1)[-1] if lines else (par.stdout + par.stderr).strip()[-200:]
    loads = ", ".join(f"{k} {'same ids' if g.get('ids') == ref.get('ids') else g.get('error', 'DIFFERENT ids')}"
                      for k, g in got.items())
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {summary}; vocab_size {vs[0]}/{vs[1]}; ours loads: {loads}; "
          f"mergekit's output in 4.46: {'loads' if 'ids' in mk46 else mk46['error']}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--mergekit-bin", required=True)
    ap.add_argument("--v5-python", required=True)
    ap.add_argument("--v46-python", required=True)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    make_forms(a.work)
    results = [run_case(a, a.work, name, recipe, models) for name, (recipe, models) in CASES.items()]
    print(f"{sum(results)}/{len(results)} cases equal")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
