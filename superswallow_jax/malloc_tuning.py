"""Keep freed chunk-sized host memory in the allocator instead of giving it back.

Why: every chunk allocates fresh buffers (XLA:CPU results, DARE masks,
vocabulary-aligned rows), a few MB each. glibc serves blocks above its mmap
threshold with ``mmap`` and returns them with ``munmap`` on ``free``, and it
trims the top of its heaps past 128 KB, so the next chunk's buffer is new
memory again and each of its 4 KiB pages costs a page fault (zeroing
included). With the mmap threshold at its maximum (32 MiB) and trimming
only past 512 MiB, freed buffers are reused instead (the faults, times and
memory before and after are in docs/performance.md).

XLA's worker threads allocate the results that the main thread frees, and
glibc gives each thread an arena of its own, made of 64 MiB heaps that it
shrinks with ``MADV_DONTNEED`` whatever the trim threshold says. With two
chunks of a statistics pass in flight (the geometric methods), some runs
took a hundred times the page faults. One arena for all threads
(``M_ARENA_MAX`` = 1) keeps them low; the few large allocations per chunk do
not contend for its lock.

The settings are process-wide, so the library never applies them on its own:
the command line calls :func:`tune_malloc` at start-up (the benchmarks do the
same), before any large allocation. ``SUPERSWALLOW_MALLOC=off`` keeps glibc's
defaults. Elsewhere than glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import os

#: mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
#: glibc caps the mmap threshold at 32 MiB on 64-bit (HEAP_MAX_SIZE / 2).
MMAP_THRESHOLD = 32 << 20
#: Free memory at the top of a heap is returned to the system past this.
TRIM_THRESHOLD = 512 << 20
#: One malloc arena for every thread: see the module docstring.
ARENA_MAX = 1


def _glibc():
    """glibc's C library handle, or None elsewhere.

    The process's own symbols (``CDLL(None)``) include the C library it runs
    on; ``ctypes.util.find_library`` would start ``ldconfig`` at every start-up.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it
        libc.mallopt
    except (OSError, AttributeError):
        return None
    return libc


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds and use one arena for this process. Returns whether they were set.

    Idempotent. Returns False (and changes nothing) with
    ``SUPERSWALLOW_MALLOC=off``, outside glibc, or when glibc refuses a value.
    """
    if os.environ.get("SUPERSWALLOW_MALLOC", "").lower() in ("off", "0", "no", "false"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    return all(libc.mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_ARENA_MAX, ARENA_MAX),
    ))
