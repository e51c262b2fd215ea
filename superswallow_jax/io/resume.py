"""Resuming an interrupted merge from what its staging folder already holds.

While a merge writes, its staging folder (:mod:`.commit`) keeps, in
``.superswallow/``:

* ``run.json``: the run record, everything the output bytes depend on (the
  normalized config's digest, seed, byte-relevant options, the shard layout,
  versions, and each input file's size and modification time);
* ``done-p<i>.jsonl``: one line ``{"name": ..., "sha256": ...}`` per finished
  tensor of process ``i``, appended by its writer thread once every byte of
  the tensor is written.

A rerun whose run record is equal keeps the staging folder: each listed
tensor whose bytes in the staging shard still hash to the recorded digest is
not merged again (:func:`verified_done`); the rest is. The records are
removed before the commit, so they never reach OUT. A line cut short by a
crash is ignored.
"""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping

import numpy as np

from .tensor_file import TensorFile, TensorInfo

__all__ = ["DoneJournal", "RECORD_DIR", "differs", "read_record", "verified_done", "write_record"]

RECORD_DIR = ".superswallow"
_CHUNK = 1 << 24


def read_record(staging: Path) -> dict | None:
    p = staging / RECORD_DIR / "run.json"
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def write_record(staging: Path, record: Mapping) -> None:
    d = staging / RECORD_DIR
    d.mkdir(parents=True, exist_ok=True)
    (d / "run.json").write_text(json.dumps(record, sort_keys=True), encoding="utf-8")


def differs(old: Mapping | None, new: Mapping) -> str | None:
    """The first field (in ``new``'s order) that differs, or None when the records are equal."""
    if old is None:
        return "no run record"
    for k, v in new.items():
        if old.get(k) != v:
            return k
    extra = sorted(set(old) - set(new))
    return extra[0] if extra else None


class DoneJournal:
    """Append-only list of finished tensors (thread-safe); one file per process."""

    def __init__(self, staging: Path, process: int):
        self.path = staging / RECORD_DIR / f"done-p{process}.jsonl"
        self._lock = threading.Lock()
        self._f = None
        #: name -> the NaN/Inf counts recorded with it (``NonFiniteTally.of_step``), filled by :meth:`load`
        self.nonfinite: dict[str, dict] = {}

    def load(self) -> dict[str, str]:
        """name -> sha256 of the lines written so far (a cut-off last line is skipped)."""
        out: dict[str, str] = {}
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return out
        for line in text.splitlines():
            try:
                e = json.loads(line)
                out[str(e["name"])] = str(e["sha256"])
                if isinstance(e.get("nonfinite"), dict):
                    self.nonfinite[str(e["name"])] = e["nonfinite"]
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def add(self, name: str, sha256: str, nonfinite: Mapping | None = None) -> None:
        """Tensor ``name`` is written, with digest ``sha256`` (and its NaN/Inf counts, when any)."""
        entry = {"name": name, "sha256": sha256, **({"nonfinite": dict(nonfinite)} if nonfinite else {})}
        with self._lock:
            if self._f is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._f = open(self.path, "a", encoding="utf-8")
            self._f.write(json.dumps(entry) + "\n")
            self._f.flush()  # in the page cache: survives the process, which is what resume needs

    def close(self) -> None:
        with self._lock:
            if self._f is not None:
                self._f.close()
                self._f = None


def _sha256(f: TensorFile, info: TensorInfo) -> str:
    h = hashlib.sha256()
    buf = np.empty(min(_CHUNK, max(1, info.nbytes)), np.uint8)
    for a in range(0, info.nbytes, buf.size):
        piece = buf[: min(buf.size, info.nbytes - a)]
        f.read_into(info, a, piece)
        h.update(piece)
    return h.hexdigest()


def verified_done(done: Mapping[str, str], where: Mapping[str, tuple[TensorFile, TensorInfo]],
                  workers: int) -> dict[str, str]:
    """The entries of ``done`` whose bytes (``where[name]``: file and range) still hash to their digest."""
    names = [n for n in done if n in where]
    with ThreadPoolExecutor(max(1, min(workers, len(names) or 1)), thread_name_prefix="superswallow-resume") as pool:
        shas = list(pool.map(lambda n: _sha256(*where[n]), names))
    return {n: s for n, s in zip(names, shas) if s == done[n]}
