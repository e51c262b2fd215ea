#!/usr/bin/env python3
"""Kill real merges with SIGKILL at every commit step and at random points while writing; rerun; check.

For each recipe x shard size x kill point: a reference merge, then a merge
killed at the point (``SUPERSWALLOW_CRASH_AT``; a foreign file sits in OUT so
the journal steps run), then the same command again. Checks after the kill:
no final-named weight file in OUT unless the merge is complete. After the
rerun: OUT byte-identical to the reference (the foreign file kept), no
staging folder or journal left. Prints one line per case and a total.

    .venv/bin/python scripts/crash_matrix.py [--models DIR] [--random 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COMMIT_POINTS = ["staged", "before-journal", "journal-written", "moved-one", "renamed", "committed"]
RECIPES = ["superswallow-tiny.yaml", "examples/dare-ties-d05.yaml"]


def cli(cfg: Path, out: Path, shard: str, crash: str | None = None, force: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SUPERSWALLOW_CRASH_AT"}
    if crash:
        env["SUPERSWALLOW_CRASH_AT"] = crash
    return subprocess.run([str(ROOT / ".venv" / "bin" / "superswallow"), "merge", str(cfg), str(out), "-q",
                           "--shard-size", shard, *(["--force"] if force else [])], capture_output=True, text=True, env=env)


def files(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def main() -> int:
    from superswallow_jax.io.commit import journal_path, staging_path
    from superswallow_jax.tiny import make_tiny_models

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=None)
    ap.add_argument("--random", type=int, default=3, help="random tensor counts to kill after, per recipe and shard size")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ssj-crash-"))
    models = a.models or work / "models"
    if a.models is None:
        make_tiny_models(models, models=["swallow", "tulu"])
    rng = random.Random(0)
    ok = total = 0
    for recipe in RECIPES:
        cfg = work / Path(recipe).name
        cfg.write_text((ROOT / "configs" / recipe).read_text().replace("models/", f"{models}/"))
        for shard in ("5B", "200K"):
            ref = work / "ref" / "out"
            shutil.rmtree(ref.parent, ignore_errors=True)
            assert cli(cfg, ref, shard).returncode == 0
            points = COMMIT_POINTS + [f"tensor-{rng.randrange(1, 39)}" for _ in range(a.random)]
            for point in points:
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                # commit steps: a file of someone else's in OUT (the journal steps run; --force);
                # kills while writing: an empty OUT and the same command again, which resumes
                writing = point.startswith("tensor-")
                if not writing:
                    out.mkdir()
                    (out / "notes.txt").write_text("someone else's")
                r = cli(cfg, out, shard, crash=point, force=not writing)
                complete = point in ("renamed", "committed")
                weights = sorted(p.name for p in out.iterdir() if ".safetensors" in p.name) if out.is_dir() else []
                killed_ok = r.returncode == -9 and bool(weights) == complete
                r2 = cli(cfg, out, shard, force=not writing)
                got = files(out) if out.is_dir() else {}
                kept = writing or got.pop("notes.txt", None) == hashlib.sha256(b"someone else's").hexdigest()
                if writing:
                    kept = "resume:" in r2.stderr
                clean = not staging_path(out).exists() and not journal_path(out).exists()
                same = r2.returncode == 0 and got == files(ref)
                good = killed_ok and kept and clean and same
                ok += good
                total += 1
                print(f"{'ok  ' if good else 'FAIL'} {recipe:<28} shard {shard:<4} kill at {point:<16} "
                      f"final-named weights after kill: {len(weights)}; rerun identical: {same}; "
                      f"{'resumed' if writing else 'other file kept'}: {kept}; no staging left: {clean}", flush=True)
    print(f"{ok}/{total} kills: no incomplete final-named output, resumed output identical, nothing left behind")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok == total else 1


if __name__ == "__main__":
    sys.exit(main())
