"""Benchmark: jax.random.bernoulli vs superswallow_jax.prng.bernoulli_mask.

Draws a 16M-element float32-p Bernoulli mask with each implementation (both
jitted, compile excluded) and prints the median wall time and the ratio.
Informational only: no assertions. Run:

    python bench/bench_prng.py [--n N] [--repeats R]   (or: python -m bench.bench_prng)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

if not __package__:  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from superswallow_jax import prng  # noqa: E402


def _median_seconds(fn, repeats: int) -> float:
    fn().block_until_ready()  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn().block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16 * 2**20, help="elements per draw")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    key_data = prng.tensor_key_data(0, "bench.weight", 0)
    key = jax.random.wrap_key_data(key_data)
    p = jnp.float32(0.9)
    hi, lo = prng.split_offset(0)

    jax_bernoulli = jax.jit(lambda k, p: jax.random.bernoulli(k, p, (args.n,)))
    t_jax = _median_seconds(lambda: jax_bernoulli(key, p), args.repeats)
    t_ours = _median_seconds(
        lambda: prng.bernoulli_mask(key_data, hi, lo, args.n, p), args.repeats
    )
    same = np.array_equal(jax_bernoulli(key, p), prng.bernoulli_mask(key_data, hi, lo, args.n, p))

    print(f"backend: {jax.default_backend()}  devices: {jax.devices()}")
    print(f"n = {args.n}  repeats = {args.repeats}  bit-identical: {same}")
    print(f"jax.random.bernoulli : {t_jax * 1e3:9.2f} ms (median)")
    print(f"prng.bernoulli_mask  : {t_ours * 1e3:9.2f} ms (median)")
    print(f"speedup (jax / ours) : {t_jax / t_ours:9.2f}x")


if __name__ == "__main__":
    main()
