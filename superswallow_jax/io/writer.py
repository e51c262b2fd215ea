"""Streaming safetensors writer.

The layout of every output shard is computed up front from ``(name, dtype,
shape)``; tensor bytes are then written at their offsets with ``pwrite`` in
any order, chunk by chunk, as they are produced, into the staging folder
(:mod:`.commit` makes the finished folder appear). A rerun of an interrupted
merge reopens the staging shards whose header is the planned one
(``reuse=True``) and rewrites only the tensors not already there.

The header is padded with spaces so that the data region starts at a 64-byte
boundary (``jax.device_put`` on CPU shares 64-byte-aligned host memory).
Tensors follow each other without gaps, as the format requires.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import OutputError
from ..dtypes import CODES, NP as DTYPES
from .reader import INDEX_NAME, SINGLE_NAME

ALIGN = 64
#: With fsync on, writeback of a shard is started every this many bytes
#: (``sync_file_range``, asynchronous), so the final fsync waits for little.
WRITEBACK_EVERY = 64 << 20


@functools.cache
def start_writeback():
    """``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)`` as a function of
    ``(fd, offset, nbytes)`` (Linux; else ``None``), looked up on first use."""
    if not os.uname().sysname == "Linux":  # pragma: no cover
        return None
    try:
        # the process's own symbols include its C library; find_library would start ldconfig at import
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):  # pragma: no cover
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    write = 2  # SYNC_FILE_RANGE_WRITE: start writeback of dirty pages, do not wait
    return lambda fd, off, n: fn(fd, off, n, write)


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor: name, safetensors dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class ShardLayout:
    """One output file: its name, header bytes and each tensor's absolute offset."""

    filename: str
    header: bytes  # including the 8-byte length prefix and padding
    offsets: Mapping[str, int]  # tensor name -> absolute file offset
    size: int


def encode_header(specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> tuple[bytes, dict[str, int]]:
    """Header bytes (length prefix + JSON + space padding) and absolute offsets."""
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = dict(metadata)
    pos = 0
    rel: dict[str, int] = {}
    for s in specs:
        obj[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        rel[s.name] = pos
        pos += s.nbytes
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    total = 8 + len(body)
    body += b" " * ((-total) % ALIGN)
    head = len(body).to_bytes(8, "little") + body
    return head, {k: len(head) + v for k, v in rel.items()}


def parse_size(text: str | int) -> int:
    """Parse a shard size: an int, or a decimal number with K/M/B/G suffix (10^3, 10^6, 10^9)."""
    if isinstance(text, int):
        value = text
    else:
        t = str(text).strip().upper()
        mult = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}.get(t[-1:], 1)
        num = t[:-1] if mult != 1 else t
        try:
            value = int(float(num) * mult)
        except (ValueError, OverflowError):  # OverflowError: "inf", "1e400"
            raise OutputError(f"--shard-size: cannot parse {text!r} (use e.g. 5B, 500M, 1000000)") from None
    if value <= 0:
        raise OutputError(f"--shard-size: must be positive, got {text!r}")
    return value


def assign_shards(specs: Sequence[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
    """Split tensors in order into shards of at most ``shard_size`` bytes.

    A shard is closed when adding the next tensor would exceed the limit and it
    is non-empty; an oversized tensor gets a shard of its own (mergekit's rule).
    """
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for s in specs:
        if shards[-1] and used + s.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(s)
        used += s.nbytes
    return shards


def plan_layout(
    shards: Sequence[Sequence[TensorSpec]], metadata: Mapping[str, str]
) -> list[ShardLayout]:
    """Compute every output file's name, header and tensor offsets."""
    n = len(shards)
    out = []
    for i, specs in enumerate(shards):
        name = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        head, offsets = encode_header(specs, metadata)
        size = len(head) + sum(s.nbytes for s in specs)
        out.append(ShardLayout(name, head, offsets, size))
    return out


class ShardedWriter:
    """Writes a planned set of shards into ``staging``.

    Usage: ``w = ShardedWriter(...)``; ``w.write(name, flat_offset, array)`` any
    number of times (chunks of the flattened tensor, any order), or
    ``w.mark_done(name)`` for a tensor a reused shard already holds;
    ``w.finish()`` (checks, fsync, close) and ``w.file_sha256()`` when done;
    ``w.abort()`` on error.
    """

    def __init__(self, staging: Path, layouts: Sequence[ShardLayout], specs: Sequence[TensorSpec],
                 hash_files: bool = True, writeback: bool = False, reuse: bool = False):
        self.staging = Path(staging)
        self.layouts = list(layouts)
        self._spec = {s.name: s for s in specs}
        self._where: dict[str, tuple[int, int]] = {}
        self._fds: list[int] = []
        self._written = [0] * len(self.layouts)
        self._lock = threading.Lock()
        self._ranges: dict[str, list[tuple[int, int]]] = {}  # element ranges written per tensor
        # sha256 of each file, fed while writes arrive in file order (else recomputed at the end)
        self._sha = [hashlib.sha256(lay.header) for lay in self.layouts]
        self._sha_pos: list[int | None] = [len(lay.header) if hash_files else None for lay in self.layouts]
        # early writeback (when the output will be fsynced): bytes written since the last kick
        self._writeback = writeback and start_writeback() is not None
        self._dirty = [0] * len(self.layouts)
        #: shards reopened from an earlier run (their tensors may be kept with mark_done)
        self.reused: set[str] = set()
        for i, lay in enumerate(self.layouts):
            for name, off in lay.offsets.items():
                self._where[name] = (i, off)
        try:
            for i, lay in enumerate(self.layouts):
                self._open(i, lay, reuse)
        except BaseException:
            self.close_files()  # no descriptor leaks when a later shard fails
            raise

    def _reopen(self, path: Path, lay: ShardLayout) -> int | None:
        """A descriptor on an earlier run's shard of exactly this layout, or None."""
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return None
        if os.fstat(fd).st_size == lay.size and os.pread(fd, len(lay.header), 0) == lay.header:
            return fd
        os.close(fd)
        return None

    def _open(self, i: int, lay: ShardLayout, reuse: bool) -> None:
        path = self.staging / lay.filename
        fd = self._reopen(path, lay) if reuse else None
        if fd is not None:
            self._fds.append(fd)
            self.reused.add(lay.filename)
            self._sha_pos[i] = None  # its bytes arrive partly from the earlier run: hashed at the end
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._fds.append(fd)
        try:
            if hasattr(os, "posix_fallocate") and lay.size > 0:
                os.posix_fallocate(fd, 0, lay.size)
            else:  # pragma: no cover - non-Linux
                os.ftruncate(fd, lay.size)
        except OSError as e:
            raise OutputError(f"{path}: cannot allocate {lay.size:,} bytes ({e.strerror})") from None
        os.pwrite(fd, lay.header, 0)

    def mark_done(self, name: str) -> None:
        """Count tensor ``name`` as written: a reused shard already holds its bytes."""
        shard, _ = self._where[name]
        if self.layouts[shard].filename not in self.reused:
            raise ValueError(f"{name}: its shard {self.layouts[shard].filename} was not reused")
        numel = math.prod(self._spec[name].shape)
        self._ranges[name] = [(0, numel)]
        self._written[shard] += self._spec[name].nbytes

    def write(self, name: str, flat_offset: int, data: np.ndarray) -> None:
        """Write ``data`` (C-contiguous, the tensor's dtype) at element ``flat_offset`` of ``name``."""
        spec = self._spec[name]
        dt = DTYPES[spec.dtype]
        if data.dtype != dt:
            raise TypeError(f"{name}: got {data.dtype}, planned {dt}")
        shard, base = self._where[name]
        end = flat_offset + data.size
        if flat_offset < 0 or end > math.prod(spec.shape):
            raise ValueError(f"{name}: write [{flat_offset}, {end}) outside the tensor")
        buf = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        pos = base + flat_offset * dt.itemsize
        with self._lock:  # writer lanes write different tensors at once (pwrite needs no lock)
            if self._sha_pos[shard] is None:
                pass
            elif self._sha_pos[shard] == pos:
                self._sha[shard].update(buf)
                self._sha_pos[shard] = pos + len(buf)
            elif len(buf):
                self._sha_pos[shard] = None  # out of order: hash the file at the end
        while len(buf):
            try:
                n = os.pwrite(self._fds[shard], buf, pos)
            except OSError as e:
                raise OutputError(f"{self.staging / self.layouts[shard].filename}: cannot write: {e.strerror or e}") from None
            buf = buf[n:]
            pos += n
        with self._lock:
            self._written[shard] += data.nbytes
            kick = False
            if self._writeback:
                self._dirty[shard] += data.nbytes
                if self._dirty[shard] >= WRITEBACK_EVERY:
                    self._dirty[shard], kick = 0, True
            if data.size:
                self._ranges.setdefault(name, []).append((flat_offset, end))
        if kick:
            start_writeback()(self._fds[shard], 0, 0)  # whole file: only dirty pages are queued

    def file_sha256(self) -> dict[str, str]:
        """sha256 of each shard file (call after :meth:`finish`). Computed while
        writing when chunks arrived in file order, otherwise by reading the file."""
        out = {}
        for i, lay in enumerate(self.layouts):
            if self._sha_pos[i] == lay.size:
                out[lay.filename] = self._sha[i].hexdigest()
            else:
                h = hashlib.sha256()
                with open(self.staging / lay.filename, "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        h.update(block)
                out[lay.filename] = h.hexdigest()
        return out

    def bytes_written(self) -> int:
        return sum(self._written)

    def close_files(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def finish(self, fsync: bool = True) -> None:
        """Check every byte was written, fsync and close the shards (idempotent)."""
        if not self._fds:
            return
        for lay, fd in zip(self.layouts, self._fds):
            for name in lay.offsets:  # the chunks written must tile each tensor exactly
                pos = 0
                for a, b in sorted(self._ranges.get(name, ())):
                    if a != pos:  # gap or overlap
                        pos = -1
                        break
                    pos = b
                numel = math.prod(self._spec[name].shape)
                if pos != numel:
                    raise RuntimeError(
                        f"{lay.filename}: tensor {name!r}: its {numel} elements were not written exactly once"
                    )
            if fsync:
                try:
                    os.fsync(fd)
                except OSError as e:
                    raise OutputError(f"{self.staging / lay.filename}: cannot write: {e.strerror or e}") from None
        self.close_files()

    def abort(self) -> None:
        self.close_files()


def index_json(layouts: Sequence[ShardLayout], specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    """``model.safetensors.index.json`` (total_size + weight_map, sorted by tensor name)."""
    weight_map = {}
    for lay in layouts:
        for name in lay.offsets:
            weight_map[name] = lay.filename
    total = sum(s.nbytes for s in specs)
    obj = {"metadata": {"total_size": total, **metadata}, "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


def write_index(path: Path, layouts: Sequence[ShardLayout], specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> None:
    """Write :func:`index_json` to ``path``."""
    Path(path).write_bytes(index_json(layouts, specs, metadata))


def np_code(dtype: np.dtype) -> str:
    """safetensors dtype code of a numpy dtype."""
    return CODES[np.dtype(dtype)]


__all__ = [
    "TensorSpec",
    "ShardLayout",
    "ShardedWriter",
    "assign_shards",
    "encode_header",
    "parse_size",
    "plan_layout",
    "index_json",
    "write_index",
    "np_code",
    "INDEX_NAME",
]
