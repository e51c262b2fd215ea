"""I/O floor for a two-model merge: the least work any merger must do.

Reads every weight file (``*.safetensors``, ``pytorch_model*.bin``) of two model folders once (``readinto`` a
reused buffer, so nothing is computed and nothing is kept) and writes one
output file as large as the first model's weights with ``posix_fallocate`` +
``os.pwrite``. No fsync (the page cache absorbs the write, as it does for any
merger that does not fsync). Reads and writes are interleaved chunk by chunk,
the way a streaming merger interleaves them.

    python bench/io_floor.py MODEL_A MODEL_B OUT_FILE [--chunk-mb 16]

Prints one JSON line: bytes read, bytes written, wall seconds (in-process).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def weight_files(model_dir: Path) -> list[Path]:
    files = sorted([*Path(model_dir).glob("*.safetensors"), *Path(model_dir).glob("pytorch_model*.bin")])
    if not files:
        raise SystemExit(f"{model_dir}: no *.safetensors or pytorch_model*.bin files")
    return files


class Stream:
    """Sequential reader over a list of files, one reused buffer."""

    def __init__(self, files: list[Path], chunk: int):
        self.files = list(files)
        self.buf = bytearray(chunk)
        self.view = memoryview(self.buf)
        self.f = None
        self.total = 0

    def read(self) -> memoryview | None:
        while True:
            if self.f is None:
                if not self.files:
                    return None
                self.f = open(self.files.pop(0), "rb", buffering=0)
            n = self.f.readinto(self.buf)
            if n:
                self.total += n
                return self.view[:n]
            self.f.close()
            self.f = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_a", type=Path)
    ap.add_argument("model_b", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--chunk-mb", type=int, default=16)
    args = ap.parse_args()

    t0 = time.perf_counter()
    chunk = args.chunk_mb << 20
    a_files, b_files = weight_files(args.model_a), weight_files(args.model_b)
    out_size = sum(f.stat().st_size for f in a_files)
    a, b = Stream(a_files, chunk), Stream(b_files, chunk)

    try:
        args.out.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(args.out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    written = 0
    try:
        os.posix_fallocate(fd, 0, out_size)
        while True:
            da = a.read()
            db = b.read()
            if da is None and db is None:
                break
            if da is not None:  # write what was read from A at A's position
                buf = da
                while len(buf):
                    n = os.pwrite(fd, buf, written)
                    buf = buf[n:]
                    written += n
    finally:
        os.close(fd)
    wall = time.perf_counter() - t0
    print(json.dumps({"read_bytes": a.total + b.total, "written_bytes": written, "wall_s": round(wall, 4)}))


if __name__ == "__main__":
    main()
