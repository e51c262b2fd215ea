#!/usr/bin/env python3
"""``base+adapter`` parity with mergekit's ``--lora-merge-cache`` on any model, with an adapter made here by peft.

Run in the oracle venv (torch, transformers, peft, mergekit 0.1.5); our CLI runs as a subprocess::

    /work/oracle/venv/bin/python scripts/lora_merge_parity.py BASE WORK --rank 16 \\
        --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,embed_tokens --ours .venv/bin/superswallow

1. peft writes an adapter of rank R on BASE (seeded factors: A like Kaiming, B ~ N(0, 0.02)) into WORK/adapter;
2. ``models: [{model: BASE+WORK/adapter, weight: 1}]``, ``linear``, ``dtype: bfloat16`` is merged by
   ``mergekit-yaml --lora-merge-cache`` and by ``superswallow merge``;
3. every tensor is compared: bit-exact, or the number of differing elements and the largest
   difference in units in the last place.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def make_adapter(base: Path, out: Path, rank: int, targets: list[str], seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if "lora_A" in name or "lora_embedding_A" in name:
                fan_in = p.shape[1] if "lora_A" in name else p.shape[0]
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) / fan_in ** 0.5)
            elif "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    shutil.rmtree(out, ignore_errors=True)
    pm.save_pretrained(str(out), save_embedding_layers=False)


def compare(a: Path, b: Path) -> list[str]:
    import numpy as np
    import torch
    from safetensors.torch import load_file

    def tensors(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    ta, tb = tensors(a), tensors(b)
    lines = []
    if set(ta) != set(tb):
        lines.append(f"tensor sets differ: {sorted(set(ta) ^ set(tb))[:5]}")
    for n in sorted(set(ta) & set(tb)):
        x, y = ta[n], tb[n]
        if x.dtype != y.dtype or x.shape != y.shape:
            lines.append(f"{n}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
            continue
        bits, sign = {2: (torch.int16, 1 << 15), 4: (torch.int32, 1 << 31)}[x.element_size()]

        def ordered(t):  # float bit patterns on one integer line: neighbours differ by 1, -0 == +0
            i = t.view(bits).numpy().astype(np.int64) & (2 * sign - 1)
            return np.where(i >= sign, -(i - sign), i)

        xi, yi = ordered(x), ordered(y)
        ne = xi != yi
        if ne.any():
            xf, yf = x.float().numpy(), y.float().numpy()
            d = np.abs(xf - yf)[ne]
            # one step of the dtype at the larger value: where a sum straddles a rounding boundary
            step = np.spacing(np.maximum(np.abs(xf), np.abs(yf))[ne].astype(np.float32)) * (2.0 ** (23 - {2: 7, 4: 23}[x.element_size()]))
            lines.append(f"{n}: {int(ne.sum())} of {ne.size} elements differ; largest difference {d.max():.3g} "
                         f"(tensor max {np.abs(xf).max():.3g}); {int((d > step * 1.0001).sum())} differ by more than one "
                         f"step of the larger value (cancellation: W + delta near 0)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--targets", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ours", default="superswallow")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    adapter = a.work / "adapter"
    make_adapter(a.base, adapter, a.rank, a.targets.split(","), a.seed)
    cfg = a.work / "linear.yaml"
    cfg.write_text(f"models:\n  - model: {a.base.resolve()}+{adapter.resolve()}\n    parameters: {{weight: 1.0}}\n"
                   "merge_method: linear\ndtype: bfloat16\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    outs = {"mergekit": a.work / "mergekit", "ours": a.work / "ours"}
    for d in (*outs.values(), a.work / "cache"):
        shutil.rmtree(d, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"), str(cfg), str(outs["mergekit"]),
                    "--lora-merge-cache", str(a.work / "cache")], check=True, env=env, capture_output=True)
    t_mk = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run([*a.ours.split(), "merge", str(cfg), str(outs["ours"]), "-q"], check=True, env=env)
    t_ours = time.perf_counter() - t
    diff = compare(outs["mergekit"], outs["ours"])
    print("\n".join(diff) if diff else "every tensor bit-exact")
    print(f"rank {a.rank}, targets {a.targets}: mergekit {t_mk:.1f} s (merge cache included), ours {t_ours:.1f} s")


if __name__ == "__main__":
    main()
