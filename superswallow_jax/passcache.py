"""Per-step memo of chunk arrays between a step's passes, under a byte budget.

Methods with whole-tensor statistics (DARE and DELLA rescale, TIES and
breadcrumbs thresholds, SCE, RAM, the geometric methods) pass over a tensor's
chunks more than once: statistics first, then the merge. Without a memo
every pass reads each chunk again (``pread``, or the disk when the inputs are
not in the page cache) and DARE draws each mask again (threefry, the costliest
part of a DARE kernel on the CPU).

A :class:`PassCache` keeps what a pass computed -- the placed input arrays,
DARE and DELLA masks, SCE variances, TIES/breadcrumbs magnitude keys -- for
the later passes, as long as the total stays within the budget; what does
not fit is computed again, as before. Keys are tuples whose first item names
the kind of value, so one kind can be capped (``share``) or dropped
(:meth:`PassCache.discard`). The kept values are the very arrays a pass would
compute again, so the output bytes do not depend on the budget (tests
compare budgets 0, partial and unlimited).

The budget bounds memory: on the CPU backend the kept arrays are host
memory (RSS), on an accelerator device memory. One cache lives for one step;
the merge pass takes (removes) each entry as it uses it.
"""

from __future__ import annotations

import threading
from typing import Callable, Hashable, TypeVar

import jax

T = TypeVar("T")

#: CPU backend: kept arrays are process memory. The 1.3 GB bench pair's MLP
#: tensors (11.5M elements: two bf16 inputs and a mask in 12 chunks of 1M,
#: 60 MiB) fit; a 70B model's (235M elements) do not (the time and memory
#: this buys are in docs/performance.md).
CPU_PASS_CACHE_BYTES = 64 << 20
#: Accelerators: device memory, at most this much (a 70B MLP tensor's two
#: bf16 inputs and mask: 1.2 GB) and at most an eighth of what the devices have.
ACCEL_PASS_CACHE_BYTES = 4 << 30
#: When a backend does not report its memory.
ACCEL_FALLBACK_BYTES = 1 << 30


def default_pass_cache_bytes() -> int:
    """The budget for JAX's default backend (see the constants above)."""
    if jax.default_backend() == "cpu":
        return CPU_PASS_CACHE_BYTES
    try:
        limit = sum(int((d.memory_stats() or {}).get("bytes_limit", 0)) for d in jax.local_devices())
    except Exception:  # a backend without memory_stats
        limit = 0
    return min(ACCEL_PASS_CACHE_BYTES, limit // 8) if limit else ACCEL_FALLBACK_BYTES


def _nbytes(value) -> int:
    """Bytes held by ``value``: an array, or a list/tuple of arrays and ``None``s."""
    if value is None:
        return 0
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return int(value.nbytes)


class PassCache:
    """Memo of one step's per-chunk values, at most ``budget`` bytes in all.

    Thread-safe (the writer thread never touches it, but cheap to be sure).
    """

    def __init__(self, budget: int = 0):
        self.budget = max(0, int(budget))
        self.used = 0
        self.hits = 0
        self._store: dict[Hashable, tuple[object, int]] = {}
        self._by_kind: dict[Hashable, int] = {}  # bytes kept per key[0]
        self._lock = threading.Lock()

    def has(self, key: tuple) -> bool:
        with self._lock:
            return key in self._store

    def get(self, key: tuple, make: Callable[[], T], share: float = 1.0) -> T:
        """The kept value for ``key``, else ``make()`` -- kept if it fits the budget.

        ``key[0]`` names the kind of value; all values of that kind together
        may use at most ``share`` of the budget (so cheap-to-redo values leave
        room for costly ones).
        """
        with self._lock:
            if key in self._store:
                self.hits += 1
                return self._store[key][0]  # type: ignore[return-value]
        value = make()
        size = _nbytes(value)
        with self._lock:
            kind_used = self._by_kind.get(key[0], 0)
            if key not in self._store and self.used + size <= self.budget and kind_used + size <= share * self.budget:
                self._store[key] = (value, size)
                self.used += size
                self._by_kind[key[0]] = kind_used + size
        return value

    def discard(self, kind: Hashable) -> None:
        """Forget every kept value whose key starts with ``kind`` (values no later pass uses)."""
        with self._lock:
            for key in [k for k in self._store if k[0] == kind]:
                self.used -= self._store.pop(key)[1]
            self._by_kind.pop(kind, None)

    def take(self, key: tuple, make: Callable[[], T]) -> T:
        """The kept value for ``key`` (removed from the cache), else ``make()`` (not kept).

        For a step's last use of a value: its memory goes as soon as the caller drops it.
        """
        with self._lock:
            hit = self._store.pop(key, None)
            if hit is not None:
                self.hits += 1
                self.used -= hit[1]
                self._by_kind[key[0]] -= hit[1]
                return hit[0]  # type: ignore[return-value]
        return make()
