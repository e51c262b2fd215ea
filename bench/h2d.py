"""Host<->device copy bandwidth of the default JAX device, for chunk-sized bf16 arrays.

The streaming loop moves every input chunk host -> device and every result
device -> host, so on an accelerator these bandwidths bound it from below:
for the 1.3 GB pair, 2.7 GB in and 1.35 GB out. Compare a merge's streaming
phase (``bench/merge_probe.py``: ``loop_done - first_chunk``) with the time
these copies alone would take.

    python bench/h2d.py [--elems 1048576,4194304,16777216] [--repeat 20]

Prints one JSON line per chunk size: the backend, the chunk's bytes, and the
median GB/s of ``jax.device_put`` (64-byte-aligned NumPy buffer, as the reader
hands over; and an 8-byte-aligned one, as a memory-mapped safetensors file
would give) and of ``np.asarray`` of a device result, each waited for. On the
CPU backend an aligned ``device_put`` shares the host memory, so its figure
is not a copy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import ml_dtypes
import numpy as np


def aligned(nbytes: int, offset: int = 0) -> np.ndarray:
    """A ``uint8[nbytes]`` view whose address is ``offset`` bytes past a 64-byte boundary."""
    raw = np.empty(nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    return raw[start : start + nbytes]


def median_gbps(fn, nbytes: int, repeat: int) -> float:
    fn()  # warm-up (allocations, first transfer)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elems", default="1048576,4194304,16777216", help="comma list of bf16 elements per chunk")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    dev = jax.devices()[0]
    rng = np.random.default_rng(0)
    for n in (int(x) for x in args.elems.split(",")):
        nbytes = 2 * n
        bufs = {}
        for name, off in (("aligned64", 0), ("aligned8", 8)):
            b = aligned(nbytes, off)
            b[:] = rng.integers(0, 256, nbytes, dtype=np.uint8)
            bufs[name] = b.view(ml_dtypes.bfloat16)
        row = {"backend": jax.default_backend(), "device": str(dev), "elems": n, "bytes": nbytes}
        for name, host in bufs.items():
            row[f"h2d_{name}_GBps"] = round(median_gbps(lambda h=host: jax.device_put(h, dev).block_until_ready(), nbytes, args.repeat), 2)
        # computation results, as the merge's are; fresh ones (np.asarray keeps the host copy it made)
        x = jax.device_put(bufs["aligned64"], dev)
        made = jax.block_until_ready([x + i for i in range(args.repeat + 1)])
        results = iter(made)
        row["d2h_GBps"] = round(median_gbps(lambda: np.asarray(next(results)), nbytes, args.repeat), 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
