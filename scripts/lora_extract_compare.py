#!/usr/bin/env python3
"""``superswallow extract-lora`` against ``mergekit-extract-lora`` on one fine-tune/base pair.

Run in the oracle venv (torch, transformers, peft, mergekit 0.1.5); our CLI is
run as a subprocess (``--ours``)::

    /work/oracle/venv/bin/python scripts/lora_extract_compare.py FT BASE --rank 16 \\
        --ours .venv/bin/superswallow [--logits] [--record tests/fixtures/lora/extract.json --name NAME]

1. both tools extract an adapter of rank R (mergekit: ``--max-rank R``, its defaults);
2. per LoRA tensor, the relative Frobenius error ``||ΔW - s B A||_F / ||ΔW||_F`` of
   each adapter is computed here in float64 from the files (``ΔW`` from the two
   models, ``s`` from each adapter's config), next to the error our report states;
3. ``--logits``: the base with our adapter through PEFT (unmerged), the base with
   it merged by ``superswallow merge`` (``BASE+ADAPTER``, linear weight 1), and
   the fine-tune, on one text: the largest logit differences;
4. ``--record``: the per-tensor errors of mergekit's adapter into a JSON file
   (the tests check that ours are no worse).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEXT = "Hello world. Merging models 日本語のテキストです。 def f(x): return x ** 2"


def load_state(folder: Path) -> dict:
    """Every tensor of a model or adapter folder (safetensors or .bin, sharded or not), as torch tensors."""
    import torch
    from safetensors.torch import load_file

    out = {}
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    for f in files:
        if f.name == "training_args.bin":
            continue
        out.update(load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu", weights_only=True))
    return out


def scales(cfg: dict, modules) -> dict:
    """PEFT's scale per module: lora_alpha / r with rank_pattern / alpha_pattern (first match)."""
    def pick(pattern: dict, module: str, default):
        return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", module)), default)

    out = {}
    for m in modules:
        r, a = pick(cfg.get("rank_pattern") or {}, m, cfg["r"]), pick(cfg.get("alpha_pattern") or {}, m, cfg["lora_alpha"])
        out[m] = a / math.sqrt(r) if cfg.get("use_rslora") else a / r
    return out


def errors(adapter: Path, ft: dict, base: dict) -> dict:
    """{tensor: relative Frobenius error} of an adapter's LoRA modules, float64."""
    import torch

    sd = load_state(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    mods = sorted({k[len("base_model.model."):].rsplit(".lora_", 1)[0] for k in sd if ".lora_A" in k})
    sc = scales(cfg, mods)
    out = {}
    for m in mods:
        a = sd[f"base_model.model.{m}.lora_A.weight"].double()
        b = sd[f"base_model.model.{m}.lora_B.weight"].double()
        name = f"{m}.weight"
        d = ft[name].double() - base[name].double()
        rec = sc[m] * (b @ a)
        if rec.shape != d.shape:
            rec = rec.T  # Conv1D
        out[name] = float(torch.linalg.norm(d - rec) / torch.linalg.norm(d))
    return out


def logits(ft: Path, base: Path, ours: Path, merged: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[(7 * i + 3) % 400 + 3 for i in range(48)]])  # token ids every model here has

    def run(model) -> torch.Tensor:
        with torch.no_grad():
            return model(ids).logits.float()

    l_ft = run(AutoModelForCausalLM.from_pretrained(str(ft)))
    l_peft = run(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(ours)))
    l_merged = run(AutoModelForCausalLM.from_pretrained(str(merged)))
    l_base = run(AutoModelForCausalLM.from_pretrained(str(base)))
    scale = float((l_ft - l_base).abs().max())

    def rel(x, y):
        return float((x - y).abs().max()) / scale

    return {"peft_vs_merged": rel(l_peft, l_merged), "peft_vs_finetune": rel(l_peft, l_ft),
            "merged_vs_finetune": rel(l_merged, l_ft), "base_vs_finetune": 1.0,
            "max_abs_finetune_minus_base": scale, "max_abs_logit": float(l_ft.abs().max()),
            "note": "max |logit difference| / max |finetune - base logits|"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ft", type=Path)
    ap.add_argument("base", type=Path)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--ours", default="superswallow", help="our CLI (a path or a command)")
    ap.add_argument("--keep", type=Path, help="keep both adapters under this folder")
    ap.add_argument("--logits", action="store_true")
    ap.add_argument("--record", type=Path, help="add mergekit's errors to this JSON file")
    ap.add_argument("--name", help="the pair's name in --record")
    a = ap.parse_args()
    work = a.keep or Path(tempfile.mkdtemp(prefix="extract-compare-"))
    ours, mk = work / "ours", work / "mergekit"
    for d in (ours, mk):
        shutil.rmtree(d, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    subprocess.run([*a.ours.split(), "extract-lora", str(a.ft), str(a.base), str(ours), "--rank", str(a.rank), "-q"],
                   check=True, env=env)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "mergekit-extract-lora"), "--model", str(a.ft), "--base-model",
                    str(a.base), "--out-path", str(mk), "--max-rank", str(a.rank)], check=True, env=env,
                   capture_output=True)
    t_mk = time.perf_counter() - t
    ft, base = load_state(a.ft), load_state(a.base)
    e_ours, e_mk = errors(ours, ft, base), errors(mk, ft, base)
    reported = {t["name"]: t for t in json.loads((ours / "extract_report.json").read_text())["tensors"]}
    print(f"{'tensor':48s} {'ours (report)':>14s} {'ours (here)':>12s} {'mergekit':>10s} {'energy':>8s}")
    worse = 0
    for n in sorted(e_mk):
        worse += e_ours[n] > e_mk[n]
        print(f"{n:48s} {reported[n]['error']:14.6f} {e_ours[n]:12.6f} {e_mk[n]:10.6f} {reported[n]['energy']:8.4f}"
              f"{'  WORSE' if e_ours[n] > e_mk[n] else ''}")
    print(f"{len(e_mk)} tensors; ours worse on {worse}; mean error ours {sum(e_ours.values()) / len(e_ours):.6f}, "
          f"mergekit {sum(e_mk.values()) / len(e_mk):.6f}; time ours {t_ours:.1f} s, mergekit {t_mk:.1f} s")
    mk_cfg = json.loads((mk / "adapter_config.json").read_text())
    our_cfg = json.loads((ours / "adapter_config.json").read_text())
    print("modules_to_save: ours", our_cfg["modules_to_save"], "mergekit", sorted(mk_cfg["modules_to_save"]))
    if a.logits:
        merged = work / "merged"
        cfg = work / "merged.yaml"
        cfg.write_text(f"models:\n  - model: {a.base.resolve()}+{ours}\n    parameters: {{weight: 1}}\n"
                       "merge_method: linear\n")
        subprocess.run([*a.ours.split(), "merge", str(cfg), str(merged), "-q", "--force"], check=True, env=env)
        print("logits:", json.dumps(logits(a.ft, a.base, ours, merged)))
    if a.record:
        rec = json.loads(a.record.read_text()) if a.record.is_file() else {}
        rec[a.name] = {"rank": a.rank, "mergekit_errors": e_mk, "mergekit_modules_to_save": sorted(mk_cfg["modules_to_save"])}
        a.record.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    if not a.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
