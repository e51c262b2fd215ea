"""Where every output tensor goes, decided before any tensor is read.

The planner groups the output tensors into shards
(:func:`~superswallow_jax.io.writer.assign_shards`, at most ``shard_size``
bytes each, in plan order). This module turns that grouping into the
output's layout: each shard's file name, its safetensors header (with the
``__metadata__`` below), each tensor's absolute byte offset in its file, the
file size, and the process that writes it (shards are divided among the
processes by bytes, largest first: :func:`assign_shards_to_processes`).

The header's metadata is a bounded summary that is known before the first
byte is written: the method, seed, PRNG scheme and the normalized config's
digest (the config itself goes into ``mergekit_config.yml`` and the manifest).
The seed is in it, so the offsets depend on the seed's digits: the layout
is made for one seed and one process count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from . import __version__
from .io.writer import ShardLayout, TensorSpec, plan_layout

__all__ = ["OutputLayout", "TensorPlace", "assign_shards_to_processes", "layout_output", "output_metadata"]


@dataclass(frozen=True)
class TensorPlace:
    """One output tensor's place: file name, absolute byte range ``[begin, end)`` and owner process."""

    file: str
    begin: int
    end: int
    owner: int


@dataclass(frozen=True)
class OutputLayout:
    """Every output file's layout (:class:`ShardLayout`), its owner process, and the seed and process
    count it was made for."""

    files: tuple[ShardLayout, ...]
    owners: tuple[int, ...]  # process index per file
    specs: tuple[TensorSpec, ...]  # every output tensor, in plan order
    seed: int
    processes: int

    def mine(self, process: int) -> list[ShardLayout]:
        """The files process ``process`` writes."""
        return [lay for lay, o in zip(self.files, self.owners) if o == process]

    def place(self, name: str) -> TensorPlace:
        """Where output tensor ``name`` is written (KeyError if it is not an output tensor)."""
        for lay, owner in zip(self.files, self.owners):
            if name in lay.offsets:
                begin = lay.offsets[name]
                spec = next(s for s in self.specs if s.name == name)
                return TensorPlace(lay.filename, begin, begin + spec.nbytes, owner)
        raise KeyError(name)

    def places(self) -> dict[str, TensorPlace]:
        """:meth:`place` of every tensor, by name."""
        nbytes = {s.name: s.nbytes for s in self.specs}
        return {n: TensorPlace(lay.filename, b, b + nbytes[n], o)
                for lay, o in zip(self.files, self.owners) for n, b in lay.offsets.items()}


def assign_shards_to_processes(shard_bytes: Sequence[int], count: int) -> list[int]:
    """Owner process of each output shard, balanced by bytes (deterministic).

    Largest shard first, each to the least-loaded process (ties: lowest index).
    """
    load = [0] * count
    owner = [0] * len(shard_bytes)
    for i in sorted(range(len(shard_bytes)), key=lambda i: (-shard_bytes[i], i)):
        p = min(range(count), key=lambda q: (load[q], q))
        owner[i] = p
        load[p] += shard_bytes[i]
    return owner


def output_metadata(method: str, config_sha256: str, seed: int) -> dict[str, str]:
    """safetensors ``__metadata__`` of every output shard (see the module docstring)."""
    from . import prng  # imports jax: only once a layout is made

    return {
        "format": "pt",
        "superswallow_jax": __version__,
        "prng_scheme": prng.PRNG_SCHEME,
        "seed": str(seed),
        "merge_method": method,
        "config_sha256": config_sha256,
    }


def layout_output(specs: Sequence[TensorSpec], shards: Sequence[Sequence[str]], metadata: dict[str, str],
                  seed: int, processes: int) -> OutputLayout:
    """The layout of ``shards`` (tensor names per file, each a name of ``specs``) for ``processes`` processes."""
    by_name = {s.name: s for s in specs}
    files = tuple(plan_layout([[by_name[n] for n in shard] for shard in shards], metadata))
    owners = tuple(assign_shards_to_processes([lay.size for lay in files], processes))
    return OutputLayout(files, owners, tuple(specs), seed, processes)
