"""The options of one merge, typed and frozen (:class:`MergeOptions`).

Each field says whether it changes the output bytes. The manifest records the
ones that do (:meth:`MergeOptions.recorded`), a rerun after a crash resumes
only when they are equal, and ``verify`` replays them. The others change
speed, memory or what is hashed, never a byte of the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError

__all__ = ["MergeOptions"]


def _opt(default: Any, help: str, *, bytes_: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "bytes": bytes_})


@dataclass(frozen=True)
class MergeOptions:
    """How to run a merge (the config says what to merge)."""

    seed: int = _opt(0, "seed of the random masks (DARE, DELLA); same seed, same bytes", bytes_=True)
    shard_size: int = _opt(5_000_000_000, "max bytes per output shard", bytes_=True)
    out_dtype: str | None = _opt(None, "dtype code of the output tensors, overriding the config's", bytes_=True)
    force: bool = _opt(False, "replace the merge in a non-empty output folder (only files it wrote)")
    chunk_elems: int | None = _opt(None, "elements per chunk (default 1M on the CPU, 4M on accelerators)")
    pass_cache_bytes: int | None = _opt(None, "bytes a multi-pass method may keep between passes")
    fsync: bool = _opt(True, "fsync the output before it appears")
    digests: bool = _opt(True, "sha256 of inputs, output tensors and small files in the manifest")
    file_digests: bool = _opt(False, "also the sha256 of each weight shard file")
    hash_inputs: bool = _opt(True, "sha256 of the input files (cached)")
    io_threads: int | None = _opt(None, "threads that read input chunks, and threads that hash and write output "
                                        "chunks (default: the host's cores, at most 8)")

    def __post_init__(self) -> None:
        if type(self.seed) is not int or self.seed < 0:
            raise ConfigError(f"seed: must be a non-negative integer, got {self.seed!r}")
        if type(self.shard_size) is not int or self.shard_size <= 0:
            raise ConfigError(f"shard size: must be a positive number of bytes, got {self.shard_size!r}")
        if self.chunk_elems is not None and (type(self.chunk_elems) is not int or self.chunk_elems <= 0):
            raise ConfigError(f"chunk elements: must be a positive integer, got {self.chunk_elems!r}")
        if self.io_threads is not None and (type(self.io_threads) is not int or not 1 <= self.io_threads <= 256):
            raise ConfigError(f"io threads: must be an integer in [1, 256], got {self.io_threads!r}")
        if self.pass_cache_bytes is not None and self.pass_cache_bytes < 0:
            raise ConfigError(f"pass cache budget must be >= 0 bytes, got {self.pass_cache_bytes} (--pass-cache-mb)")

    def recorded(self) -> dict[str, Any]:
        """The fields that change the output bytes, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["bytes"]}
