"""The persistent XLA compilation cache used by the command line (and benchmarks).

Kernels are compiled once per (method, inputs, dtype, chunk shape); with the
cache a later merge loads them from disk instead (docs/performance.md).
"""

from __future__ import annotations

import jax

from .manifest import cache_dir


def enable_persistent_cache() -> str | None:
    """Point JAX's compilation cache at ``$SUPERSWALLOW_CACHE/xla`` (default ~/.cache/superswallow_jax/xla).

    ``SUPERSWALLOW_CACHE=off`` disables it. Returns the folder, or None when
    off or when JAX refuses the setting (an unusable cache only costs compile time).
    """
    d = cache_dir()
    if d is None:
        return None
    where = str(d / "xla")
    try:
        jax.config.update("jax_compilation_cache_dir", where)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    except Exception:
        return None
    return where
