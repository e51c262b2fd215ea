"""Run one merge through the library (``run_merge``) and report phase times.

Used by ``bench/bench_merge.py`` for the variants the CLI cannot express
(``fsync=False``, ``hash_inputs=False``) and for time-to-first-chunk.

    python bench/merge_probe.py CONFIG OUT [--no-fsync] [--no-hash-inputs]
                                [--no-output-hash] [--chunk-elems N]
                                [--pass-cache-mb MB] [--t0 EPOCH]

Prints one JSON line. All times are seconds since ``--t0`` (the launcher's
``time.time()`` just before it started this process; default: this script's
first line), so they include interpreter start-up:

* ``imported``: ``superswallow_jax.merge`` imported (jax included);
* ``planned``: the plan is built (headers read, tokenizer aligned);
* ``first_chunk``: the first output chunk was dispatched;
* ``loop_done``: the last chunk was dispatched (streaming phase over);
* ``done``: ``run_merge`` returned (digests, manifest, fsync, renames).

``cpu_s`` gives the CPU seconds that ``run_merge`` took on the main thread
(plan, dispatch) and in the whole process; ``threads_cpu_s`` splits them by
thread role (:class:`ThreadCpu`: main, reader, writer, hash-in, xla), with
each role's busiest thread. A thread whose CPU time is close to the
streaming phase's wall time (``loop_done - first_chunk``) bounds the loop.

It uses the persistent compilation cache and the malloc thresholds as the CLI
does (``SUPERSWALLOW_CACHE=off`` to measure cold compiles,
``SUPERSWALLOW_MALLOC=off`` for glibc's default thresholds), and, as the CLI
does, keeps the garbage collector off until its imports are done
(``--gc-default`` to keep it on). It also prints the JAX backend and, where the backend reports it (GPU, TPU),
the first device's peak memory in use (``device_peak_bytes``).
"""

import time

_T_START = time.time()

import gc  # noqa: E402

gc.disable()  # as the CLI does, until the imports are done (--gc-default: the collector stays on)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

if not __package__:  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class ThreadCpu:
    """CPU seconds per thread role, sampled from ``/proc/self/task`` every 20 ms (Linux).

    Roles from the Python thread names: ``main``, ``reader`` (input chunks),
    ``writer`` (writer lanes: result wait, pwrite, sha256), ``hash-in`` (input
    file digests); threads Python does not know are ``xla`` (XLA's compute and
    runtime threads). For each role: the total and its busiest thread's share
    (a thread near the loop's wall time bounds the loop).
    """

    def __init__(self):
        import os
        import threading

        self._tick = os.sysconf("SC_CLK_TCK")
        self._last: dict[int, float] = {}
        self._names: dict[int, str] = {}
        self._base = self._sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="probe-sampler", daemon=True)

    def _sample(self) -> dict[int, float]:
        import os
        import threading

        for t in threading.enumerate():
            if t.native_id is not None:
                self._names[t.native_id] = t.name
        out = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[int(tid)] = (int(fields[11]) + int(fields[12])) / self._tick
            except (OSError, IndexError, ValueError):
                continue
        self._last.update(out)
        return out

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def start(self) -> "ThreadCpu":
        self._thread.start()
        return self

    @staticmethod
    def _role(name: str | None) -> str:
        if name is None:
            return "xla"
        for role in ("reader", "writer", "hash-in", "sampler"):
            if role in name:
                return role
        return "main" if name == "MainThread" else "other-python"

    def stop(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        self._thread.join()
        self._sample()
        roles: dict[str, list[float]] = {}
        for tid, cpu in self._last.items():
            roles.setdefault(self._role(self._names.get(tid)), []).append(cpu - self._base.get(tid, 0.0))
        return {r: {"total": round(sum(v), 2), "busiest": round(max(v), 2), "threads": len(v)}
                for r, v in sorted(roles.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--no-fsync", action="store_true")
    ap.add_argument("--no-hash-inputs", action="store_true")
    ap.add_argument("--no-output-hash", action="store_true",
                    help="what-if for measurement only: fake the output digests (no sha256; the manifest is wrong)")
    ap.add_argument("--chunk-elems", type=int, default=None)
    ap.add_argument("--pass-cache-mb", type=int, default=None)
    ap.add_argument("--t0", type=float, default=None)
    ap.add_argument("--gc-default", action="store_true",
                    help="keep the garbage collector on during start-up (the CLI turns it off until its imports are done)")
    args = ap.parse_args()
    if args.gc_default:
        gc.enable()
    t0 = args.t0 if args.t0 is not None else _T_START
    marks: dict[str, float] = {"python_up": _T_START - t0}

    from superswallow_jax.compile_cache import enable_persistent_cache
    from superswallow_jax.malloc_tuning import tune_malloc
    from superswallow_jax.config import load_config
    from superswallow_jax.merge import run_merge
    from superswallow_jax.options import MergeOptions

    if not gc.isenabled():  # as the CLI's _imports_done
        gc.freeze()
        gc.enable()
    tune_malloc()  # as the CLI does (SUPERSWALLOW_MALLOC=off: glibc's defaults)
    enable_persistent_cache()

    marks["imported"] = time.time() - t0
    if args.no_output_hash:
        from superswallow_jax import manifest as mf

        mf.StreamHasher.feed = lambda self, name, offset, data: None
        mf.file_sha256 = lambda path: "0" * 64
    state = {"first": None, "last": None, "bytes": 0}
    threads = ThreadCpu().start()  # which thread bounds the streaming loop

    def on_plan(_plan):
        marks["planned"] = time.time() - t0

    def progress(n):
        now = time.time() - t0
        if state["first"] is None:
            state["first"] = now
        state["last"] = now
        state["bytes"] += n

    main_cpu0, proc_cpu0 = time.thread_time(), time.process_time()
    opts = MergeOptions(force=True, chunk_elems=args.chunk_elems, fsync=not args.no_fsync,
                        pass_cache_bytes=None if args.pass_cache_mb is None else args.pass_cache_mb << 20,
                        hash_inputs=not args.no_hash_inputs)
    res = run_merge(load_config(args.config), args.out, opts, progress=progress, on_plan=on_plan)
    marks["first_chunk"] = state["first"]
    marks["loop_done"] = state["last"]
    marks["done"] = time.time() - t0
    roles = threads.stop()
    cpu = {"main": time.thread_time() - main_cpu0, "process": time.process_time() - proc_cpu0}
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}  # None on some backends
    print(json.dumps({
        "backend": jax.default_backend(), "device_peak_bytes": stats.get("peak_bytes_in_use"),
        "marks": {k: (round(v, 4) if v is not None else None) for k, v in marks.items()},
        "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
        "threads_cpu_s": roles,
        "tensors": res.tensors, "bytes_written": res.bytes_written, "output_bytes": state["bytes"],
    }))


if __name__ == "__main__":
    main()
