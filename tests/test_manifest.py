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
