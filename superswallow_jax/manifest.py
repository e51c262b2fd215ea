"""Digests, the merge manifest, and verification of a published merge.

* A **tensor digest** is ``sha256`` of the tensor's raw little-endian bytes.
* A **model digest** (``superswallow hash``) is ``sha256`` over the lines
  ``name\\tdtype\\tshape\\ttensor-digest\\n`` sorted by name: it covers names,
  dtypes, shapes and bytes, and does not depend on how tensors are split into
  shards or ordered inside them.
* ``merge_manifest.json`` records versions, the PRNG scheme, the normalized
  config and its hash, the seed, every input file's sha256, the commit every
  input given by Hugging Face id resolved to, and every output tensor's and
  file's sha256.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from .errors import ModelError
from .io.checkpoint import Checkpoint

MANIFEST_NAME = "merge_manifest.json"
FILE_CHUNK = 1 << 24


@dataclass(frozen=True)
class TensorDigest:
    name: str
    dtype: str
    shape: tuple[int, ...]
    sha256: str

    def line(self) -> str:
        return f"{self.name}\t{self.dtype}\t{list(self.shape)}\t{self.sha256}\n"


def model_digest(digests: Iterable[TensorDigest]) -> str:
    h = hashlib.sha256()
    for d in sorted(digests, key=lambda d: d.name):
        h.update(d.line().encode("utf-8"))
    return h.hexdigest()


def hash_workers() -> int:
    """Threads for hashing files and tensors: sha256 and ``pread`` release the GIL.

    One core hashes slower than a fast disk reads (SHA-NI: about 2 GB/s), so
    a 70B model would take minutes on one thread; several reach the disk's speed.
    """
    return max(1, min(8, os.cpu_count() or 1))


def _tensor_sha256(ck: Checkpoint, name: str) -> str:
    """sha256 of one tensor's bytes, read with ``pread`` in pieces (no page of the file stays mapped)."""
    info = ck.tensors[name]
    h = hashlib.sha256()
    if info.nbytes:
        f = ck.file(info)
        buf = np.empty(min(FILE_CHUNK, info.nbytes), np.uint8)
        for a in range(0, info.nbytes, buf.size):
            piece = buf[: min(buf.size, info.nbytes - a)]
            f.read_into(info, a, piece)
            h.update(piece)
    return h.hexdigest()


def folder_digests(model_dir: Path, select: Callable[[str], bool] | None = None,
                   workers: int | None = None) -> dict[str, TensorDigest]:
    """Per-tensor digests of a model folder (read through the validating reader).

    Tensors are hashed on ``workers`` threads (default :func:`hash_workers`);
    memory stays at one ``FILE_CHUNK`` buffer per thread whatever the model size.
    """
    ck = Checkpoint(model_dir)
    try:
        names = [n for n in sorted(ck.tensors) if select is None or select(n)]
        n_workers = max(1, min(workers or hash_workers(), len(names) or 1))
        with ThreadPoolExecutor(n_workers, thread_name_prefix="superswallow-hash") as pool:
            shas = list(pool.map(lambda n: _tensor_sha256(ck, n), names))
        return {n: TensorDigest(n, ck.tensors[n].dtype, ck.tensors[n].shape, sha) for n, sha in zip(names, shas)}
    finally:
        ck.close()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(FILE_CHUNK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class StreamHasher:
    """Per-tensor sha256 of chunks arriving in increasing flat order.

    Use as (or inside) an executor sink: ``feed(name, flat_offset, array)``,
    which returns the tensor's digest once its last element has arrived
    (else None). Different tensors may be fed from different threads at once
    (each tensor's state is its own); one tensor's chunks come in order.
    """

    def __init__(self, specs: Mapping[str, tuple[str, tuple[int, ...]]]):
        self._specs = specs
        self._h: dict[str, "hashlib._Hash"] = {}
        self._next: dict[str, int] = {}

    def feed(self, name: str, offset: int, data: np.ndarray) -> str | None:
        if self._next.get(name, 0) != offset:
            raise RuntimeError(f"{name}: chunk at {offset} out of order")
        h = self._h.setdefault(name, hashlib.sha256())
        h.update(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        self._next[name] = end = offset + data.size
        return h.hexdigest() if end == math.prod(self._specs[name][1]) else None

    def digests(self) -> dict[str, TensorDigest]:
        out = {}
        for name, (dtype, shape) in self._specs.items():
            h = self._h.get(name, hashlib.sha256())
            out[name] = TensorDigest(name, dtype, shape, h.hexdigest())
        return out


def cache_dir() -> Path | None:
    """superswallow's cache folder (``$SUPERSWALLOW_CACHE``, default ~/.cache/superswallow_jax); None if "off"."""
    where = os.environ.get("SUPERSWALLOW_CACHE")
    if where == "off":
        return None
    if where:
        return Path(where)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "superswallow_jax"


def hub_blob_sha256(f: Path) -> str | None:
    """The sha256 a Hugging Face cache file is stored under, or None.

    The Hub cache (``models--org--name/snapshots/<rev>/<file>``) links each
    file to ``../../blobs/<id>``; for files kept with Git LFS (every weight
    file) the id is the sha256 of the content, 64 hex digits. Reading it from
    the name spares hashing the inputs: for a 70B merge, 280 GB read twice.
    """
    real = f.resolve()
    name = real.name
    if real.parent.name == "blobs" and len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        return name
    return None


class HashCache:
    """sha256 of files keyed by (path, device, inode, size, mtime_ns): inputs are hashed once.

    A changed file gets a new key, so a stale digest is never used. Files of a
    Hugging Face cache are not read at all (:func:`hub_blob_sha256`).
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, str] = {}
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.entries = {}

    @staticmethod
    def key(f: Path) -> str:
        st = f.stat()
        return f"{f.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"

    def sha256(self, f: Path) -> str:
        named = hub_blob_sha256(f)
        if named is not None:
            return named
        k = self.key(f)
        if k not in self.entries:
            self.entries[k] = file_sha256(f)
        return self.entries[k]

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.entries), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            pass  # a cache that cannot be written only costs time


class InputHasher:
    """sha256 of input files (label -> path), computed in the background during the merge.

    A background thread hashes the files on up to :func:`hash_workers` threads
    (files not in the cache; Hugging Face cache files are not read at all).
    """

    def __init__(self, files: Mapping[str, Path]):
        self.files = dict(sorted(files.items()))
        self.result: dict[str, str] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            d = cache_dir()
            cache = HashCache(d / "sha256.json" if d is not None else None)
            labels = list(self.files)
            with ThreadPoolExecutor(max(1, min(hash_workers(), len(labels) or 1)),
                                    thread_name_prefix="superswallow-hash-in") as pool:
                shas = list(pool.map(lambda label: cache.sha256(self.files[label]), labels))
            self.result.update(zip(labels, shas))
            cache.save()
        except BaseException as e:  # pragma: no cover - surfaced in join()
            self._error = e

    def start(self) -> "InputHasher":
        self._thread.start()
        return self

    def join(self) -> dict[str, str]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return dict(self.result)


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def make_selector(patterns: Sequence[str] | None) -> Callable[[str], bool] | None:
    """Tensor-name filter: glob patterns (``*mlp*``) or plain substrings."""
    if not patterns:
        return None

    def sel(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or (not any(c in p for c in "*?[") and p in name) for p in patterns)

    return sel


@dataclass(frozen=True)
class Comparison:
    matched: tuple[str, ...]
    mismatched: tuple[str, ...]
    missing: tuple[str, ...]  # expected but absent in the checked folder
    extra: tuple[str, ...]  # present but not expected

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.missing or self.extra)


def compare(expected: Mapping[str, TensorDigest], actual: Mapping[str, TensorDigest]) -> Comparison:
    names = sorted(set(expected) | set(actual))
    matched, mism, missing, extra = [], [], [], []
    for n in names:
        if n not in actual:
            missing.append(n)
        elif n not in expected:
            extra.append(n)
        elif expected[n] == actual[n]:
            matched.append(n)
        else:
            mism.append(n)
    return Comparison(tuple(matched), tuple(mism), tuple(missing), tuple(extra))


def read_manifest(model_dir: Path) -> dict | None:
    p = Path(model_dir) / MANIFEST_NAME
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise ModelError(f"{p}: not valid JSON") from None


def input_files(plan) -> dict[str, Path]:
    """Every weight file and config.json of every input model, labelled ``<model ref>/<file name>``;
    a ``base+adapter`` model's adapter files as ``<model ref>/adapter/<file name>``."""
    files = {}
    for m in plan.models:
        for f in [*m.checkpoint.files, m.dir / "config.json"]:
            files[f"{m.key}/{f.name}"] = f
        if m.adapter is not None:
            for f in m.adapter.files:
                files[f"{m.key}/adapter/{f.name}"] = f
    return files


def hub_inputs(plan) -> dict[str, dict]:
    """Every input given by Hugging Face id: model (or ``base+adapter`` adapter) reference ->
    ``{repo_id, revision, commit}`` (``revision``: as the config asks, None for the default branch;
    ``commit``: what it resolved to)."""
    from .lora.reference import split_reference

    out: dict[str, dict] = {}
    for m in plan.models:
        base, adapter = split_reference(m.key, "model")
        if m.hub is not None:
            out[base] = m.hub.record()
        if m.adapter_hub is not None:
            out[adapter] = m.adapter_hub.record()
    return dict(sorted(out.items()))


def pins(manifest: Mapping | None) -> dict[str, str]:
    """Model reference -> recorded commit, from a manifest's ``hub_inputs`` (and its stages'):
    what ``verify`` resolves instead of the references' revisions."""
    out: dict[str, str] = {}
    man = manifest or {}
    stages = man.get("stages") if isinstance(man.get("stages"), Mapping) else {}
    for rec in [*(s for s in stages.values() if isinstance(s, Mapping)), man]:
        hub = rec.get("hub_inputs")
        for ref, src in (hub.items() if isinstance(hub, Mapping) else ()):
            commit = src.get("commit") if isinstance(src, Mapping) else None
            if isinstance(ref, str) and isinstance(commit, str) and len(commit) == 40 \
                    and all(c in "0123456789abcdef" for c in commit):
                out[ref] = commit
    return out


def build_manifest(plan, opts, input_hashes: Mapping[str, str], tensor_digests: Mapping[str, TensorDigest],
                   shard_hashes: Mapping[str, str]) -> dict:
    """``merge_manifest.json`` without the small files' digests and the file list (the commit adds them).

    ``opts``: the :class:`~superswallow_jax.options.MergeOptions` of the run;
    the ones that change bytes are recorded under ``options`` (``verify``
    replays them). ``shard_hashes``: weight file name -> sha256 (``--file-digests``).
    """
    import jax

    from . import __version__, prng

    return {
        "superswallow_jax": __version__,
        "jax": jax.__version__,
        "prng_scheme": prng.PRNG_SCHEME,
        "seed": opts.seed,
        "options": opts.recorded(),
        "merge_method": plan.method.name,
        "config": json.loads(plan.config.normalized),
        "config_sha256": config_hash(plan.config.normalized),
        "input_files_sha256": dict(sorted(input_hashes.items())),
        "hub_inputs": hub_inputs(plan),
        "model_digest": model_digest(tensor_digests.values()) if tensor_digests else None,
        "tensors": {d.name: {"dtype": d.dtype, "shape": list(d.shape), "sha256": d.sha256}
                    for d in sorted(tensor_digests.values(), key=lambda d: d.name)},
        "files_sha256": dict(sorted(shard_hashes.items())),
        "digests": opts.digests,
        "file_digests": opts.digests and opts.file_digests,
    }
