"""The output of one merge: staging folder, resume, manifest and commit (its layout is the plan's).

:class:`Output` carries a plan's output through the protocol of
:mod:`superswallow_jax.io.commit`: :meth:`Output.prepare` (lock, recovery,
stale staging reused or removed, ``--force``, free space), :meth:`Output.writer`
(the staging shards, with the tensors a resumed run keeps), then
:meth:`Output.commit` (small files, manifest, one rename). On any error the
staging folder is removed; after a crash (SIGKILL, power loss) it stays, and
the same command resumes from it (:mod:`superswallow_jax.io.resume`).

With several processes every process writes its own shards into the one
staging folder (a shared filesystem); process 0 prepares and commits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax

from . import __version__, prng
from . import devices as dv
from . import manifest as mf
from .devices import ProcessInfo
from .errors import OutputError
from .extras import extra_files
from .io import commit as cm
from .io.reader import INDEX_NAME, SafetensorsFile
from .io.resume import RECORD_DIR, DoneJournal, differs, read_record, verified_done, write_record
from .io.writer import ShardedWriter, index_json
from .options import MergeOptions
from .plan import Plan

__all__ = ["Output"]

#: Bytes reserved for the manifest and index beyond the small files (per tensor, plus a constant).
_MANIFEST_PER_TENSOR = 400
_MANIFEST_BASE = 1 << 20


def _input_identity(plan: Plan) -> dict[str, list[int]]:
    out = {}
    for label, f in mf.input_files(plan).items():
        st = f.stat()
        out[label] = [st.st_size, st.st_mtime_ns]
    return out


class Output:
    """One merge's output folder (see the module docstring)."""

    def __init__(self, plan: Plan, out_dir: Path, opts: MergeOptions, procs: ProcessInfo,
                 say: Callable[[str], None], stage: str | None = None):
        self.plan, self.opts, self.procs, self.say = plan, opts, procs, say
        self.out = Path(out_dir).expanduser().resolve()
        self.staging = cm.staging_path(self.out)
        lay = plan.layout
        if lay is None or (lay.seed, lay.processes) != (opts.seed, procs.count):
            raise ValueError("the plan's output layout was not made for this seed and process count")
        self.specs = list(lay.specs)
        self.layouts = list(lay.files)
        self.mine = lay.mine(procs.index)
        self.record = {
            "superswallow_jax": __version__, "jax": jax.__version__, "prng_scheme": prng.PRNG_SCHEME,
            "config_sha256": mf.config_hash(plan.config.normalized), "options": opts.recorded(),
            "layout": mf.config_hash("".join(lay.filename + lay.header.hex() for lay in self.layouts)),
            "inputs": _input_identity(plan), "stage": stage,
        }
        self.resume = False
        self.lock: cm.OutputLock | None = None
        self._extras: dict[str, bytes] | None = None

    # ---------------------------------------------------------------- prepare

    def prepare(self, inputs: dict[str, Path]) -> None:
        """Steps 1-5 of :mod:`.io.commit` (process 0), then every process may write."""
        if self.procs.is_main:
            self._refuse_inputs(inputs)
            self.lock = cm.OutputLock(self.out)
            note = cm.recover(self.out)
            if note:
                self.say(note)
            self._stale_staging()
            self._previous_merge()
            self.staging.mkdir(exist_ok=True)
            write_record(self.staging, self.record)
            self._space()
        if self.procs.count > 1:  # the others learn whether process 0 resumes, once it has prepared
            if self.procs.is_main:
                dv.kv_publish("superswallow/resume/0", self.resume)
            self.resume = bool(dv.kv_gather("superswallow/resume", 1)[0])

    def _refuse_inputs(self, inputs: dict[str, Path]) -> None:
        for ref, inp in inputs.items():
            inp = inp.resolve()
            if self.out == inp or inp in self.out.parents or self.out in inp.parents:
                raise OutputError(f"{self.out}: refusing to write over input model {ref!r} ({inp})")
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"{self.out}: exists and is not a directory")

    def _stale_staging(self) -> None:
        if not self.staging.exists():
            return
        why = "--force" if self.opts.force else differs(read_record(self.staging), self.record)
        if why is None:
            self.resume = True
            self.say(f"resuming the interrupted merge in {self.staging}")
            return
        cm.remove_tree(self.staging)
        reason = "--force starts over" if why == "--force" else f"its {why} differs from this run's"
        self.say(f"removed {self.staging}, left by an interrupted merge ({reason})")

    def _previous_merge(self) -> None:
        entries = sorted(p.name for p in self.out.iterdir())
        if not entries:
            return
        if not self.opts.force:
            raise OutputError(f"{self.out}: directory is not empty ({', '.join(entries[:3])}"
                              f"{', ...' if len(entries) > 3 else ''}); use --force to replace the merge in it")
        removed = cm.remove_previous_merge(self.out, mf.MANIFEST_NAME, (INDEX_NAME,))
        if removed:
            self.say(f"--force: removed {len(removed)} files of the previous merge in {self.out}")

    def _space(self) -> None:
        need = _MANIFEST_BASE + _MANIFEST_PER_TENSOR * len(self.specs)
        need += sum(len(v) for v in self._small_files().values())
        for lay in self.layouts:
            p = self.staging / lay.filename
            have = p.stat().st_blocks * 512 if self.resume and p.is_file() else 0
            need += max(0, lay.size - have)
        cm.check_free_space(self.staging, need, self.out)

    # ---------------------------------------------------------------- write

    def writer(self) -> tuple[ShardedWriter, DoneJournal, dict[str, str]]:
        """This process's shard writer, its journal of finished tensors, and the
        tensors (name -> sha256) a resumed run keeps."""
        w = ShardedWriter(self.staging, self.mine, self.specs, hash_files=self.opts.digests and self.opts.file_digests,
                          writeback=self.opts.fsync, reuse=self.resume)
        journal = DoneJournal(self.staging, self.procs.index)
        kept: dict[str, str] = {}
        if w.reused and self.opts.digests:
            where = {}
            files = [SafetensorsFile(self.staging / name) for name in sorted(w.reused)]
            for f in files:
                where.update({n: (f, info) for n, info in f.tensors.items()})
            kept = verified_done(journal.load(), where, mf.hash_workers())
            for f in files:
                f.close()
            for name in kept:
                w.mark_done(name)
            self.say(f"resume: {len(kept)} finished tensors kept, {len(self.plan.steps) - len(kept)} to merge")
        return w, journal, kept

    def _small_files(self) -> dict[str, bytes]:
        """:func:`~superswallow_jax.extras.extra_files`, made once (the free-space check and the commit
        both need them, and encoding a big tokenizer.json is not free)."""
        if self._extras is None:
            self._extras = extra_files(self.plan, self.out.name)
        return self._extras

    # ---------------------------------------------------------------- commit

    def commit(self, manifest: dict) -> list[Path]:
        """Small files, index and manifest into the staging folder, then the one rename (process 0)."""
        if self.procs.count > 1:
            dv.barrier("superswallow/shards-written")
            if not self.procs.is_main:
                return []
        files = dict(self._small_files())
        files[INDEX_NAME] = index_json(self.layouts, self.specs, {"superswallow_jax": __version__})
        manifest["files"] = sorted([*files, *(lay.filename for lay in self.layouts), mf.MANIFEST_NAME])
        if self.opts.digests:
            for name, data in files.items():
                manifest["files_sha256"][name] = mf.bytes_sha256(data)
            manifest["files_sha256"] = dict(sorted(manifest["files_sha256"].items()))
        files[mf.MANIFEST_NAME] = cm.json_bytes(manifest)
        for name, data in files.items():
            cm.write_bytes(self.staging / name, data)
            if self.opts.fsync:
                cm.fsync_file(self.staging / name)
        cm.remove_tree(self.staging / RECORD_DIR)
        cm.crash_point("staged")
        with cm.blocked_signals():
            try:
                cm.commit(self.staging, self.out, fsync=self.opts.fsync)
            except BaseException:
                cm.recover(self.out)  # entries of OUT moved into the staging folder go back
                raise
        return [self.out / n for n in manifest["files"]]

    def abort(self) -> None:
        """After an error: remove the staging folder (process 0) and release the lock."""
        if self.procs.is_main and self.lock is not None:
            cm.recover(self.out)
            cm.remove_tree(self.staging)
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()  # also removes the OUT folder it created, if nothing was committed
            self.lock = None
