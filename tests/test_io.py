"""Tier-2 tests for superswallow_jax.io: the safetensors reader and the sharded writer.

The reference for the format is the ``safetensors`` package itself: files it
writes must read back identically (and without copies) through our reader, and
files we write must load through ``safetensors.numpy.load_file``. Malformed
files must be rejected with a one-line :class:`SafetensorsError` naming the
file (and the tensor, where one is at fault), never any other exception.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import random
import struct
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from superswallow_jax.errors import OutputError, SafetensorsError
from superswallow_jax.io.reader import (
    DTYPES,
    INDEX_NAME,
    MAX_HEADER_BYTES,
    SINGLE_NAME,
    SafetensorsFile,
    read_header,
)
from superswallow_jax.io.checkpoint import Checkpoint
from superswallow_jax.io.commit import commit as commit_folder
from superswallow_jax.io.commit import staging_path
from superswallow_jax.io.writer import (
    ALIGN,
    ShardedWriter,
    TensorSpec,
    assign_shards,
    encode_header,
    np_code,
    parse_size,
    plan_layout,
    write_index,
)

BF16 = np.dtype(ml_dtypes.bfloat16)


# ----------------------------------------------------------------------------- helpers


def _rand(shape, dtype, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(size=shape).astype(np.float32).astype(dtype)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact equality (dtype, shape and bytes)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _sample_tensors() -> dict[str, np.ndarray]:
    return {
        "model.embed.weight": _rand((7, 5), BF16, 1),
        "model.layers.0.mlp.weight": _rand((3, 4), np.float16, 2),
        "model.layers.0.norm.weight": _rand((2, 3, 4), np.float32, 3),
        "empty.f32": np.zeros((0, 4), np.float32),
        "empty.bf16": np.zeros((5, 0), BF16),
        "scalar.f32": np.array(1.5, np.float32),
        "scalar.bf16": np.array(-2.0, BF16),
        "odd.bf16": _rand((3,), BF16, 4),  # odd byte count: later tensors start unaligned to 4
    }


def _raw_file(path: Path, header, data: bytes = b"", n: int | None = None) -> Path:
    """Write ``[u64 n][header][data]``; ``header`` may be an object (JSON-encoded) or bytes."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if n is None else n) + hb + data)
    return path


def _check_error(excinfo, path: Path, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def _check_consistent(header) -> None:
    """A parsed header's tensors tile the data region exactly, with the right sizes."""
    spans = sorted((t.begin, t.end, t.name) for t in header.tensors.values())
    pos = header.data_start
    for begin, end, name in spans:
        info = header.tensors[name]
        assert begin == pos, name
        assert end - begin == math.prod(info.shape) * DTYPES[info.dtype].itemsize
        pos = end
    assert pos == header.file_size


def _base_chain_reaches(arr: np.ndarray, target) -> bool:
    x = arr
    while x is not None:
        if x is target:
            return True
        x = getattr(x, "base", None)
    return False


# ----------------------------------------------------------------------------- reader: round trip


def test_roundtrip_safetensors_numpy(tmp_path):
    tensors = _sample_tensors()
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "日本語"})
    ref = load_file(str(path))

    header = read_header(path)
    assert header.metadata == {"format": "pt", "note": "日本語"}
    assert header.file_size == path.stat().st_size
    assert set(header.tensors) == set(tensors)
    _check_consistent(header)
    for name, arr in tensors.items():
        info = header.tensors[name]
        assert info.dtype == np_code(arr.dtype)
        assert info.shape == arr.shape
        assert info.np_dtype == arr.dtype
        assert info.numel == arr.size and info.nbytes == arr.nbytes
        assert info.path == path

    f = SafetensorsFile(path)
    try:
        for name, arr in tensors.items():
            v = f.view(name)
            assert _same(v, arr), name
            assert _same(v, ref[name]), name
            assert not v.flags.writeable
            assert _base_chain_reaches(v, f._map), name
            if v.nbytes:
                assert np.shares_memory(v, f._map), name
                a = np.asarray(v)
                assert np.shares_memory(a, v), name  # np.asarray does not copy
                assert a.ctypes.data == v.ctypes.data
        # The mapping is created once and reused.
        m = f._map
        f.view("scalar.f32")
        assert f._map is m
    finally:
        f.close()


@pytest.mark.parametrize("code", sorted(DTYPES))
def test_roundtrip_every_dtype(tmp_path, code):
    dt = DTYPES[code]
    arrs = {"x": _rand((3, 5), dt, 7), "s": _rand((), dt, 8), "e": np.zeros((0,), dt)}
    path = tmp_path / "x.safetensors"
    save_file(arrs, str(path))
    f = SafetensorsFile(path)
    for name, arr in arrs.items():
        assert f.header.tensors[name].dtype == code
        assert _same(f.view(name), arr)
    f.close()


def test_unaligned_data_region_views_are_zero_copy(tmp_path):
    # A header of odd length puts the data region (and so every F32) at an odd offset.
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([1.0, -3.5], np.float64)
    hdr = {
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F64", "shape": [2], "data_offsets": [24, 40]},
    }
    hb = json.dumps(hdr).encode()
    if (8 + len(hb)) % 2 == 0:
        hb += b" "
    path = _raw_file(tmp_path / "u.safetensors", hb, a.tobytes() + b.tobytes())
    f = SafetensorsFile(path)
    assert f.header.data_start % 2 == 1
    va, vb = f.view("a"), f.view("b")
    assert _same(va, a) and _same(vb, b)
    assert np.shares_memory(va, f._map) and np.shares_memory(vb, f._map)
    assert _same(load_file(str(path))["a"], a)


def test_metadata_null_and_absent(tmp_path):
    p = _raw_file(tmp_path / "m.safetensors", {"__metadata__": None, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\x07")
    assert read_header(p).metadata == {}
    p = _raw_file(tmp_path / "e.safetensors", {})
    h = read_header(p)
    assert h.tensors == {} and h.metadata == {} and h.data_start == h.file_size


def test_release_is_harmless(tmp_path):
    big = _rand((4 * mmap.PAGESIZE,), np.float32, 9)
    path = tmp_path / "big.safetensors"
    save_file({"w": big}, str(path))
    f = SafetensorsFile(path)
    info = f.header.tensors["w"]
    f.release(info, 0, info.nbytes)  # before mapping: no-op
    v = f.view("w")
    f.release(info, 0, info.nbytes)
    f.release(info, 10, 20)  # less than a page: no-op
    assert _same(v, big)  # pages are re-read after MADV_DONTNEED
    f.close()


def test_read_into_exact_bytes_any_offset(tmp_path):
    big = _rand((3 * mmap.PAGESIZE + 5,), np.float32, 11)
    small = np.arange(7, dtype=np.int16)
    path = tmp_path / "r.safetensors"
    save_file({"w": big, "s": small}, str(path))
    f = SafetensorsFile(path)
    w = f.header.tensors["w"]
    for begin, n in [(0, w.nbytes), (4, 4096), (w.nbytes - 3, 3), (1, 0)]:
        out = np.full(n, 0xAB, np.uint8)
        f.read_into(w, begin, out)
        assert out.tobytes() == big.tobytes()[begin : begin + n]
    out = np.empty(7, np.int16)
    f.read_into(f.header.tensors["s"], 0, out)
    assert _same(out, small)
    with pytest.raises(SafetensorsError, match="outside"):
        f.read_into(w, w.nbytes - 2, np.empty(4, np.uint8))
    f.close()


def test_read_into_file_truncated_after_header_read(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": _rand((4096,), np.float32, 12)}, str(path))
    f = SafetensorsFile(path)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 100)
    with pytest.raises(SafetensorsError) as e:
        f.read_into(f.header.tensors["w"], 0, np.empty(4096 * 4, np.uint8))
    _check_error(e, path, "truncated", "tensor w")
    f.close()


def _uncached_preadv(monkeypatch, short: int | None = None):
    """Make ``os.preadv`` behave as if the file were not in the page cache: a
    ``RWF_NOWAIT`` read fails with EAGAIN (after one short read of ``short``
    bytes, if given); ordinary reads work. Returns the list of flags seen."""
    real = os.preadv
    seen = []

    def fake(fd, buffers, offset, flags=0):
        seen.append(flags)
        if flags:
            if short is not None and len(seen) == 1:
                return real(fd, [memoryview(buffers[0])[:short]], offset)
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", fake)
    return seen


def test_prefetch_hints_the_tensor_range_only(tmp_path, monkeypatch):
    path = tmp_path / "p.safetensors"
    save_file({"a": _rand((100,), np.float32, 3), "b": _rand((50,), np.float16, 4)}, str(path))
    f = SafetensorsFile(path)
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: calls.append((off, n, advice)), raising=False)
    b = f.header.tensors["b"]
    _uncached_preadv(monkeypatch)
    f.read_into(f.header.tensors["a"], 0, np.empty(8, np.uint8))  # finds the file outside the page cache
    f.prefetch(b, 10, 1000)  # clipped to the tensor
    f.prefetch(b, 100, 100)  # empty: no call
    assert calls == [(b.begin + 10, b.nbytes - 10, os.POSIX_FADV_WILLNEED)]
    f.close()


def _hinted_file(tmp_path, monkeypatch, n: int, seed: int):
    """A just-written one-tensor file ``w`` (float32[n]) and the list its read-ahead hints go to."""
    path = tmp_path / f"h{seed}.safetensors"
    data = _rand((n,), np.float32, seed)
    save_file({"w": data}, str(path))  # just written: in the page cache
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: calls.append(a), raising=False)
    f = SafetensorsFile(path)
    return f, f.header.tensors["w"], data, calls


@pytest.mark.skipif(not getattr(os, "RWF_NOWAIT", 0), reason="no RWF_NOWAIT on this platform")
def test_prefetch_skipped_while_reads_hit_the_page_cache(tmp_path, monkeypatch):
    f, w, data, calls = _hinted_file(tmp_path, monkeypatch, 4096, 5)
    out = np.empty(w.nbytes, np.uint8)
    f.read_into(w, 0, out)
    assert out.tobytes() == data.tobytes()
    f.prefetch(w, 0, w.nbytes)
    assert calls == []
    f.close()


@pytest.mark.parametrize("short", [None, 5])
def test_read_into_falls_back_when_not_cached(tmp_path, monkeypatch, short):
    """EAGAIN from a RWF_NOWAIT read (possibly after a short read): the rest is
    read the ordinary way, exactly, and read-ahead hints start."""
    f, w, data, calls = _hinted_file(tmp_path, monkeypatch, 1000, 6)
    seen = _uncached_preadv(monkeypatch, short)
    for _ in range(2):
        out = np.full(w.nbytes - 8, 0xAB, np.uint8)
        f.read_into(w, 8, out)
        assert out.tobytes() == data.tobytes()[8:]
    if getattr(os, "RWF_NOWAIT", 0):
        assert seen[: 2 if short is None else 3] == [os.RWF_NOWAIT] * (1 if short is None else 2) + [0]
    assert all(flag == 0 for flag in seen[-2:])  # once cold, always the ordinary read
    f.prefetch(w, 0, 100)
    assert len(calls) == 1
    f.close()


def test_read_into_without_nowait_support(tmp_path, monkeypatch):
    """A file system that rejects RWF_NOWAIT (EOPNOTSUPP): ordinary reads, hints as before."""
    f, w, data, calls = _hinted_file(tmp_path, monkeypatch, 300, 7)
    real = os.preadv

    def fake(fd, buffers, offset, flags=0):
        if flags:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", fake)
    out = np.empty(w.nbytes, np.uint8)
    f.read_into(w, 0, out)
    assert out.tobytes() == data.tobytes()
    f.prefetch(w, 0, 100)
    assert len(calls) == 1
    f.close()


def test_host_buffers_reuse_only_unreferenced():
    import jax

    from superswallow_jax.hostbuf import HostBuffers

    pool = HostBuffers()
    a = pool.get(4096)
    assert a.ctypes.data % 64 == 0 and a.flags.writeable
    b = pool.get(4096)
    assert not np.shares_memory(a, b) and pool.count() == 2
    view = a.view(np.float32)[10:20]
    del a
    c = pool.get(4096)  # a's memory is still referenced through ``view``
    assert not np.shares_memory(c, view) and pool.count() == 3
    del view, b, c
    d = pool.get(4096)
    assert pool.count() == 3
    x = d.view(np.float32)
    x[:] = np.arange(1024, dtype=np.float32)
    arr = jax.device_put(x)  # JAX holds x (zero-copy on CPU, or until its copy is done)
    del d, x
    for _ in range(4):
        pool.get(4096)[:] = 0xFF  # never the memory behind ``arr``
    np.testing.assert_array_equal(np.asarray(arr), np.arange(1024, dtype=np.float32))


# ----------------------------------------------------------------------------- reader: malformed files

_VALID = {
    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
}
_VALID_DATA = bytes(range(12))


def _with(name: str, **fields) -> dict:
    hdr = json.loads(json.dumps(_VALID))
    hdr[name].update(fields)
    return hdr


def _big_int_header() -> bytes:
    return b'{"a":{"dtype":"F32","shape":[1' + b"0" * 5000 + b'],"data_offsets":[0,4]}}'


# (id, header (object or bytes) or full file bytes via "file", data, length override, needles)
MALFORMED = [
    ("empty_file", None, b"", None, ["truncated", "0 bytes"]),
    ("shorter_than_8", None, b"\x10\x00\x00", None, ["truncated"]),
    ("header_past_eof", b"{}", b"", 1000, ["1000", "past the end"]),
    ("header_len_2_63", b"{}", b"", 2**63, [str(2**63), "limit"]),
    ("header_len_u64_max", b"{}", b"", 2**64 - 1, ["limit"]),
    ("header_len_just_over_limit", b"{}", b"", MAX_HEADER_BYTES + 1, ["limit"]),
    ("invalid_utf8", b'{"a\xff\xfe": {}}', b"", None, ["UTF-8"]),
    ("invalid_json", b'{"a": ', b"", None, ["JSON"]),
    ("json_array", b"[]", b"", None, ["not a JSON object"]),
    ("json_number", b"12", b"", None, ["not a JSON object"]),
    ("json_null", b"null", b"", None, ["not a JSON object"]),
    ("int_over_4300_digits", _big_int_header(), b"\0" * 4, None, ["JSON"]),
    ("deeply_nested", b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", None, ["JSON"]),
    ("unknown_dtype", _with("a", dtype="F8_E4M3"), _VALID_DATA, None, ["'a'", "dtype"]),
    ("dtype_lowercase", _with("a", dtype="f32"), _VALID_DATA, None, ["'a'", "dtype"]),
    ("dtype_not_string", _with("b", dtype=4), _VALID_DATA, None, ["'b'", "dtype"]),
    ("negative_dim", _with("a", shape=[-2]), _VALID_DATA, None, ["'a'", "shape"]),
    ("float_dim", _with("a", shape=[2.0]), _VALID_DATA, None, ["'a'", "shape"]),
    ("bool_dim", _with("b", shape=[True]), _VALID_DATA, None, ["'b'", "shape"]),
    ("string_dim", _with("a", shape=["2"]), _VALID_DATA, None, ["'a'", "shape"]),
    ("shape_not_list", _with("a", shape=2), _VALID_DATA, None, ["'a'", "shape"]),
    ("shape_null", _with("a", shape=None), _VALID_DATA, None, ["'a'", "shape"]),
    ("offsets_one", _with("a", data_offsets=[0]), _VALID_DATA, None, ["'a'", "data_offsets"]),
    ("offsets_three", _with("a", data_offsets=[0, 4, 8]), _VALID_DATA, None, ["'a'", "data_offsets"]),
    ("offsets_not_list", _with("a", data_offsets="0,8"), _VALID_DATA, None, ["'a'", "data_offsets"]),
    ("offsets_negative", _with("a", data_offsets=[-8, 0]), _VALID_DATA, None, ["'a'", "data_offsets"]),
    ("offsets_float", _with("a", data_offsets=[0.0, 8.0]), _VALID_DATA, None, ["'a'", "data_offsets"]),
    ("offsets_bool", _with("b", data_offsets=[False, True]), _VALID_DATA, None, ["'b'", "data_offsets"]),
    ("offsets_end_before_begin", _with("b", data_offsets=[12, 8]), _VALID_DATA, None, ["'b'", "end 8 < begin 12"]),
    ("span_mismatch", _with("a", shape=[3]), _VALID_DATA, None, ["'a'", "12 bytes", "span 8"]),
    ("overflow_2_62_squared", _with("a", shape=[2**62, 2**62]), _VALID_DATA, None, ["'a'", "span 8"]),
    # 4 * (2**63 + 1) * 2 == 8 (mod 2**64): a reader computing in u64 would accept this.
    ("overflow_wraps_to_span", _with("a", shape=[2**63 + 1, 2]), _VALID_DATA, None, ["'a'", "span 8"]),
    ("overlap", _with("b", data_offsets=[4, 8]), _VALID_DATA[:8], None, ["'b'", "overlap"]),
    ("duplicate_range", _with("b", shape=[2], data_offsets=[0, 8]), _VALID_DATA[:8], None, ["overlap"]),
    ("gap", _with("b", data_offsets=[12, 16]), bytes(16), None, ["'b'", "gap"]),
    ("gap_at_start", {"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, bytes(4), None, ["'a'", "gap"]),
    ("trailing_bytes", _VALID, _VALID_DATA + b"\0" * 4, None, ["4 trailing bytes"]),
    ("trailing_bytes_no_tensors", {}, b"\0", None, ["1 trailing bytes"]),
    ("truncated_data", _VALID, _VALID_DATA[:-4], None, ["truncated", "need 12", "has 8"]),
    ("metadata_int_value", {**_VALID, "__metadata__": {"k": 1}}, _VALID_DATA, None, ["__metadata__"]),
    ("metadata_null_value", {**_VALID, "__metadata__": {"k": None}}, _VALID_DATA, None, ["__metadata__"]),
    ("metadata_nested", {**_VALID, "__metadata__": {"k": {"x": "y"}}}, _VALID_DATA, None, ["__metadata__"]),
    ("metadata_list", {**_VALID, "__metadata__": ["x"]}, _VALID_DATA, None, ["__metadata__"]),
    ("metadata_empty_list", {**_VALID, "__metadata__": []}, _VALID_DATA, None, ["__metadata__"]),
    ("metadata_string", {**_VALID, "__metadata__": "x"}, _VALID_DATA, None, ["__metadata__"]),
    ("metadata_false", {**_VALID, "__metadata__": False}, _VALID_DATA, None, ["__metadata__"]),
    ("extra_key", _with("a", extra=1), _VALID_DATA, None, ["'a'", "exactly"]),
    ("missing_key", {**_VALID, "a": {"dtype": "F32", "shape": [2]}}, _VALID_DATA, None, ["'a'", "exactly"]),
    ("entry_not_object", {**_VALID, "a": [0, 8]}, _VALID_DATA, None, ["'a'", "exactly"]),
    ("entry_null", {**_VALID, "c": None}, _VALID_DATA, None, ["'c'"]),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_file_raises(tmp_path, case):
    _, header, data, n, needles = case
    path = tmp_path / "bad.safetensors"
    if header is None:
        path.write_bytes(data)
    else:
        _raw_file(path, header, data, n)
    tracemalloc.start()
    try:
        with pytest.raises(SafetensorsError) as ei:
            read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _check_error(ei, path, *needles)
    assert peak < 64 * 2**20  # never allocates from a bogus header length
    # The same error through the higher-level entry points.
    with pytest.raises(SafetensorsError) as ei:
        SafetensorsFile(path)
    _check_error(ei, path)
    with pytest.raises(SafetensorsError) as ei:
        Checkpoint(tmp_path)
    _check_error(ei, path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(SafetensorsError) as ei:
        read_header(tmp_path / "nope.safetensors")
    _check_error(ei, tmp_path / "nope.safetensors", "not found")
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    with pytest.raises(SafetensorsError) as ei:
        read_header(d)
    _check_error(ei, d, "directory")


def test_error_message_stays_one_line_for_odd_tensor_names(tmp_path):
    path = _raw_file(tmp_path / "x.safetensors", {"a\nb": {"dtype": "Q4", "shape": [], "data_offsets": [0, 0]}})
    with pytest.raises(SafetensorsError) as ei:
        read_header(path)
    _check_error(ei, path, "'a\\nb'")


# ----------------------------------------------------------------------------- reader: fuzzing


def _small_valid_file() -> bytes:
    tensors = {
        "w": _rand((2, 3), BF16, 11),
        "h": _rand((3,), np.float16, 12),
        "f": _rand((2,), np.float32, 13),
        "z": np.zeros((0, 2), np.float32),
        "s": np.array(3.0, np.float32),
    }
    from safetensors.numpy import save

    return save(tensors, metadata={"k": "v"})


_SMALL = _small_valid_file()
_FUZZ_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


def _parse_or_reject(path: Path, blob: bytes) -> None:
    path.write_bytes(blob)
    try:
        header = read_header(path)
    except SafetensorsError as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg
        return
    _check_consistent(header)
    f = SafetensorsFile(path, header)
    for name, info in header.tensors.items():
        v = f.view(name)
        assert v.shape == info.shape and v.dtype == info.np_dtype
    f.close()


_mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, len(_SMALL) - 1), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, len(_SMALL) - 1), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, len(_SMALL)), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, len(_SMALL) - 1), st.just(0)),
    # Targeted at the JSON: swap a digit for another digit, keeping the JSON valid.
    st.tuples(st.just("digit"), st.integers(0, len(_SMALL) - 1), st.integers(0, 9)),
)


@_FUZZ_SETTINGS
@given(ops=st.lists(_mutation, min_size=1, max_size=4))
def test_fuzz_byte_mutations(tmp_path_factory, ops):
    blob = bytearray(_SMALL)
    for op, pos, val in ops:
        if op == "set" and pos < len(blob):
            blob[pos] = val
        elif op == "truncate":
            del blob[pos:]
        elif op == "insert":
            blob.insert(min(pos, len(blob)), val)
        elif op == "delete" and pos < len(blob):
            del blob[pos]
        elif op == "digit":
            digits = [i for i in range(8, len(blob)) if chr(blob[i]).isdigit()]
            if digits:
                blob[digits[pos % len(digits)]] = ord(str(val))
    _parse_or_reject(tmp_path_factory.mktemp("fz") / "f.safetensors", bytes(blob))


_json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**65), 2**65), st.floats(allow_nan=False), st.text(max_size=4)
)
_json = st.recursive(_json_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3), max_leaves=6)
_dim = st.one_of(st.integers(0, 4), st.integers(-2, 2**64), _json_scalar)
_entry = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(sorted(DTYPES) + ["F8_E5M2", "bf16", ""]), _json_scalar),
        "shape": st.one_of(st.lists(_dim, max_size=3), _json),
        "data_offsets": st.one_of(st.lists(st.integers(-1, 40), min_size=0, max_size=3), _json),
    },
    optional={"extra": _json},
)


@_FUZZ_SETTINGS
@given(
    entries=st.dictionaries(st.text(min_size=1, max_size=3), _entry, max_size=4),
    metadata=st.one_of(
        st.just("absent"), st.none(), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2), _json
    ),
    data_len=st.one_of(st.just(None), st.integers(0, 48)),
    pad=st.integers(0, 9),
)
def test_fuzz_structured_headers(tmp_path_factory, entries, metadata, data_len, pad):
    hdr = dict(entries)
    if metadata != "absent":
        hdr["__metadata__"] = metadata
    if data_len is None:  # as many data bytes as the offsets claim
        ends = [e["data_offsets"][-1] for e in entries.values() if isinstance(e["data_offsets"], list) and e["data_offsets"]]
        data_len = max([0] + [x for x in ends if type(x) is int and 0 <= x <= 10_000])
    hb = json.dumps(hdr).encode() + b" " * pad
    blob = struct.pack("<Q", len(hb)) + hb + bytes(i % 256 for i in range(data_len))
    _parse_or_reject(tmp_path_factory.mktemp("fz") / "f.safetensors", blob)


def test_fuzz_unmodified_file_parses(tmp_path):
    p = tmp_path / "ok.safetensors"
    p.write_bytes(_SMALL)
    header = read_header(p)
    assert set(header.tensors) == {"w", "h", "f", "z", "s"}
    _check_consistent(header)


# ----------------------------------------------------------------------------- Checkpoint


def _sharded(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray], dict[str, str]]:
    d = tmp_path / "m"
    d.mkdir()
    t1 = {"a": _rand((2, 3), BF16, 1), "b": _rand((4,), np.float32, 2)}
    t2 = {"c": _rand((5,), np.float16, 3), "d": np.zeros((0,), BF16)}
    save_file(t1, str(d / "model-00001-of-00002.safetensors"))
    save_file(t2, str(d / "model-00002-of-00002.safetensors"))
    wmap = {k: "model-00001-of-00002.safetensors" for k in t1} | {k: "model-00002-of-00002.safetensors" for k in t2}
    (d / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wmap}))
    return d, {**t1, **t2}, wmap


def _write_index(d: Path, wmap: dict) -> Path:
    p = d / INDEX_NAME
    p.write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return p


def test_checkpoint_sharded_with_index(tmp_path):
    d, tensors, wmap = _sharded(tmp_path)
    (d / "unrelated.safetensors").write_bytes(b"junk")  # not in the index: ignored
    ck = Checkpoint(d)
    assert set(ck.tensors) == set(tensors)
    assert [p.name for p in ck.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for name, arr in tensors.items():
        assert ck.tensors[name].path.name == wmap[name]
        v = ck.view(name)
        assert _same(v, arr)
        assert ck.file(ck.tensors[name]).view(name).ctypes.data == v.ctypes.data or v.nbytes == 0
    ck.close()


def test_checkpoint_single_file_and_glob(tmp_path):
    d = tmp_path / "single"
    d.mkdir()
    t = {"x": _rand((3,), BF16, 5)}
    save_file(t, str(d / SINGLE_NAME))
    ck = Checkpoint(d)
    assert list(ck.tensors) == ["x"] and _same(ck.view("x"), t["x"])

    d2 = tmp_path / "glob"
    d2.mkdir()
    save_file({"x": t["x"]}, str(d2 / "part1.safetensors"))
    save_file({"y": t["x"]}, str(d2 / "part2.safetensors"))
    ck2 = Checkpoint(d2)
    assert set(ck2.tensors) == {"x", "y"}
    assert ck2.tensors["y"].path.name == "part2.safetensors"


def test_checkpoint_index_names_missing_shard(tmp_path):
    d, _, wmap = _sharded(tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SafetensorsError) as ei:
        Checkpoint(d)
    _check_error(ei, d / INDEX_NAME, "model-00002-of-00002.safetensors", "missing")


def test_checkpoint_tensor_in_index_missing_from_shard(tmp_path):
    d, _, wmap = _sharded(tmp_path)
    idx = _write_index(d, {**wmap, "ghost": "model-00001-of-00002.safetensors"})
    with pytest.raises(SafetensorsError) as ei:
        Checkpoint(d)
    _check_error(ei, idx, "'ghost'", "model-00001-of-00002.safetensors")


def test_checkpoint_tensor_in_shard_missing_from_index(tmp_path):
    d, _, wmap = _sharded(tmp_path)
    del wmap["c"]
    idx = _write_index(d, wmap)
    with pytest.raises(SafetensorsError) as ei:
        Checkpoint(d)
    _check_error(ei, idx, "'c'", "model-00002-of-00002.safetensors", "missing from the index")


def test_checkpoint_index_maps_to_wrong_shard(tmp_path):
    d, _, wmap = _sharded(tmp_path)
    wmap["a"] = "model-00002-of-00002.safetensors"
    idx = _write_index(d, wmap)
    with pytest.raises(SafetensorsError) as ei:
        Checkpoint(d)
    _check_error(ei, idx, "'a'", "model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors")


def test_checkpoint_duplicate_tensor_across_shards(tmp_path):
    d, tensors, wmap = _sharded(tmp_path)
    save_file({"c": tensors["c"], "a": tensors["a"]}, str(d / "model-00002-of-00002.safetensors"))
    with pytest.raises(SafetensorsError) as ei:
        Checkpoint(d)
    _check_error(ei, d / "model-00002-of-00002.safetensors", "'a'", "model-00001-of-00002.safetensors")
    # Without the index, shard names are an incomplete set; other names go through the glob fallback.
    (d / INDEX_NAME).unlink()
    with pytest.raises(SafetensorsError) as ei:
        Checkpoint(d)
    _check_error(ei, d, "2 shard files named like model-00001-of-00002.safetensors", "incomplete")
    (d / "model-00001-of-00002.safetensors").rename(d / "first.safetensors")
    (d / "model-00002-of-00002.safetensors").rename(d / "second.safetensors")
    with pytest.raises(SafetensorsError) as ei:
        Checkpoint(d)
    _check_error(ei, d / "second.safetensors", "'a'")


def test_checkpoint_folder_without_safetensors(tmp_path):
    d = tmp_path / "nothing"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(SafetensorsError) as ei:
        Checkpoint(d)
    _check_error(ei, d, "no weights found")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        ("[1, 2]", "weight_map"),
        ('{"metadata": {}}', "weight_map"),
        ('{"weight_map": ["a"]}', "weight_map"),
        ('{"weight_map": {"a": 1}}', "weight_map"),
        ('{"weight_map": {"a": "../model-00001-of-00002.safetensors"}}', "plain file name"),
        ('{"weight_map": {"a": "sub/x.safetensors"}}', "plain file name"),
        ('{"weight_map": {"a": "' + "9" * 5000 + '"}, "n": ' + "9" * 5000 + "}", "not valid JSON"),
    ],
)
def test_checkpoint_bad_index(tmp_path, text, needle):
    d, _, _ = _sharded(tmp_path)
    idx = d / INDEX_NAME
    if isinstance(text, bytes):
        idx.write_bytes(text)
    else:
        idx.write_text(text)
    with pytest.raises(SafetensorsError) as ei:
        Checkpoint(d)
    _check_error(ei, idx, needle)


def test_checkpoint_malformed_shard_names_the_shard(tmp_path):
    d, _, _ = _sharded(tmp_path)
    shard = d / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(SafetensorsError) as ei:
        Checkpoint(d)
    _check_error(ei, shard, "truncated")


# ----------------------------------------------------------------------------- writer


def _specs_for(tensors: dict[str, np.ndarray]) -> list[TensorSpec]:
    return [TensorSpec(n, np_code(a.dtype), a.shape) for n, a in tensors.items()]


def _write_all(
    out: Path, tensors: dict[str, np.ndarray], shard_size: int = 10**12, chunk: int | None = None,
    seed: int | None = None, metadata: dict | None = None, commit: bool = True, writeback: bool = False,
):
    """Plan, write (in chunks of ``chunk`` elements, shuffled when ``seed`` is set) and commit."""
    out.mkdir(parents=True, exist_ok=True)
    staging = staging_path(out)
    staging.mkdir(exist_ok=True)
    specs = _specs_for(tensors)
    layouts = plan_layout(assign_shards(specs, shard_size), metadata or {})
    w = ShardedWriter(staging, layouts, specs, writeback=writeback)
    jobs = []
    for name, arr in tensors.items():
        flat = arr.reshape(-1)
        step = chunk or max(flat.size, 1)
        for a in range(0, flat.size, step):
            jobs.append((name, a, flat[a : a + step]))
        if flat.size == 0:
            jobs.append((name, 0, flat))
    if seed is not None:
        random.Random(seed).shuffle(jobs)
    for name, a, part in jobs:
        w.write(name, a, part)
    if commit:
        write_index(staging / INDEX_NAME, layouts, specs, {"tool": "test"})
        w.finish(fsync=False)
        commit_folder(staging, out, fsync=False)
        return w, layouts, specs, [out / lay.filename for lay in layouts]
    return w, layouts, specs, None


def test_writeback_kicks_and_same_bytes(tmp_path, monkeypatch):
    import superswallow_jax.io.writer as wr

    if wr.start_writeback() is None:
        pytest.skip("no sync_file_range on this platform")
    calls = []
    real = wr.start_writeback()
    monkeypatch.setattr(wr, "WRITEBACK_EVERY", 1000)
    monkeypatch.setattr(wr, "start_writeback", lambda: lambda fd, off, n: calls.append(real(fd, off, n)))
    tensors = {"a": _rand((3000,), np.float32, 1), "b": _rand((700,), np.float16, 2)}
    *_, plain = _write_all(tmp_path / "p", tensors, chunk=256)
    assert not calls
    *_, kicked = _write_all(tmp_path / "k", tensors, chunk=256, writeback=True)
    assert len(calls) == 12 and set(calls) == {0}  # after every >= 1000 bytes (11 + 1); each call returned 0
    assert [p.read_bytes() for p in kicked] == [p.read_bytes() for p in plain]


@pytest.mark.parametrize("meta", [{}, {"a": "b"}, {"format": "pt", "x" * 37: "日本"}])
@pytest.mark.parametrize("nnames", [0, 1, 2, 5])
def test_encode_header_alignment(meta, nnames):
    specs = [TensorSpec("t" * (i + 1) + str(i), "BF16", (i + 1, 3)) for i in range(nnames)]
    head, offsets = encode_header(specs, meta)
    assert len(head) % ALIGN == 0
    n = int.from_bytes(head[:8], "little")
    assert n == len(head) - 8
    body = head[8:]
    obj = json.loads(body.decode())
    assert body.rstrip(b" ") == body[: len(body.rstrip(b" "))] and set(body[len(body.rstrip(b" ")) :]) <= {32}
    assert obj.pop("__metadata__", {}) == meta
    pos = len(head)
    for s in specs:  # contiguous, in spec order
        assert offsets[s.name] == pos
        assert obj[s.name]["data_offsets"] == [pos - len(head), pos - len(head) + s.nbytes]
        assert obj[s.name]["dtype"] == s.dtype and obj[s.name]["shape"] == list(s.shape)
        pos += s.nbytes


def test_written_file_readable_exact_bytes(tmp_path):
    tensors = _sample_tensors()
    tensors["i32"] = _rand((3, 2), np.int32, 5)
    out = tmp_path / "out"
    w, layouts, specs, paths = _write_all(out, tensors, metadata={"format": "pt"})
    assert [p.name for p in paths] == [SINGLE_NAME]
    path = out / SINGLE_NAME
    assert path.stat().st_size == layouts[0].size

    ref = load_file(str(path))
    assert set(ref) == set(tensors)
    for name, arr in tensors.items():
        assert _same(ref[name], arr), name

    header = read_header(path)
    assert header.data_start % ALIGN == 0
    assert header.metadata == {"format": "pt"}
    _check_consistent(header)
    # Contiguous and in planned order.
    pos = header.data_start
    for s in specs:
        info = header.tensors[s.name]
        assert info.begin == pos == layouts[0].offsets[s.name]
        pos = info.end
    f = SafetensorsFile(path)
    raw = path.read_bytes()
    for name, arr in tensors.items():
        info = header.tensors[name]
        assert raw[info.begin : info.end] == arr.tobytes()
        assert _same(f.view(name), arr)
    f.close()
    assert w.bytes_written() == sum(a.nbytes for a in tensors.values())
    # Our files and the index also read back as a Checkpoint.
    ck = Checkpoint(out)
    assert all(_same(ck.view(n), a) for n, a in tensors.items())


def test_chunk_order_and_size_do_not_change_bytes(tmp_path):
    tensors = {
        "a": _rand((17, 13), BF16, 1),
        "b": _rand((31,), np.float32, 2),
        "c": np.zeros((0, 3), np.float16),
        "d": _rand((), np.float16, 3),
        "e": _rand((5, 7), np.float16, 4),
    }
    variants = [(None, None), (1, 0), (3, 1), (7, 2), (64, 3), (1000, 4), (5, None)]
    files = []
    for i, (chunk, seed) in enumerate(variants):
        out = tmp_path / f"v{i}"
        _write_all(out, tensors, shard_size=300, chunk=chunk, seed=seed)
        files.append({p.name: p.read_bytes() for p in sorted(out.glob("*")) if p.is_file()})
    assert len(files[0]) > 2  # several shards + the index
    for f in files[1:]:
        assert f == files[0]


def _u8(*sizes: int) -> list[TensorSpec]:
    return [TensorSpec(f"t{i}", "U8", (n,)) for i, n in enumerate(sizes)]


def _sizes(shards) -> list[list[int]]:
    return [[s.nbytes for s in shard] for shard in shards]


@pytest.mark.parametrize(
    "sizes, limit, expected",
    [
        ([4, 4, 4], 10, [[4, 4], [4]]),
        ([5, 5, 5, 5], 10, [[5, 5], [5, 5]]),
        ([10], 10, [[10]]),
        ([11], 10, [[11]]),
        ([3, 12, 3], 10, [[3], [12], [3]]),
        ([12, 1], 10, [[12], [1]]),
        ([1, 12], 10, [[1], [12]]),
        ([9, 1, 1], 10, [[9, 1], [1]]),
        ([0, 10, 0], 10, [[0, 10, 0]]),
        ([6, 4, 6, 4, 1], 10, [[6, 4], [6, 4], [1]]),
        ([1, 2, 3, 4], 1000, [[1, 2, 3, 4]]),
        ([1, 1, 1], 1, [[1], [1], [1]]),
        ([], 10, [[]]),
    ],
)
def test_assign_shards_mergekit_rule(sizes, limit, expected):
    shards = assign_shards(_u8(*sizes), limit)
    assert _sizes(shards) == expected
    assert [s.name for shard in shards for s in shard] == [f"t{i}" for i in range(len(sizes))]


def test_assign_shards_counts_bytes_not_elements():
    specs = [TensorSpec("a", "BF16", (3,)), TensorSpec("b", "F32", (1,)), TensorSpec("c", "F64", (1,))]
    # 6 + 4 = 10 fits in 10; + 8 does not.
    assert [[s.name for s in sh] for sh in assign_shards(specs, 10)] == [["a", "b"], ["c"]]


@settings(max_examples=200, deadline=None, database=None)
@given(sizes=st.lists(st.integers(0, 50), max_size=12), limit=st.integers(1, 60))
def test_assign_shards_properties(sizes, limit):
    shards = assign_shards(_u8(*sizes), limit)
    assert [s.nbytes for sh in shards for s in sh] == sizes
    for i, sh in enumerate(shards):
        total = sum(s.nbytes for s in sh)
        assert total <= limit or len(sh) == 1
        if i + 1 < len(shards):  # a shard was closed only because the next tensor would overflow it
            assert sh and total + shards[i + 1][0].nbytes > limit


@pytest.mark.parametrize("n", [1, 2, 3, 12])
def test_plan_layout_names_and_sizes(n):
    shards = [[TensorSpec(f"s{i}", "F32", (i + 1,))] for i in range(n)]
    layouts = plan_layout(shards, {"k": "v"})
    if n == 1:
        assert [l.filename for l in layouts] == ["model.safetensors"]
    else:
        assert [l.filename for l in layouts] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for lay, sh in zip(layouts, shards):
        assert len(lay.header) % ALIGN == 0
        assert lay.size == len(lay.header) + sum(s.nbytes for s in sh)
        assert set(lay.offsets) == {s.name for s in sh}


def test_shards_stay_in_staging_until_the_commit(tmp_path):
    tensors = {"a": _rand((40,), np.float32, 1), "b": _rand((40,), BF16, 2), "c": _rand((10,), np.float16, 3)}
    out = tmp_path / "out"
    w, layouts, specs, _ = _write_all(out, tensors, shard_size=100, commit=False)
    names = [l.filename for l in layouts]
    # 160 bytes alone (oversized); then 80 + 20 == 100 fits.
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert [sorted(l.offsets) for l in layouts] == [["a"], ["b", "c"]]
    staging = staging_path(out)
    for n in names:
        assert (staging / n).is_file()
        assert not (out / n).exists()
    write_index(staging / INDEX_NAME, layouts, specs, {"tool": "t"})
    w.finish(fsync=True)
    idx = json.loads((staging / INDEX_NAME).read_text())
    commit_folder(staging, out, fsync=True)
    assert not staging.exists()
    for n in names:
        assert (out / n).is_file()
    assert idx["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    assert idx["metadata"]["tool"] == "t"
    assert list(idx["weight_map"]) == sorted(tensors)
    for lay in layouts:
        for name in lay.offsets:
            assert idx["weight_map"][name] == lay.filename
    ck = Checkpoint(out)
    for name, arr in tensors.items():
        assert _same(ck.view(name), arr)
    for n in names:
        assert load_file(str(out / n))


@pytest.mark.parametrize("defect", ["missing_chunk", "missing_tensor", "duplicate_chunk", "overlap"])
def test_commit_refuses_incomplete_writes(tmp_path, defect):
    tensors = {"a": _rand((10,), np.float32, 1), "b": _rand((6,), BF16, 2)}
    out = tmp_path / "out"
    out.mkdir()
    staging = out / ".staging"
    staging.mkdir()
    specs = _specs_for(tensors)
    layouts = plan_layout(assign_shards(specs, 10**9), {})
    w = ShardedWriter(staging, layouts, specs)
    a, b = tensors["a"], tensors["b"]
    if defect == "missing_chunk":
        w.write("a", 0, a[:4])
        w.write("a", 6, a[6:])
        w.write("b", 0, b)
    elif defect == "missing_tensor":
        w.write("a", 0, a)
    elif defect == "duplicate_chunk":  # byte count matches, but [4, 8) of "a" is never written
        w.write("a", 0, a[:4])
        w.write("a", 0, a[:4])
        w.write("a", 8, a[8:])
        w.write("b", 0, b)
        assert w.bytes_written() == a.nbytes + b.nbytes
    else:  # overlap: every element written, some twice
        w.write("a", 0, a[:6])
        w.write("a", 4, a[4:])
        w.write("b", 0, b)
    with pytest.raises(RuntimeError, match="model.safetensors"):
        w.finish(fsync=False)
    w.abort()
    assert not (out / SINGLE_NAME).exists()
    assert (staging / SINGLE_NAME).exists()


def test_write_rejects_wrong_dtype_and_range(tmp_path):
    specs = [TensorSpec("a", "BF16", (4,))]
    layouts = plan_layout([specs], {})
    w = ShardedWriter(tmp_path, layouts, specs)
    with pytest.raises(TypeError):
        w.write("a", 0, np.zeros(4, np.float32))
    with pytest.raises(ValueError):
        w.write("a", 2, np.zeros(3, BF16))
    with pytest.raises(ValueError):
        w.write("a", -1, np.zeros(1, BF16))
    w.write("a", 0, np.ones((2, 2), BF16))  # any shape: written flat
    w.finish(fsync=False)
    assert _same(load_file(str(tmp_path / SINGLE_NAME))["a"], np.ones(4, BF16))


def test_write_non_contiguous_input(tmp_path):
    src = _rand((4, 6), np.float32, 3)
    specs = [TensorSpec("t", "F32", (6, 4))]
    w = ShardedWriter(tmp_path, plan_layout([specs], {}), specs)
    w.write("t", 0, src.T)  # Fortran-ordered view: written in C order
    w.finish(fsync=False)
    assert _same(load_file(str(tmp_path / SINGLE_NAME))["t"], np.ascontiguousarray(src.T))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5B", 5_000_000_000),
        ("5b", 5_000_000_000),
        ("500M", 500_000_000),
        ("1000", 1000),
        ("1.5G", 1_500_000_000),
        ("2K", 2000),
        (" 10M ", 10_000_000),
        (7, 7),
        ("0.5K", 500),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "5X", "5MB", "M", "-5M", "0", "0B", "nan", "inf", "1e400", "--1", 0, -3])
def test_parse_size_invalid(text):
    with pytest.raises(OutputError) as ei:
        parse_size(text)
    assert "\n" not in str(ei.value) and "shard-size" in str(ei.value)


@pytest.mark.parametrize("in_order", [True, False])
def test_finish_is_idempotent_and_file_sha256(tmp_path, in_order):
    import hashlib

    specs = [TensorSpec("a", "F16", (3,)), TensorSpec("b", "BF16", (2, 2))]
    lays = plan_layout(assign_shards(specs, 8), {"digest": "f" * 64})
    out = tmp_path / "out"
    stage = tmp_path / "stage"
    out.mkdir()
    stage.mkdir()
    w = ShardedWriter(stage, lays, specs)
    if in_order:
        w.write("a", 0, np.ones(3, np.float16))
        w.write("b", 0, np.full((2, 2), 2.0, BF16))
    else:  # out of file order: the digest falls back to reading the file
        w.write("b", 2, np.full((2,), 2.0, BF16))
        w.write("b", 0, np.full((2,), 2.0, BF16))
        w.write("a", 0, np.ones(3, np.float16))
    w.finish(fsync=False)
    w.finish(fsync=False)  # second call: no-op
    digests = w.file_sha256()
    paths = [stage / lay.filename for lay in lays]
    assert [p.name for p in paths] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for p in paths:
        assert read_header(p).metadata == {"digest": "f" * 64}
        assert digests[p.name] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert _same(SafetensorsFile(stage / lays[1].filename).view("b"), np.full((2, 2), 2.0, BF16))
    with pytest.raises(SafetensorsError, match="no model.safetensors.index.json"):
        Checkpoint(stage)  # shards without their index: an incomplete set


def test_read_rows_runs_scattered_and_bounds(tmp_path):
    from superswallow_jax.io.reader import SafetensorsFile

    x = np.arange(40 * 6, dtype=np.float32).reshape(40, 6).astype(ml_dtypes.bfloat16)
    y = np.arange(40 * 3 * 2, dtype=np.int16).reshape(40, 3, 2)
    path = tmp_path / "m.safetensors"
    save_file({"x": x, "y": y}, str(path))
    f = SafetensorsFile(path)
    info = f.header.tensors["x"]
    for ids in ([3, 4, 5, 9, 10, 0, 39], list(range(40)), [7], [], list(np.random.default_rng(0).permutation(40))):
        got = f.read_rows(info, np.array(ids, np.int64))
        assert got.shape == (len(ids), 6) and got.dtype == ml_dtypes.bfloat16
        assert np.array_equal(got, x[np.array(ids, np.int64)])
    assert np.array_equal(f.read_rows(f.header.tensors["y"], np.array([5, 6, 7, 1])), y[[5, 6, 7, 1]])
    with pytest.raises(IndexError):
        f.read_rows(info, np.array([40]))
    with pytest.raises(IndexError):
        f.read_rows(info, np.array([-1, 0]))
    f.close()
