"""Input hashing: the hash cache and the Hugging Face cache's content addresses."""

import hashlib
import os

import pytest

from superswallow_jax import manifest as mf


def _hub_file(root, content: bytes, name="model.safetensors"):
    """A file laid out like the Hub cache: snapshots/<rev>/<name> -> ../../blobs/<sha256>."""
    sha = hashlib.sha256(content).hexdigest()
    blobs = root / "models--org--m" / "blobs"
    snap = root / "models--org--m" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (blobs / sha).write_bytes(content)
    os.symlink(os.path.join("..", "..", "blobs", sha), snap / name)
    return snap / name, sha


def test_hub_blob_name_is_used_without_reading(tmp_path, monkeypatch):
    f, sha = _hub_file(tmp_path, b"weights" * 100)
    assert mf.hub_blob_sha256(f) == sha

    def no_read(path):
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(mf, "file_sha256", no_read)
    assert mf.HashCache(None).sha256(f) == sha


def test_other_files_are_hashed(tmp_path):
    plain = tmp_path / "model.safetensors"
    plain.write_bytes(b"abc")
    fake = tmp_path / ("0" * 64)  # 64 hex digits, but not in a blobs/ folder
    fake.write_bytes(b"xyz")
    small = tmp_path / "blobs"
    small.mkdir()
    git_blob = small / ("a" * 40)  # non-LFS Hub files are named by their git sha1
    git_blob.write_bytes(b"cfg")
    cache = mf.HashCache(None)
    for p in (plain, fake, git_blob):
        assert mf.hub_blob_sha256(p) is None
        assert cache.sha256(p) == hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["A" * 64, "g" * 64])
def test_non_lowercase_hex_names_are_not_trusted(tmp_path, name):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / name).write_bytes(b"q")
    assert mf.hub_blob_sha256(blobs / name) is None


def test_folder_digests_threads_and_pieces_equal_plain_sha256(tmp_path, monkeypatch):
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    tensors = {f"t{i}": rng.standard_normal((i * 37 + 1, 5)).astype(np.float32) for i in range(12)}
    tensors["bf"] = rng.standard_normal((300, 7)).astype(ml_dtypes.bfloat16)
    tensors["empty"] = np.zeros((0, 4), np.float32)
    save_file({k: v for k, v in tensors.items() if k < "t6"}, str(tmp_path / "part-a.safetensors"))
    save_file({k: v for k, v in tensors.items() if k >= "t6"}, str(tmp_path / "part-b.safetensors"))
    want = {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in tensors.items()}
    monkeypatch.setattr(mf, "FILE_CHUNK", 1000)  # several pread pieces per tensor
    for workers in (1, 4):
        got = mf.folder_digests(tmp_path, workers=workers)
        assert {k: d.sha256 for k, d in got.items()} == want
        assert list(got) == sorted(want)
    only = mf.folder_digests(tmp_path, select=lambda n: n.startswith("t1"), workers=3)
    assert sorted(only) == ["t1", "t10", "t11"]
