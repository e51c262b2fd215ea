#!/usr/bin/env python3
"""The mistakes and hostile inputs of issue 14, run through a checkout's command line: exit code and first line.

    .venv/bin/python scripts/strictness_cases.py --checkout /path/to/old/worktree --module cli.main
    .venv/bin/python scripts/strictness_cases.py                       # this checkout

Each case writes its files into a temporary folder (tiny models from
``superswallow tiny``) and runs ``merge``, ``plan`` or ``verify``. Prints a
Markdown table: case, exit code, the first line of the output (cut to 110
characters), and the output's size in bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ta(m: dict, params: str = "weight: 1.0", method: str = "task_arithmetic", extra: str = "") -> str:
    return (f"models:\n  - model: {m['llama']}\n  - model: {m['tulu']}\n    parameters: {{{params}}}\n"
            f"merge_method: {method}\nbase_model: {m['llama']}\ndtype: bfloat16\n{extra}")


def _poison(shard: Path, name: str) -> None:
    """Set 3 elements of tensor ``name`` in safetensors file ``shard`` to NaN and 2 to Inf."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    tensors = load_file(shard)
    w = tensors[name].copy()
    w.reshape(-1)[:3] = np.nan
    w.reshape(-1)[3:5] = np.inf
    tensors[name] = w
    save_file(tensors, shard)


def cases(m: dict, w: Path) -> list[tuple[str, list[str]]]:
    def cfg(name: str, text: str) -> str:
        p = w / f"{name}.yaml"
        p.write_text(text)
        return str(p)

    def copy(model: str, name: str) -> Path:
        d = w / name
        shutil.copytree(m[model], d)
        return d

    out = []
    out.append(("density: -0.2", ["merge", cfg("d1", _ta(m, "weight: 1.0, density: -0.2", "dare_ties")), str(w / "o1")]))
    out.append(("density: 1.5", ["merge", cfg("d2", _ta(m, "weight: 1.0, density: 1.5", "dare_ties")), str(w / "o2")]))
    d = copy("tulu", "four")
    c = json.loads((d / "config.json").read_text())
    c["num_hidden_layers"] = "four"
    (d / "config.json").write_text(json.dumps(c))
    out.append(('num_hidden_layers: "four"', ["merge", cfg("four", _ta(m).replace(str(m["tulu"]), str(d))), str(w / "o3")]))
    lin = f"models:\n  - model: {m['llama']}\n    parameters: {{weight: 0.5}}\n  - model: {m['tulu']}\n    parameters: {{weight: -0.5}}\nmerge_method: linear\ndtype: bfloat16\n"
    out.append(("linear weights sum to 0", ["merge", cfg("lin0", lin), str(w / "o4")]))
    out.append(("filter matches nothing", ["merge", cfg("flt", _ta(m, "weight: [{filter: mlp.down_prj, value: 0.3}, {value: 1.0}]")), str(w / "o5")]))
    out.append(("duplicate merge_method", ["merge", cfg("dup", _ta(m) + "merge_method: ties\n"), str(w / "o6")]))
    out.append(('weight: "0.5"', ["merge", cfg("q", _ta(m, 'weight: "0.5"')), str(w / "o7")]))
    out.append(("chat_template: chatml", ["merge", cfg("chat", _ta(m, extra="chat_template: chatml\n")), str(w / "o8")]))
    out.append(("multi-document YAML", ["merge", cfg("multi", _ta(m) + "---\n" + _ta(m)), str(w / "o9")]))
    out.append(("100k [ in the config", ["merge", cfg("deep", "merge_method: linear\nmodels: " + "[" * 100_000), str(w / "o10")]))
    d = copy("tulu", "deepjson")
    (d / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    out.append(("100k [ in config.json", ["merge", cfg("dj", _ta(m).replace(str(m["tulu"]), str(d))), str(w / "o11")]))
    bomb = ("x0: &a0 [1,1,1,1,1,1,1,1,1,1]\n"
            + "".join(f"x{i}: &a{i} [{', '.join(f'*a{i - 1}' for _ in range(10))}]\n" for i in range(1, 9)))
    out.append(("1 KB alias bomb in a gradient", ["merge", cfg("bomb", bomb + _ta(m, "weight: *a8")), str(w / "o12")]))
    big = w / "big.yaml"
    big.write_text("merge_method: linear\nmodels:\n" + "".join(f"  - model: m{i}\n" for i in range(170_000)))
    out.append(("10 MB YAML, 170k models", ["plan", str(big)]))
    out.append(("100 MB-ish value in an error", ["plan", cfg("huge", _ta(m, 'weight: "' + "y" * 500_000 + '"'))]))
    d = copy("llama", "surrogate")
    header = json.dumps({"\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    out.append(("lone surrogate tensor name", ["hash", str(d)]))
    d = copy("llama", "link")
    secret = w / "secret.json"
    shutil.copyfile(d / "tokenizer.json", secret)
    secret.chmod(0o600)
    (d / "tokenizer.json").unlink()
    os.symlink(secret, d / "tokenizer.json")
    out.append(("tokenizer.json links outside", ["merge", cfg("link", _ta(m, extra="tokenizer_source: union\n").replace(str(m["llama"]), str(d))), str(w / "o16")]))
    f = w / "afile"
    f.write_text("x")
    out.append(("model path is a file", ["merge", cfg("file", _ta(m).replace(str(m["tulu"]), str(f))), str(w / "o17")]))
    out.append(("tokenizer_source: unoin", ["merge", cfg("unoin", _ta(m, extra="tokenizer_source: unoin\n")), str(w / "o18")]))
    d = copy("tulu", "nan")
    name = "model.layers.0.mlp.up_proj.weight"
    shard = d / json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]
    _poison(shard, name)
    out.append(("NaN and Inf in an input", ["merge", cfg("nan", _ta(m).replace(str(m["tulu"]), str(d))), str(w / "o19")]))
    ok = cfg("ok", _ta(m))
    subprocess.run([str(ROOT / ".venv" / "bin" / "superswallow"), "merge", ok, str(w / "ref"), "-q"], check=True)
    out.append(("verify --tensors nothing", ["verify", ok, str(w / "ref"), "--tensors", "no_such"]))
    out.append(("--version", ["--version"]))
    return out


def run(checkout: Path, module: str, argv: list[str]) -> tuple[int, str, int]:
    code = f"import sys; sys.argv = ['superswallow', *sys.argv[1:]]; from {module} import main; main()"
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(checkout)}, timeout=600, cwd=checkout)
    text = (r.stderr.strip() or r.stdout.strip())
    lines = [x for x in text.splitlines() if x.strip() and not x.startswith(("writing ", "merging "))]
    first = lines[0] if lines else ""
    if "Traceback" in text:
        first = "Traceback: " + (lines[-1] if lines else "")
    return r.returncode, first, len(r.stdout) + len(r.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", type=Path, default=ROOT)
    ap.add_argument("--module", default="superswallow_jax.cli")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from superswallow_jax.tiny import make_tiny_models

    w = Path(tempfile.mkdtemp(prefix="ssj-strict-"))
    m = make_tiny_models(w / "models", models=["llama", "tulu"])
    print("| case | exit | first line | output bytes |\n|---|---|---|---|")
    for name, argv in cases(m, w):
        code, first, size = run(a.checkout, a.module, argv)
        first = first.replace(str(w), "<tmp>").replace("|", "\\|")
        print(f"| {name} | {code} | {first[:110]} | {size:,} |", flush=True)
    shutil.rmtree(w, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
