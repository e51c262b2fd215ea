"""Tier-2 tests for the PyTorch ``.bin`` reader (superswallow_jax.io.torch_zip) and Checkpoint's format choice.

Files written by real torch 2.13 (``tests/fixtures/published/torch``, made by
``scripts/make_published_fixtures.py``) must read back exactly as
``safetensors.torch`` saved the same tensors; files from our own tiny writer
must read back through both. Hostile files -- pickles that would run code,
malformed archives, random byte damage -- must give one-line
:class:`SafetensorsError` naming the file, and never run anything.
"""

from __future__ import annotations

import os
import pickle
import shutil
import struct
import subprocess
import zipfile
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from superswallow_jax.errors import SafetensorsError
from superswallow_jax.io.checkpoint import Checkpoint
from superswallow_jax.io.torch_zip import ALLOWED_GLOBALS, MAX_DIRECTORY_BYTES, TorchFile
from superswallow_jax.tiny_published import write_torch_bin

FIX = Path(__file__).parent / "fixtures" / "published"
TORCH = FIX / "torch"
BF16 = np.dtype(ml_dtypes.bfloat16)


def _check_error(excinfo, path: Path, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ----------------------------------------------------------------------------- files written by real torch


@pytest.mark.parametrize("name", ["dtypes.bin", "views.bin", "param.bin", "uint16.bin"])
def test_real_torch_files_read_exactly(name):
    expected = load_file(str(TORCH / "expected.safetensors"))
    f = TorchFile(TORCH / name)
    assert f.tensors
    for k, info in f.tensors.items():
        v = f.view(k)
        assert _same(v, expected[k]), k
        out = np.empty(info.nbytes, np.uint8)
        f.read_into(info, 0, out)
        assert out.tobytes() == expected[k].tobytes(), k
    f.close()


def test_shared_storage_and_offsets_are_views_of_the_same_bytes():
    f = TorchFile(TORCH / "views.bin")
    t = f.tensors
    assert (t["embed.weight"].begin, t["embed.weight"].end) == (t["lm_head.weight"].begin, t["lm_head.weight"].end)
    assert t["part"].begin == t["all"].begin + 2 * 4 and t["part"].nbytes == 7 * 4
    assert t["row"].begin == t["rows"].begin + 3 * 3 * 4 and t["row"].shape == (3,)
    assert all(info.begin % 64 == 0 for k, info in t.items() if k in ("all", "rows", "embed.weight"))


@pytest.mark.parametrize("name, needles", [
    ("noncontig.bin", ["tensor t", "non-contiguous", "stride [1, 4]"]),
    ("legacy.bin", ["legacy (pre-1.6) torch.save format"]),
    ("float8.bin", ["refused pickle global torch.float8_e4m3fn"]),
])
def test_real_torch_files_refused_in_one_line(name, needles):
    with pytest.raises(SafetensorsError) as ei:
        TorchFile(TORCH / name)
    _check_error(ei, TORCH / name, *needles)


def test_transformers_sharded_bin_checkpoint():
    ck = Checkpoint(FIX / "models" / "tulu")
    assert ck.format == "pytorch" and len(ck.files) == 2
    assert "model.embed_tokens.weight" in ck.tensors and ck.tensors["model.embed_tokens.weight"].dtype == "BF16"
    ck2 = Checkpoint(FIX / "models" / "llama")
    assert ck2.format == "pytorch" and [p.name for p in ck2.files] == ["pytorch_model.bin"]
    assert set(ck.tensors) == set(ck2.tensors)


# ----------------------------------------------------------------------------- our writer, real torch layout


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "model.embed_tokens.weight": rng.standard_normal((7, 5)).astype(BF16),
        "h": rng.standard_normal(3).astype(np.float16),
        "f": rng.standard_normal((2, 2, 2)).astype(np.float32),
        "s": np.array(2.5, np.float32),
        "e": np.zeros((0, 3), BF16),
        "i": np.arange(5, dtype=np.int64),
    }


def test_our_writer_round_trips(tmp_path):
    arrays = _arrays()
    write_torch_bin(tmp_path / "pytorch_model.bin", arrays)
    f = TorchFile(tmp_path / "pytorch_model.bin")
    assert list(f.tensors) == list(arrays)
    for k, a in arrays.items():
        assert _same(f.view(k), a), k
        assert f.tensors[k].begin % 64 == 0
    rows = f.read_rows(f.tensors["model.embed_tokens.weight"], np.array([1, 2, 3, 6]))
    assert _same(rows, arrays["model.embed_tokens.weight"][[1, 2, 3, 6]])


# ----------------------------------------------------------------------------- hostile pickles


def _zip_with_pickle(path: Path, pkl: bytes, members: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        for k, v in (members or {}).items():
            zf.writestr(f"archive/{k}", v)
    return path


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "subprocess.check_call", "eval", "protocol0"])
def test_code_running_pickles_are_refused_and_nothing_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}"
    payload = {
        "os.system": _Evil(os.system, cmd),
        "builtins.exec": _Evil(exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.check_call": _Evil(subprocess.check_call, ["touch", str(marker)]),
        "eval": _Evil(eval, f"open({str(marker)!r}, 'w')"),
        "protocol0": _Evil(os.system, cmd),
    }[kind]
    proto = 0 if kind == "protocol0" else 2
    pkl = pickle.dumps({"w": payload}, protocol=proto, fix_imports=False)
    path = _zip_with_pickle(tmp_path / "evil.bin", pkl)
    with pytest.raises(SafetensorsError) as ei:
        TorchFile(path)
    msg = _check_error(ei, path, "refused pickle global")
    expected = {"os.system": "system", "builtins.exec": "builtins.exec", "subprocess.check_call": "subprocess.check_call",
                "eval": "builtins.eval", "protocol0": "system"}[kind]
    assert expected in msg
    assert not marker.exists()


def test_allowed_globals_are_stand_ins_not_torch():
    assert ("torch._utils", "_rebuild_tensor_v2") in ALLOWED_GLOBALS
    assert ("collections", "OrderedDict") in ALLOWED_GLOBALS
    for (module, _name), obj in ALLOWED_GLOBALS.items():
        assert not getattr(obj, "__module__", "").startswith("torch"), (module, obj)
    assert all(m in ("torch", "torch._utils", "torch.storage", "collections") for m, _ in ALLOWED_GLOBALS)


def _raw_pickle(*parts: bytes) -> bytes:
    return b"\x80\x02" + b"".join(parts) + b"."


def _g(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _s(text: str) -> bytes:
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


@pytest.mark.parametrize("pkl, needle", [
    (_raw_pickle(b"]"), "not a state dict"),  # a list
    (_raw_pickle(b"}", _s("w"), b"K\x01s"), "is a int, not a tensor"),
    (_raw_pickle(b"}", b"K\x01", b"K\x01s"), "is not a string"),
    # _rebuild_tensor_v2 on a plain int instead of a persistent storage
    (_raw_pickle(b"}", _s("w"), _g("torch._utils", "_rebuild_tensor_v2"), b"(K\x01K\x00(t(t\x89)tR", b"s"),
     "without a typed storage"),
    # persistent id that is not a storage record
    (_raw_pickle(b"}", _s("w"), b"(", _s("module"), b"tQ", b"s"), "unsupported persistent id"),
    # storage key escaping the data folder
    (_raw_pickle(b"}", _s("w"), b"(", _s("storage"), _g("torch", "FloatStorage"), _s("../x"), _s("cpu"), b"K\x01tQ", b"s"),
     "not a plain name"),
    (b"\x80\x02garbage", "not a valid tensor checkpoint pickle"),
    (b"", "not a valid tensor checkpoint pickle"),
    # REDUCE on OrderedDict with a non-iterable: a TypeError inside the VM
    (_raw_pickle(_g("collections", "OrderedDict"), b"K\x05\x85R"), "not a valid tensor checkpoint pickle"),
])
def test_malformed_pickles_one_line(tmp_path, pkl, needle):
    path = _zip_with_pickle(tmp_path / "bad.bin", pkl)
    with pytest.raises(SafetensorsError) as ei:
        TorchFile(path)
    _check_error(ei, path, needle)


# ----------------------------------------------------------------------------- malformed archives


def _rezip(src: Path, dst: Path, transform) -> Path:
    """Copy a zip member by member, letting ``transform(name, data, info)`` change each (or drop it with None)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            out = transform(info.filename, zin.read(info), zipfile.ZipInfo(info.filename))
            if out is not None:
                data, zi = out
                zout.writestr(zi, data)
    return dst


def test_compressed_storage_refused(tmp_path):
    write_torch_bin(tmp_path / "a.bin", _arrays())

    def deflate(name, data, zi):
        if "/data/" in name:
            zi.compress_type = zipfile.ZIP_DEFLATED
        return data, zi

    path = _rezip(tmp_path / "a.bin", tmp_path / "c.bin", deflate)
    with pytest.raises(SafetensorsError) as ei:
        TorchFile(path)
    _check_error(ei, path, "is compressed")


def test_storage_member_of_the_wrong_size_or_missing(tmp_path):
    write_torch_bin(tmp_path / "a.bin", _arrays())
    short = _rezip(tmp_path / "a.bin", tmp_path / "s.bin",
                   lambda n, d, zi: (d[:-2] if n.endswith("/data/0") else d, zi))
    with pytest.raises(SafetensorsError) as ei:
        TorchFile(short)
    _check_error(ei, short, "storage data/0", "bytes, its record says 70")
    gone = _rezip(tmp_path / "a.bin", tmp_path / "g.bin", lambda n, d, zi: None if n.endswith("/data/1") else (d, zi))
    with pytest.raises(SafetensorsError) as ei:
        TorchFile(gone)
    _check_error(ei, gone, "tensor h", "data/1 is missing")


def test_views_outside_their_storage_refused(tmp_path):
    # a storage of 4 floats read as 2 x 3 from offset 1: elements [1, 7) past its 4
    storage = b"(" + _s("storage") + _g("torch", "FloatStorage") + _s("0") + _s("cpu") + b"K\x04tQ"
    args = b"(" + storage + b"K\x01" + b"(K\x02K\x03t" + b"(K\x03K\x01t" + b"\x89" + _g("collections", "OrderedDict") + b")Rt"
    pkl = _raw_pickle(b"}", _s("w"), _g("torch._utils", "_rebuild_tensor_v2"), args, b"R", b"s")
    path = _zip_with_pickle(tmp_path / "o.bin", pkl, {"data/0": b"\x00" * 16})
    with pytest.raises(SafetensorsError) as ei:
        TorchFile(path)
    _check_error(ei, path, "tensor w", "elements [1, 7) run past its storage 0 of 4 elements")


def test_not_a_zip_truncated_and_huge_directory(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world")
    with pytest.raises(SafetensorsError) as ei:
        TorchFile(junk)
    _check_error(ei, junk, "not a PyTorch zip checkpoint")
    write_torch_bin(tmp_path / "a.bin", _arrays())
    data = (tmp_path / "a.bin").read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetensorsError) as ei:
        TorchFile(cut)
    _check_error(ei, cut, "zip")
    # an end record claiming a central directory far larger than the limit
    at = data.rfind(b"PK\x05\x06")
    huge = tmp_path / "huge.bin"
    huge.write_bytes(data[: at + 12] + struct.pack("<I", MAX_DIRECTORY_BYTES + 1) + data[at + 16:])
    with pytest.raises(SafetensorsError) as ei:
        TorchFile(huge)
    _check_error(ei, huge, "central directory", "exceeds")
    with pytest.raises(SafetensorsError) as ei:
        TorchFile(tmp_path / "missing.bin")
    _check_error(ei, tmp_path / "missing.bin", "file not found")


@pytest.mark.parametrize("offset", [0xFFFFFFF0, 5])
def test_member_header_offsets_outside_the_file_refused(tmp_path, offset):
    # found by a 20,000-file fuzz run: a central directory entry pointing past the end (or into the
    # middle of another header) must not reach seek() or the reads unchecked
    write_torch_bin(tmp_path / "a.bin", _arrays())
    raw = bytearray((tmp_path / "a.bin").read_bytes())
    cd = raw.find(b"PK\x01\x02")
    raw[cd + 42 : cd + 46] = struct.pack("<I", offset)
    path = tmp_path / "off.bin"
    path.write_bytes(bytes(raw))
    with pytest.raises(SafetensorsError) as ei:
        TorchFile(path)
    _check_error(ei, path)


def test_big_endian_refused(tmp_path):
    write_torch_bin(tmp_path / "a.bin", _arrays())
    path = _rezip(tmp_path / "a.bin", tmp_path / "be.bin",
                  lambda n, d, zi: (b"big" if n.endswith("/byteorder") else d, zi))
    with pytest.raises(SafetensorsError) as ei:
        TorchFile(path)
    _check_error(ei, path, "byte order 'big'")


# ----------------------------------------------------------------------------- fuzzing


_FUZZ_COUNT = {"files": 0, "ok": 0}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_byte_mutations(tmp_path_factory, data):
    src = TORCH / data.draw(st.sampled_from(["dtypes.bin", "views.bin", "param.bin"]))
    raw = bytearray(src.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "set", "cut"]))
        i = data.draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            raw[i] = data.draw(st.integers(0, 255))
        else:
            del raw[i:]
            if not raw:
                raw = bytearray(b"P")
    path = tmp_path_factory.mktemp("fz") / "f.bin"
    path.write_bytes(bytes(raw))
    _FUZZ_COUNT["files"] += 1
    try:
        f = TorchFile(path)
    except SafetensorsError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    _FUZZ_COUNT["ok"] += 1
    for k, info in f.tensors.items():  # whatever validated must be readable in bounds
        assert info.end <= f.file_size
        out = np.empty(info.nbytes, np.uint8)
        f.read_into(info, 0, out)


# ----------------------------------------------------------------------------- Checkpoint: format choice and errors


def test_safetensors_preferred_over_bin(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    a = _arrays()
    write_torch_bin(d / "pytorch_model.bin", a)
    save_file({"only.in.safetensors": np.ones(2, np.float32)}, str(d / "model.safetensors"))
    ck = Checkpoint(d)
    assert ck.format == "safetensors" and list(ck.tensors) == ["only.in.safetensors"]
    (d / "model.safetensors").unlink()
    ck = Checkpoint(d)
    assert ck.format == "pytorch" and list(ck.tensors) == list(a)


def test_training_args_bin_is_never_opened(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    write_torch_bin(d / "pytorch_model.bin", _arrays())
    (d / "training_args.bin").write_bytes(pickle.dumps(_Evil(os.system, f"touch {tmp_path / 'x'}")))
    assert Checkpoint(d).format == "pytorch"
    assert not (tmp_path / "x").exists()


def test_sharded_bin_index_must_agree(tmp_path):
    d = tmp_path / "tulu"
    shutil.copytree(FIX / "models" / "tulu", d)
    idx = d / "pytorch_model.bin.index.json"
    text = idx.read_text()
    idx.write_text(text.replace('"lm_head.weight": "pytorch_model-00002-of-00002.bin"',
                                '"lm_head.weight": "pytorch_model-00001-of-00002.bin"'))
    with pytest.raises(SafetensorsError) as ei:
        Checkpoint(d)
    _check_error(ei, idx, "lm_head.weight", "mapped to pytorch_model-00001-of-00002.bin")
    idx.write_text(text)
    (d / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(SafetensorsError) as ei:
        Checkpoint(d)
    _check_error(ei, idx, "pytorch_model-00002-of-00002.bin", "missing")


@pytest.mark.parametrize("files, needle", [
    (["model.gguf"], "found model.gguf"),
    (["consolidated.00.pth", "params.json"], "found consolidated.00.pth"),
    (["tf_model.h5", "flax_model.msgpack"], "found flax_model.msgpack, tf_model.h5"),
    (["training_args.bin"], "found training_args.bin"),
    ([], "no weights found"),
])
def test_unsupported_formats_are_named(tmp_path, files, needle):
    d = tmp_path / "m"
    d.mkdir()
    for f in files:
        (d / f).write_bytes(b"x")
    with pytest.raises(SafetensorsError) as ei:
        Checkpoint(d)
    msg = _check_error(ei, d, needle)
    assert "pytorch_model.bin" in msg and "model.safetensors" in msg


def test_reading_pickle_does_not_import_torch():
    code = ("import sys; from superswallow_jax.io.torch_zip import TorchFile; "
            f"TorchFile({str(TORCH / 'dtypes.bin')!r}); print('torch' in sys.modules)")
    out = subprocess.run([__import__("sys").executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_in_memory_pickle_of_ordered_dict_is_fine(tmp_path):
    # an OrderedDict state dict with an attribute set by BUILD (torch's _metadata) reads
    od = OrderedDict()
    od._metadata = OrderedDict()  # type: ignore[attr-defined]
    pkl = pickle.dumps(od, protocol=2)
    path = _zip_with_pickle(tmp_path / "meta.bin", pkl)
    assert TorchFile(path).tensors == {}
