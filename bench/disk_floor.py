"""Disk floor of a merge: every input read in parallel, and an output of the same size written with fsync.

What a merge cannot beat on this disk, measured in the same run as the merge:

* ``read_s``: every weight file (``*.safetensors``, ``pytorch_model*.bin``) of
  the given model folders read once, ``--threads`` files at a time, each with
  ``preadv`` of ``--chunk-mb`` into a reused buffer (nothing kept or computed);
* ``write_s``: one file as large as the first model's weights written with
  ``posix_fallocate`` + ``pwrite`` and then ``fsync`` (as the merge's output is);
* ``max_s`` (the floor if reads and writes overlap perfectly) and ``sum_s``
  (if they do not overlap at all).

Run it after emptying the page cache for the cold floor (``bench_merge.py --cold`` does).

    python bench/disk_floor.py OUT_FILE MODEL [MODEL ...] [--threads 8] [--chunk-mb 16]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def weight_files(model_dir: Path) -> list[Path]:
    files = sorted([*Path(model_dir).glob("*.safetensors"), *Path(model_dir).glob("pytorch_model*.bin")])
    if not files:
        raise SystemExit(f"{model_dir}: no *.safetensors or pytorch_model*.bin files")
    return files


def read_all(path: Path, chunk: int) -> int:
    """Read ``path`` once, front to back; returns the bytes read."""
    buf = bytearray(chunk)
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while True:
            n = os.preadv(fd, [buf], pos)
            if n <= 0:
                return pos
            pos += n
    finally:
        os.close(fd)


def write_all(path: Path, size: int, chunk: int) -> int:
    """Write ``size`` bytes to a new ``path`` and fsync it; returns the bytes written."""
    buf = memoryview(os.urandom(min(chunk, max(1, size))))
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
        pos = 0
        while pos < size:
            pos += os.pwrite(fd, buf[: min(len(buf), size - pos)], pos)
        os.fsync(fd)
        return pos
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("models", type=Path, nargs="+")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--chunk-mb", type=int, default=16)
    args = ap.parse_args()
    chunk = args.chunk_mb << 20
    files = [f for m in args.models for f in weight_files(m)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.threads) as pool:
        read = sum(pool.map(lambda f: read_all(f, chunk), files))
    t1 = time.perf_counter()
    written = write_all(args.out, sum(f.stat().st_size for f in weight_files(args.models[0])), chunk)
    t2 = time.perf_counter()
    args.out.unlink()
    r, w = t1 - t0, t2 - t1
    print(json.dumps({"read_bytes": read, "written_bytes": written, "read_s": round(r, 4), "write_s": round(w, 4),
                      "max_s": round(max(r, w), 4), "sum_s": round(r + w, 4), "wall_s": round(r + w, 4)}))


if __name__ == "__main__":
    main()
