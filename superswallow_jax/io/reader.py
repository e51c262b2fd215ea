"""Safetensors reading: strict header validation and zero-copy memmap views.

The file format (https://github.com/huggingface/safetensors):

    [8 bytes: little-endian u64 N][N bytes: UTF-8 JSON header][data region]

The header maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the data region) plus an optional ``"__metadata__"`` map of
strings. We accept a file only if:

* ``N`` fits in the file and is below :data:`MAX_HEADER_BYTES`;
* the JSON is an object, keys are strings, entries have exactly the expected fields;
* every dtype is known, every dimension a non-negative int, and
  ``prod(shape) * itemsize == end - begin`` computed with Python ints (no overflow);
* the byte ranges, sorted by ``begin``, tile ``[0, data_len)`` exactly: no gaps,
  no overlaps (the spec forbids holes);
* ``8 + N + data_len == file size``.

Reading goes through :class:`~.tensor_file.TensorFile` (``pread`` into
pooled buffers, or zero-copy ``np.memmap`` views typed with
``ml_dtypes.bfloat16`` for BF16). Model folders, sharded or not and in either
weight format, are opened by :class:`~.checkpoint.Checkpoint`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..dtypes import CODES, NP as DTYPES
from ..errors import short
from .tensor_file import TensorFile, TensorInfo, fail as _fail

__all__ = ["CODES", "DTYPES", "Header", "INDEX_NAME", "MAX_HEADER_BYTES", "SINGLE_NAME", "SafetensorsFile", "TensorInfo",
           "parse_header", "read_header"]

MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class Header:
    """A validated safetensors header."""

    path: Path
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str]
    data_start: int
    file_size: int


def read_header(path: Path) -> Header:
    """Read and validate the header of ``path``. Raises SafetensorsError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise _fail(path, f"truncated: {size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(f.read(8), "little")
            if n > MAX_HEADER_BYTES:
                raise _fail(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + n > size:
                raise _fail(path, f"header length {n} runs past the end of the file ({size} bytes)")
            raw = f.read(n)
    except FileNotFoundError:
        raise _fail(path, "file not found") from None
    except IsADirectoryError:
        raise _fail(path, "is a directory, expected a .safetensors file") from None
    except PermissionError:
        raise _fail(path, "permission denied") from None
    return parse_header(path, raw, size)


def parse_header(path: Path, raw: bytes, file_size: int) -> Header:
    """Validate a raw JSON header (without the 8-byte length prefix)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, >4300-digit ints, deep nesting
        raise _fail(path, f"header is not valid UTF-8 JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise _fail(path, "header is not a JSON object")
    data_start = 8 + len(raw)
    data_len = file_size - data_start
    metadata = obj.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "__metadata__ must map strings to strings")
    entries: list[tuple[int, int, str]] = []
    tensors: dict[str, TensorInfo] = {}
    for name, spec in obj.items():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise _fail(path, f"tensor name {short(name)} is not valid UTF-8 (a lone surrogate)") from None
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise _fail(path, f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        code = spec["dtype"]
        if not isinstance(code, str) or code not in DTYPES:
            raise _fail(path, f"tensor {name!r}: unknown dtype {code!r}")
        shape = spec["shape"]
        if not isinstance(shape, list) or not all(
            type(d) is int and d >= 0 for d in shape
        ):
            raise _fail(path, f"tensor {name!r}: shape must be a list of non-negative ints")
        offs = spec["data_offsets"]
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int and o >= 0 for o in offs)
        ):
            raise _fail(path, f"tensor {name!r}: data_offsets must be two non-negative ints")
        begin, end = offs
        if end < begin:
            raise _fail(path, f"tensor {name!r}: data_offsets end {end} < begin {begin}")
        expected = math.prod(shape) * DTYPES[code].itemsize  # Python ints: no overflow
        if end - begin != expected:
            raise _fail(
                path,
                f"tensor {name!r}: {code}{tuple(shape)} needs {expected} bytes, offsets span {end - begin}",
            )
        entries.append((begin, end, name))
        tensors[name] = TensorInfo(name, code, tuple(shape), path, data_start + begin, data_start + end)
    entries.sort()
    pos = 0
    for begin, end, name in entries:
        if begin < pos:
            raise _fail(path, f"tensor {name!r}: data_offsets [{begin}, {end}) overlap the previous tensor")
        if begin > pos:
            raise _fail(path, f"tensor {name!r}: gap in the data region before offset {begin}")
        pos = end
    if pos != data_len:
        if pos > data_len:
            raise _fail(path, f"truncated: tensors need {pos} data bytes, file has {data_len}")
        raise _fail(path, f"{data_len - pos} trailing bytes after the last tensor")
    return Header(path, tensors, dict(metadata), data_start, file_size)


class SafetensorsFile(TensorFile):
    """One validated safetensors file (its :class:`Header`), read through
    :class:`~.tensor_file.TensorFile`."""

    def __init__(self, path: Path, header: Header | None = None):
        self.header = header or read_header(path)
        super().__init__(self.header.path, self.header.tensors, self.header.file_size)


INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
