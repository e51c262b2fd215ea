"""The output folder's commit protocol: a merge appears in OUT complete, or not at all.

Everything is built in a staging folder beside OUT, ``.<OUT name>.superswallow-staging``
(same filesystem, never inside OUT), and made to appear in one ``rename``:

1. **Lock.** ``flock(LOCK_EX | LOCK_NB)`` on the OUT directory (created when
   missing): a second merge into OUT fails at once (:class:`OutputLock`).
2. **Recover.** A crash during step 7 left a journal of OUT's entries moved
   into the staging folder; they are moved back (:func:`recover`).
3. **Stale staging.** Only the lock holder writes, so a staging folder found
   now belongs to a dead process: the caller reuses it (resume, when its run
   record equals this run's) or removes it.
4. **--force** removes the files a previous merge in OUT wrote, as its
   manifest and index name them (:func:`remove_previous_merge`), before
   anything is written, so their space is free; other entries stay.
5. **Space.** ``statvfs`` of the staging filesystem against the bytes still
   to write (:func:`check_free_space`).
6. **Write** everything into the staging folder; fsync every file and the folder.
7. **Commit** (:func:`commit`): OUT's remaining entries that the new output
   does not replace are listed in a journal beside OUT (fsynced) and moved
   into the staging folder; ``rename(staging, OUT)`` replaces the now-empty
   OUT in one step; the parent folder is fsynced; the journal removed.

Loaders look in OUT: before step 7's rename it holds none of the new merge's
files, after it the whole merge. OUT must not be a mount point (the staging
folder must be on OUT's filesystem); merge into a folder inside it instead.

Tests crash the protocol between its steps through ``SUPERSWALLOW_CRASH_AT``
(:func:`crash_point`): the process kills itself with SIGKILL there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import OutputError

__all__ = [
    "OutputLock", "blocked_signals", "check_free_space", "commit", "crash_point", "fsync_dir", "journal_path",
    "recover", "remove_previous_merge", "staging_path", "write_bytes",
]

STAGING_SUFFIX = ".superswallow-staging"
JOURNAL_SUFFIX = ".superswallow-moving.json"


def staging_path(out: Path) -> Path:
    return out.parent / f".{out.name}{STAGING_SUFFIX}"


def journal_path(out: Path) -> Path:
    return out.parent / f".{out.name}{JOURNAL_SUFFIX}"


def crash_point(name: str) -> None:
    """Signal this process when ``$SUPERSWALLOW_CRASH_AT`` names this step (tests only):
    ``<step>`` sends SIGKILL, ``<step>:TERM`` or ``<step>:INT`` that signal."""
    want = os.environ.get("SUPERSWALLOW_CRASH_AT")
    if want is None:
        return
    step, _, sig = want.partition(":")
    if step == name:
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}") if sig else signal.SIGKILL)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_bytes(obj: object) -> bytes:
    """How every JSON file of an output folder is written: 2-space indent, UTF-8 as is, a final newline."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_bytes(path: Path, data: bytes) -> None:
    """Write a small file; an OS error (disk full, ...) becomes one line naming the file."""
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None


class OutputLock:
    """An exclusive, non-blocking ``flock`` on the OUT directory for the whole merge."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.out, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise OutputError(f"{out}: cannot create or open the output folder: {e.strerror or e}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise OutputError(f"{out}: another superswallow merge is writing this folder (it is locked)") from None
        parent = os.stat(self.out.parent)
        if parent.st_dev != os.fstat(self.fd).st_dev:
            self.release()
            raise OutputError(f"{out}: is a mount point; the output is committed by renaming a folder beside it, "
                              f"so choose a folder inside it (for example {out}/model)")

    def release(self) -> None:
        """Drop the lock; remove OUT if this lock created it and it is still empty (nothing committed)."""
        if self.fd >= 0:
            if self.created and os.fstat(self.fd).st_nlink > 0:
                try:
                    self.out.rmdir()  # fails (and is left) when not empty, or replaced by a commit
                except OSError:
                    pass
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = -1

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def recover(out: Path) -> str | None:
    """Undo or finish a commit a crash interrupted; returns a one-line note, or None.

    If the journal exists the entries it lists are in the staging folder
    (moved back into OUT) or, when the rename happened, already in OUT.
    """
    j = journal_path(out)
    if not j.is_file():
        return None
    try:
        names = json.loads(j.read_text(encoding="utf-8"))["moved"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OutputError(f"{j}: unreadable commit journal ({type(e).__name__}); move its entries back by hand") from None
    staging = staging_path(out)
    back = 0
    for name in names:
        src = staging / name
        if staging.is_dir() and (src.exists() or src.is_symlink()) and not (out / name).exists():
            os.replace(src, out / name)
            back += 1
    fsync_dir(out)
    j.unlink()
    fsync_dir(out.parent)
    return f"recovered an interrupted commit: {back} of {len(names)} entries moved back into {out}" if back else None


def remove_previous_merge(out: Path, manifest_name: str, index_names: Iterable[str]) -> list[str]:
    """Remove the files an earlier merge wrote into ``out`` (named by its manifest or index).

    Only plain file names inside ``out`` are removed; anything else stays.
    Returns the removed names.
    """
    names: set[str] = set()
    man = out / manifest_name
    if man.is_file():
        try:
            obj = json.loads(man.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            obj = {}
        if isinstance(obj, dict):
            for key in ("files", "files_sha256"):
                v = obj.get(key)
                names.update(v if isinstance(v, list) else (v.keys() if isinstance(v, dict) else ()))
        names.add(manifest_name)
    for idx in index_names:
        p = out / idx
        if not p.is_file():
            continue
        try:
            wmap = json.loads(p.read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, ValueError, AttributeError):
            wmap = {}
        if isinstance(wmap, dict):
            names.update(v for v in wmap.values() if isinstance(v, str))
        names.add(idx)
    removed = []
    for n in sorted(names):
        p = out / n
        if isinstance(n, str) and Path(n).name == n and n not in (".", "..") and p.is_file() and not p.is_symlink():
            p.unlink()
            removed.append(n)
    return removed


def check_free_space(where: Path, need: int, label: Path) -> None:
    """Fail in one line when the filesystem of ``where`` has fewer than ``need`` free bytes."""
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise OutputError(f"{label}: needs {need:,} bytes, the filesystem has {free:,} free "
                          f"({need - free:,} missing)")


@contextmanager
def blocked_signals() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends (the commit runs to its end)."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def commit(staging: Path, out: Path, fsync: bool = True) -> None:
    """Make ``staging`` appear as ``out`` in one ``rename`` (step 7 of the module doc).

    ``out``'s entries that ``staging`` does not replace are moved into
    ``staging`` first (journaled beside ``out``), so nothing in OUT is lost;
    entries ``staging`` replaces are removed. The caller holds :class:`OutputLock`.
    """
    ours = {p.name for p in staging.iterdir()}
    keep = sorted(p.name for p in out.iterdir() if p.name not in ours)
    for p in out.iterdir():
        if p.name in ours:
            if p.is_dir() and not p.is_symlink():
                raise OutputError(f"{p}: a folder where the output writes a file; move it away")
            p.unlink()
    crash_point("before-journal")
    j = journal_path(out)
    if keep:
        write_bytes(j, json.dumps({"moved": keep}).encode())
        if fsync:
            fsync_file(j)
            fsync_dir(out.parent)
        crash_point("journal-written")
        for name in keep:
            os.replace(out / name, staging / name)
            crash_point("moved-one")
    if fsync:
        fsync_dir(staging)
    try:
        os.rename(staging, out)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise OutputError(f"{out}: changed while the merge was committing (not empty); the merge is in {staging}") from None
        raise
    crash_point("renamed")
    if fsync:
        fsync_dir(out.parent)
    if keep:
        j.unlink()
        if fsync:
            fsync_dir(out.parent)
    crash_point("committed")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
