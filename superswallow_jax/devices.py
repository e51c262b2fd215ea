"""Devices: a mesh over all local devices, per-device placement of chunks, multi-process set-up.

Placement. Every input chunk is a flat array of ``bucket`` elements (a
multiple of 1024). When it is big enough it is sharded over a 1-D mesh of all
local devices along that axis, and each device's shard is read straight from
the memory-mapped file by ``jax.make_array_from_callback`` (the callback gets
a zero-copy view slice, so there is no full-chunk host copy per device).
Chunks smaller than ``MIN_SHARD_ELEMS`` per device (norms, biases) go to one
device: they are read once, not once per device. jit follows the inputs'
sharding, and the kernels are elementwise (the PRNG is the partitionable
threefry), so the bytes do not depend on the device count.

Device memory per step is bounded by the chunk: ``k`` input chunks, one
output chunk, the previous chunk's output still in flight and XLA's fused
temporaries -- a small multiple of ``--chunk-elems`` whatever the model size.

Multi-process. :func:`init_distributed` starts JAX's multi-process runtime
(``jax.distributed.initialize``). Processes never run collectives: the
output shards are divided among them (:func:`superswallow_jax.layout.assign_shards_to_processes`),
each merges and writes its own, and they exchange small JSON messages
(digests) through the runtime's key-value store.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

#: Smallest per-device shard by default; smaller chunks stay on one device.
MIN_SHARD_ELEMS = 1 << 16


def min_shard_elems() -> int:
    """:data:`MIN_SHARD_ELEMS`, or ``$SUPERSWALLOW_MIN_SHARD_ELEMS`` (the tests lower it)."""
    return int(os.environ.get("SUPERSWALLOW_MIN_SHARD_ELEMS", MIN_SHARD_ELEMS))
AXIS = "x"


@dataclass(frozen=True)
class Placement:
    """Where chunks go: a 1-D mesh over the local devices."""

    devices: tuple
    mesh: Mesh | None

    @classmethod
    def local(cls) -> "Placement":
        devs = tuple(jax.local_devices())
        mesh = Mesh(np.array(devs), (AXIS,)) if len(devs) > 1 else None
        return cls(devs, mesh)

    def sharding_for(self, n: int):
        """Sharding of a flat array of ``n`` elements."""
        if self.mesh is not None and n % len(self.devices) == 0 and n // len(self.devices) >= min_shard_elems():
            return NamedSharding(self.mesh, PartitionSpec(AXIS))
        return SingleDeviceSharding(self.devices[0])

    def put(self, x: np.ndarray | jax.Array) -> jax.Array:
        """Place flat host array ``x``; each device reads only its own slice (a device array is resharded)."""
        sharding = self.sharding_for(x.size)
        if isinstance(sharding, SingleDeviceSharding) or isinstance(x, jax.Array):
            return jax.device_put(x, sharding)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


# ------------------------------------------------------------------ multi-process


@dataclass(frozen=True)
class ProcessInfo:
    index: int
    count: int

    @property
    def is_main(self) -> bool:
        return self.index == 0


def init_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None, auto: bool) -> ProcessInfo:
    """Initialize ``jax.distributed`` from explicit arguments or (``auto``) the environment.

    With neither, returns a single-process ``ProcessInfo(0, 1)`` without
    starting anything.
    """
    if coordinator is None and not auto:
        return ProcessInfo(0, 1)
    if coordinator is not None:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    return ProcessInfo(jax.process_index(), jax.process_count())


def distributed_active() -> bool:
    """Whether this process has started JAX's multi-process runtime."""
    return jax.distributed.is_initialized()


def _client():
    # The coordination service's key-value store and barriers (used to exchange small JSON
    # values without a device collective, which multi-process CPU runs lack) have no public
    # API in jax 0.10; this is the only private access in the library.
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized")
    return client


def kv_publish(key: str, value: object) -> None:
    _client().key_value_set(key, json.dumps(value))


def kv_gather(key: str, count: int, timeout_s: int = 24 * 3600) -> list[object]:
    """Values published under ``key/<process>`` by every process, in process order."""
    client = _client()
    return [json.loads(client.blocking_key_value_get(f"{key}/{i}", timeout_s * 1000)) for i in range(count)]


def barrier(name: str, timeout_s: int = 24 * 3600) -> None:
    _client().wait_at_barrier(name, timeout_s * 1000)
