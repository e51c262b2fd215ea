#!/usr/bin/env python3
"""Digests of many merges on this process's JAX backend; compare two such runs.

Checks the determinism contract across backends (CPU vs GPU vs TPU) and JAX
versions: run it once per backend, then compare the JSON files.

    # merge every config on the default backend, then on the CPU
    python scripts/backend_digests.py run --models models --out gpu.json configs/*.yaml configs/examples/*.yaml
    JAX_PLATFORMS=cpu python scripts/backend_digests.py run --models models --out cpu.json configs/...
    python scripts/backend_digests.py compare cpu.json gpu.json

``run`` rewrites the configs' relative ``models/...`` paths to ``--models``,
merges each config in this one process (``run_merge``, seed ``--seed``) into a
temporary folder and records the model digest and every tensor's sha256 from
the merge manifest, with the backend, device kinds and versions. ``compare``
prints one line per config (equal, or how many tensors differ and which) and
exits 1 if any config differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(args) -> int:
    import jax

    from superswallow_jax.manifest import read_manifest
    from superswallow_jax.merge import run_merge
    from superswallow_jax.options import MergeOptions
    from superswallow_jax.recipe import load_recipe, run_recipe

    models = args.models.resolve()
    result = {
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.local_devices()],
        "jax": jax.__version__,
        "seed": args.seed,
        "configs": {},
    }
    with tempfile.TemporaryDirectory(prefix="ssj-backend-") as tmp:
        for cfg_path in args.configs:
            text = cfg_path.read_text().replace("models/", f"{models}/")
            local = Path(tmp) / cfg_path.name
            local.write_text(text)
            out = Path(tmp) / "out"
            t = time.perf_counter()
            try:
                opts = MergeOptions(seed=args.seed, force=True, fsync=False, chunk_elems=args.chunk_elems)
                recipe = load_recipe(local)  # a multi-stage recipe: every stage, the last one's digests
                if recipe.multi:
                    run_recipe(recipe, out, opts)
                else:
                    run_merge(recipe.final.config, out, opts)
            except Exception as e:  # record and go on: one broken config must not hide the others
                result["configs"][cfg_path.name] = {"error": f"{type(e).__name__}: {e}"}
                print(f"{cfg_path.name}: ERROR {type(e).__name__}: {e}", flush=True)
                continue
            m = read_manifest(out)
            result["configs"][cfg_path.name] = {
                "model_digest": m["model_digest"],
                "tensors": {k: v["sha256"] if isinstance(v, dict) else v for k, v in m["tensors"].items()},
                "seconds": round(time.perf_counter() - t, 3),
            }
            print(f"{cfg_path.name}: {m['model_digest'][:16]} ({time.perf_counter() - t:.2f} s)", flush=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    return 0


def compare(args) -> int:
    a, b = (json.loads(p.read_text()) for p in (args.a, args.b))
    print(f"A: {a['backend']} {a['devices'][:1]} x{len(a['devices'])} jax {a['jax']}")
    print(f"B: {b['backend']} {b['devices'][:1]} x{len(b['devices'])} jax {b['jax']}")
    bad = 0
    for name in sorted(set(a["configs"]) | set(b["configs"])):
        ca, cb = a["configs"].get(name), b["configs"].get(name)
        if ca is None or cb is None or "error" in ca or "error" in cb:
            bad += 1
            print(f"{name}: MISSING/ERROR A={ca and ca.get('error', 'ok')} B={cb and cb.get('error', 'ok')}")
            continue
        ta, tb = ca["tensors"], cb["tensors"]
        diff = sorted(k for k in set(ta) | set(tb) if ta.get(k) != tb.get(k))
        if ca["model_digest"] == cb["model_digest"] and not diff:
            print(f"{name}: equal ({len(ta)} tensors, {ca['model_digest'][:16]})")
        else:
            bad += 1
            print(f"{name}: DIFFERS in {len(diff)}/{len(ta)} tensors: {', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}")
    print(f"{len(set(a['configs']) | set(b['configs'])) - bad} equal, {bad} differ")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--models", type=Path, required=True, help="folder made by `superswallow tiny`")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--chunk-elems", type=int, default=None)
    r.add_argument("configs", type=Path, nargs="+")
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args()
    return run(args) if args.cmd == "run" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
