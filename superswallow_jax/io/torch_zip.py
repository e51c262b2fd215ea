"""PyTorch ``torch.save`` checkpoints (``pytorch_model*.bin``), read without torch and without running code.

The format (torch >= 1.6, ``torch/serialization.py`` and
``caffe2/serialize/inline_container.cc``) is a ZIP archive whose members lie
under one top-level folder ``<archive>/``:

* ``<archive>/data.pkl``: the pickled object, here a state dict ``{name: tensor}``;
* ``<archive>/data/<key>``: the raw little-endian bytes of storage ``<key>``,
  stored uncompressed (torch aligns them to 64 bytes);
* ``<archive>/byteorder``: ``little`` or ``big`` (torch >= 2.1; absent means little);
* other records (``version``, ``.data/serialization_id``, ...) are ignored.

In the pickle each tensor is a call
``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
requires_grad, backward_hooks[, metadata])`` (``_rebuild_tensor_v3`` adds a
dtype for an untyped storage; ``_rebuild_parameter`` wraps a tensor), where
``storage`` is the persistent id ``("storage", torch.<T>Storage, key,
location, numel)`` and ``backward_hooks`` an empty ``collections.OrderedDict``.

**Safety.** The unpickler resolves only the globals in :data:`ALLOWED_GLOBALS`,
each to a stand-in of this module that records its arguments; nothing is
imported and no code from the file runs. Any other global is refused in one
line naming it. The pickle is at most :data:`MAX_PICKLE_BYTES`, the central
directory at most :data:`MAX_DIRECTORY_BYTES` (checked before ``zipfile``
reads it).

**Validation** (Python ints, no overflow): every storage a tensor uses is a
stored (uncompressed, unencrypted) member whose bytes lie inside the file and
whose size is ``numel * itemsize`` of the storage; the tensor is C-contiguous
(dimensions of size 1 may have any stride) and ``[offset, offset + numel)``
lies inside its storage. A tensor is then a :class:`~.tensor_file.TensorInfo`
at ``member data start + offset * itemsize``: reads are zero-copy like
safetensors'. Tensors may share a storage (tied weights). Non-contiguous
tensors, compressed members, big-endian files and the legacy pre-1.6 format
are refused with one line naming the file (and the tensor).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .tensor_file import TensorFile, TensorInfo, fail

__all__ = ["ALLOWED_GLOBALS", "TorchFile", "read_torch_tensors"]

MAX_PICKLE_BYTES = 256 << 20
MAX_DIRECTORY_BYTES = 64 << 20

#: torch storage class -> dtype code (``torch.storage.UntypedStorage`` counts bytes).
_STORAGE_CODES = {
    "BFloat16Storage": "BF16", "HalfStorage": "F16", "FloatStorage": "F32", "DoubleStorage": "F64",
    "CharStorage": "I8", "ByteStorage": "U8", "ShortStorage": "I16", "IntStorage": "I32",
    "LongStorage": "I64", "BoolStorage": "BOOL",
}
#: torch dtype attribute -> dtype code (for ``_rebuild_tensor_v3``).
_DTYPE_CODES = {
    "bfloat16": "BF16", "float16": "F16", "half": "F16", "float32": "F32", "float": "F32",
    "float64": "F64", "double": "F64", "int8": "I8", "uint8": "U8", "int16": "I16", "short": "I16",
    "int32": "I32", "int": "I32", "int64": "I64", "long": "I64", "bool": "BOOL",
    "uint16": "U16", "uint32": "U32", "uint64": "U64",
}
_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "U16": 2,
             "I32": 4, "U32": 4, "I64": 8, "U64": 8, "BOOL": 1}


class _Refused(pickle.UnpicklingError):
    """The pickle asked for something outside the allow-list (the message says what)."""


@dataclass(frozen=True, slots=True)
class _StorageType:
    code: str | None  # None: UntypedStorage (sizes in bytes)


@dataclass(frozen=True, slots=True)
class _DType:
    code: str


@dataclass(frozen=True, slots=True)
class _Storage:
    key: str
    code: str | None
    numel: int


@dataclass(frozen=True, slots=True)
class _Tensor:
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple
    code: str


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage) or storage.code is None:
        raise _Refused("_rebuild_tensor_v2 without a typed storage")
    return _Tensor(storage, storage_offset, size, stride, storage.code)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(storage, _Storage) or not isinstance(dtype, _DType):
        raise _Refused("_rebuild_tensor_v3 without a storage and a dtype")
    if storage.code is not None and storage.code != dtype.code:
        raise _Refused(f"_rebuild_tensor_v3: storage of {storage.code} read as {dtype.code}")
    return _Tensor(storage, storage_offset, size, stride, dtype.code)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, _Tensor):
        raise _Refused("_rebuild_parameter of something that is not a tensor")
    return data


def _allowed_globals() -> dict[tuple[str, str], Any]:
    out: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }
    for name, code in _STORAGE_CODES.items():
        out[("torch", name)] = _StorageType(code)
    out[("torch.storage", "UntypedStorage")] = _StorageType(None)  # _rebuild_tensor_v3's storages
    for name, code in _DTYPE_CODES.items():
        out[("torch", name)] = _DType(code)
    return out


#: ``(module, name)`` -> the stand-in the unpickler returns for that global.
ALLOWED_GLOBALS: Mapping[tuple[str, str], Any] = _allowed_globals()


class _Unpickler(pickle.Unpickler):
    """Resolves only :data:`ALLOWED_GLOBALS`; storages become :class:`_Storage` records."""

    def find_class(self, module: str, name: str) -> Any:
        obj = ALLOWED_GLOBALS.get((module, name))
        if obj is None:
            raise _Refused(f"refused pickle global {_short(module)}.{_short(name)} (not a tensor checkpoint global)")
        return obj

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused(f"unsupported persistent id {_short(repr(pid))}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or type(numel) is not int or numel < 0:
            raise _Refused(f"malformed storage record {_short(repr(pid))}")
        if not isinstance(key, str) or not key or "/" in key or key in (".", ".."):
            raise _Refused(f"storage key {_short(repr(key))} is not a plain name")
        return _Storage(key, stype.code, numel)


def _short(s: str, n: int = 80) -> str:
    s = s.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    return s if len(s) <= n else s[: n - 3] + "..."


def _check_directory(path: Path, f: io.BufferedReader, size: int) -> None:
    """Refuse a central directory larger than :data:`MAX_DIRECTORY_BYTES` before zipfile parses it."""
    tail_len = min(size, 22 + 0xFFFF)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(tail):
        raise fail(path, "not a valid zip archive (no end-of-central-directory record)")
    cd_size = struct.unpack_from("<I", tail, at + 12)[0]
    if cd_size == 0xFFFFFFFF and at >= 20 and tail[at - 20 : at - 16] == b"PK\x06\x07":
        rec = struct.unpack_from("<Q", tail, at - 20 + 8)[0]
        if rec + 56 <= size:
            f.seek(rec)
            z64 = f.read(56)
            if z64[:4] == b"PK\x06\x06":
                cd_size = struct.unpack_from("<Q", z64, 40)[0]
    if cd_size > MAX_DIRECTORY_BYTES:
        raise fail(path, f"zip central directory of {cd_size} bytes exceeds the {MAX_DIRECTORY_BYTES}-byte limit")


def _data_start(path: Path, f: io.BufferedReader, info: zipfile.ZipInfo, size: int) -> int:
    """Absolute offset of a stored member's bytes, checked against the file size."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise fail(path, f"member {_short(info.filename)} is compressed; torch.save never compresses (re-save it)")
    if info.flag_bits & 0x1:
        raise fail(path, f"member {_short(info.filename)} is encrypted")
    if info.compress_size != info.file_size:
        raise fail(path, f"member {_short(info.filename)}: stored size {info.compress_size} != size {info.file_size}")
    if not 0 <= info.header_offset <= size - 30:
        raise fail(path, f"member {_short(info.filename)}: local header offset {info.header_offset} outside the file")
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise fail(path, f"member {_short(info.filename)}: bad local header at offset {info.header_offset}")
    name_len, extra_len = struct.unpack_from("<HH", local, 26)
    name = f.read(name_len)
    if name != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace"):
        raise fail(path, f"member {_short(info.filename)}: local header names {_short(repr(name))}")
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > size:
        raise fail(path, f"member {_short(info.filename)}: bytes [{start}, {start + info.file_size}) run past the "
                         f"end of the file ({size} bytes)")
    return start


def _open_archive(path: Path, f: io.BufferedReader, size: int) -> zipfile.ZipFile:
    magic = f.read(4)
    if magic != b"PK\x03\x04":
        if magic[:1] == b"\x80":
            raise fail(path, "legacy (pre-1.6) torch.save format, not supported: re-save it with torch >= 1.6 "
                             "or convert it to safetensors")
        raise fail(path, "not a PyTorch zip checkpoint (no zip signature)")
    _check_directory(path, f, size)
    f.seek(0)
    try:
        return zipfile.ZipFile(f)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, struct.error, OSError,
            NotImplementedError, UnicodeDecodeError) as e:
        raise fail(path, f"not a valid zip archive ({type(e).__name__}: {_short(str(e))})") from None


def _archive_prefix(path: Path, zf: zipfile.ZipFile) -> str:
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise fail(path, f"expected one <archive>/data.pkl record, found {len(pickles)}"
                         + ("" if pickles else " (a TorchScript or non-torch zip?)"))
    return pickles[0][: -len("data.pkl")]


def _load_pickle(path: Path, f: io.BufferedReader, zf: zipfile.ZipFile, prefix: str, size: int) -> Any:
    info = zf.getinfo(prefix + "data.pkl")
    if info.file_size > MAX_PICKLE_BYTES:
        raise fail(path, f"data.pkl of {info.file_size} bytes exceeds the {MAX_PICKLE_BYTES}-byte limit")
    start = _data_start(path, f, info, size)
    f.seek(start)
    raw = f.read(info.file_size)
    try:
        return _Unpickler(io.BytesIO(raw)).load()
    except _Refused as e:
        raise fail(path, str(e)) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            struct.error, UnicodeDecodeError, RecursionError, OverflowError, MemoryError) as e:
        raise fail(path, f"data.pkl is not a valid tensor checkpoint pickle ({type(e).__name__}: {_short(str(e))})") from None


def _byteorder(path: Path, f: io.BufferedReader, zf: zipfile.ZipFile, prefix: str, size: int) -> None:
    try:
        info = zf.getinfo(prefix + "byteorder")
    except KeyError:
        return  # written by torch < 2.1: little-endian
    if info.file_size > 16:
        raise fail(path, "byteorder record is too long")
    f.seek(_data_start(path, f, info, size))
    order = f.read(info.file_size).strip()
    if order != b"little":
        raise fail(path, f"byte order {_short(order.decode('latin-1'))!r} is not supported (only little-endian)")


def _check_tensor(path: Path, name: str, t: _Tensor, storage_bytes: int) -> tuple[tuple[int, ...], int]:
    """Shape and byte offset inside the storage of a C-contiguous tensor (or raise)."""
    def ints(v: Any, lo: int) -> bool:
        return isinstance(v, tuple) and all(type(d) is int and d >= lo for d in v)

    if not ints(t.size, 0) or not ints(t.stride, 0) or len(t.size) != len(t.stride):
        raise fail(path, f"tensor {_short(name)}: size and stride must be tuples of non-negative ints of one length")
    if type(t.offset) is not int or t.offset < 0:
        raise fail(path, f"tensor {_short(name)}: storage offset must be a non-negative int")
    item = _ITEMSIZE[t.code]
    numel, expect = 1, 1
    for d in t.size:
        numel *= d
    for d, s in zip(reversed(t.size), reversed(t.stride)):
        if d != 1 and s != expect and numel:
            raise fail(path, f"tensor {_short(name)}: non-contiguous (size {list(t.size)}, stride {list(t.stride)}); "
                             "re-save it with .contiguous()")
        expect *= d
    if (t.offset + numel) * item > storage_bytes:
        raise fail(path, f"tensor {_short(name)}: elements [{t.offset}, {t.offset + numel}) run past its storage "
                         f"{_short(t.storage.key)} of {storage_bytes // item} elements")
    return tuple(t.size), t.offset * item


def read_torch_tensors(path: Path) -> tuple[dict[str, TensorInfo], int]:
    """Validate a zip-format ``torch.save`` state dict; return its tensors and the file size.

    Raises :class:`~superswallow_jax.errors.SafetensorsError` (one line naming
    the file, and the tensor or global where one is at fault).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            with _open_archive(path, f, size) as zf:
                prefix = _archive_prefix(path, zf)
                obj = _load_pickle(path, f, zf, prefix, size)
                _byteorder(path, f, zf, prefix, size)
                return _tensor_infos(path, f, zf, prefix, size, obj), size
    except FileNotFoundError:
        raise fail(path, "file not found") from None
    except IsADirectoryError:
        raise fail(path, "is a directory, expected a .bin file") from None
    except PermissionError:
        raise fail(path, "permission denied") from None
    except (OSError, ValueError, OverflowError, struct.error) as e:  # offsets the checks above did not foresee
        raise fail(path, f"malformed zip archive ({type(e).__name__}: {_short(str(e))})") from None


def _tensor_infos(path: Path, f: io.BufferedReader, zf: zipfile.ZipFile, prefix: str, size: int,
                  obj: Any) -> dict[str, TensorInfo]:
    if not isinstance(obj, dict):
        raise fail(path, f"the pickled object is a {type(obj).__name__}, not a state dict of tensors")
    starts: dict[str, tuple[int, int]] = {}  # storage key -> (data start, bytes)
    out: dict[str, TensorInfo] = {}
    for name, t in obj.items():
        if not isinstance(name, str):
            raise fail(path, f"state dict key {_short(repr(name))} is not a string")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise fail(path, f"tensor name {_short(repr(name))} is not valid UTF-8") from None
        if not isinstance(t, _Tensor):
            raise fail(path, f"state dict entry {_short(name)} is a {type(t).__name__}, not a tensor")
        st = t.storage
        if st.key not in starts:
            try:
                info = zf.getinfo(f"{prefix}data/{st.key}")
            except KeyError:
                raise fail(path, f"tensor {_short(name)}: storage record data/{_short(st.key)} is missing") from None
            want = st.numel * (_ITEMSIZE[st.code] if st.code is not None else 1)
            if info.file_size != want:
                raise fail(path, f"storage data/{_short(st.key)}: {info.file_size} bytes, its record says {want}")
            starts[st.key] = (_data_start(path, f, info, size), want)
        begin, nbytes = starts[st.key]
        shape, off = _check_tensor(path, name, t, nbytes)
        numel_bytes = _ITEMSIZE[t.code]
        for d in shape:
            numel_bytes *= d
        out[name] = TensorInfo(name, t.code, shape, path, begin + off, begin + off + numel_bytes)
    return out


class TorchFile(TensorFile):
    """One validated zip-format ``torch.save`` state dict, read through
    :class:`~.tensor_file.TensorFile` (zero-copy, never unpickling tensors)."""

    def __init__(self, path: Path):
        tensors, size = read_torch_tensors(path)
        super().__init__(path, tensors, size)
