"""Benchmark: end-to-end merges on a ~1.3 GB bf16 pair, against baselines from the same run.

Prints medians and ratios (never asserts absolute times: the machine is shared).

Measurements (each ``--repeat`` times, round-robin so load drift hits all alike;
every command runs under ``/usr/bin/time -v`` for peak RSS and CPU time):

* ``floor``    -- ``bench/io_floor.py``: read both inputs once, ``posix_fallocate`` +
  ``pwrite`` one output of one input's size, no fsync. The I/O floor.
* ``ours``     -- ``superswallow merge CONFIG OUT --force -q`` (the CLI as shipped:
  it fsyncs, hashes inputs and outputs, writes a manifest) for the Superswallow
  recipe (dare_ties, density 1, union tokenizer) and dare_ties density 0.5.
* ``ours-lib`` -- the same merges with ``--no-fsync`` and with
  ``--no-fsync --no-digests`` (no sha256 of inputs or outputs).
* ``mergekit`` -- ``mergekit-yaml CONFIG OUT --random-seed 0 --quiet
  --no-write-model-card`` on the same configs (only with ``--mergekit PATH``).
* ``disk-floor`` -- ``bench/disk_floor.py``: every input read in parallel, and an
  output of one input's size written with fsync; reported as the larger of the
  two (perfect overlap) and their sum (none), with our merges against both.
* ``scaling``  -- ``bench/merge_probe.py`` (no fsync) pinned to one core
  (``taskset -c 0``) and on every core: the streaming loop's wall time (first
  chunk to last) and CPU seconds per thread role (main, reader, writer, xla).
* ``startup``  -- ``python -c pass``, ``import jax``, ``import superswallow_jax.merge``,
  ``superswallow --help`` and a merge of the ``tiny`` preset (plus its time to
  first chunk via the probe).

XLA compiles are counted from ``JAX_LOG_COMPILES=1`` ("Finished XLA compilation"
lines on stderr). Before every timed command the previous output is deleted and
``sync`` is called (untimed) so that earlier dirty pages are not written back
during the next measurement, and ``--pretouch-gb`` of memory is touched and
freed (untimed; see :func:`pretouch`: on this project's VMs, free pages
returned to the host make the first run after a pause 2-3 s slower); inputs
are re-read into the page cache before every round.

    python bench/bench_merge.py [--models DIR] [--repeat 3] [--mergekit PATH]
                                [--only floor,ours,ours-lib,mergekit,scaling,startup]
                                [--recipes superswallow,dare-d0.5] [--configs CONFIG ...]
                                [--work DIR] [--keep] [--cold]

``--cold`` empties the page cache (root) before each timed merge, so inputs
are read from the disk, as in a 70B merge; by default inputs are cached.
``--configs`` times any other configs the same way (a method sweep:
``--configs configs/examples/*.yaml --only ours,mergekit``); the 1.3gb models
they name (``llama``, ``hermes``) are made next to the pair when missing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
GROUPS = ("floor", "ours", "ours-lib", "mergekit", "scaling", "startup")
RECIPES = {
    "superswallow": REPO / "configs" / "superswallow-tiny.yaml",
    "dare-d0.5": REPO / "configs" / "examples" / "dare-ties-d05.yaml",
    # the same pair saved as published (tulu: .bin shards; both: tokenizer.model only)
    "superswallow-bin": REPO / "configs" / "superswallow-tiny-published.yaml",
}
DEFAULT_RECIPES = ("superswallow", "dare-d0.5")
TIME = "/usr/bin/time"


# ------------------------------------------------------------------ environment


def venv_python() -> str:
    cand = REPO / ".venv" / "bin" / "python"
    return str(cand) if cand.exists() else sys.executable


def cli_path() -> str:
    cand = Path(venv_python()).parent / "superswallow"
    if cand.exists():
        return str(cand)
    found = shutil.which("superswallow")
    if not found:
        raise SystemExit("superswallow CLI not found (install the package: pip install -e .)")
    return found


def machine_info() -> dict[str, str]:
    info = {"nproc": str(os.cpu_count()), "kernel": platform.release(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram"] = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass
    try:
        out = subprocess.run(
            [venv_python(), "-c", "import jax, numpy; print(jax.__version__, numpy.__version__)"],
            capture_output=True, text=True, timeout=120,
        ).stdout.split()
        info["jax"], info["numpy"] = out[0], out[1]
    except Exception:  # noqa: BLE001 - informational only
        pass
    return info


def loadavg() -> str:
    return "%.2f %.2f %.2f" % os.getloadavg()


def cached_fraction(dirs: list[Path]) -> float | None:
    """Fraction of the inputs' weight bytes resident in the page cache (``fincore``), or None."""
    files = [str(f) for d in dirs for f in weight_files(d)]
    if not files or not shutil.which("fincore"):
        return None
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", *files],
                             capture_output=True, text=True, timeout=30).stdout
        res = size = 0
        for line in out.splitlines():
            r, s_ = line.split()
            res, size = res + int(r), size + int(s_)
        return min(1.0, res / size) if size else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------ models and configs


def have_model(d: Path) -> bool:
    return (d / "config.json").is_file() and bool(weight_files(d))


def ensure_models(models: Path, preset: str, names: tuple[str, ...]) -> None:
    """Make the missing ``names`` (``published/<name>``: ``tiny --published`` into ``models/published``)."""
    missing = [n for n in names if not have_model(models / n)]
    if not missing:
        print(f"# reusing {preset} models in {models}")
        return
    for pub in (False, True):
        some = [n.removeprefix("published/") for n in missing if n.startswith("published/") == pub]
        if not some:
            continue
        where = models / "published" if pub else models
        print(f"# making {preset} models {some} in {where} (superswallow tiny --preset {preset}"
              f"{' --published' if pub else ''}) ...", flush=True)
        t = time.perf_counter()
        subprocess.run([cli_path(), "tiny", str(where), "--preset", preset, *(["--published"] if pub else []),
                        *(a for n in some for a in ("--model", n))], check=True, stdout=subprocess.DEVNULL)
        print(f"# made in {time.perf_counter() - t:.1f} s")


def config_models(cfg: Path) -> set[str]:
    """The ``models/<name>`` (or ``models/published/<name>``) folders a config refers to."""
    return set(re.findall(r"(?<![\w/.])models/((?:published/)?[\w.-]+)", cfg.read_text(encoding="utf-8")))


def weight_files(d: Path) -> list[Path]:
    """A model folder's weight files, safetensors or pickled ``.bin``."""
    return sorted([*d.glob("*.safetensors"), *d.glob("pytorch_model*.bin")])


def weight_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(d))


def warm(dirs: list[Path]) -> float:
    """Read every weight file once (into the page cache); returns seconds."""
    t = time.perf_counter()
    buf = bytearray(16 << 20)
    for d in dirs:
        for f in weight_files(d):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    return time.perf_counter() - t


def rewrite_config(src: Path, models: Path, dst: Path) -> Path:
    """Copy a config with ``models/<name>`` paths pointed at ``models`` (absolute)."""
    text = src.read_text(encoding="utf-8")
    text = re.sub(r"(?<![\w/.])models/", str(models.resolve()) + "/", text)
    dst.write_text(text, encoding="utf-8")
    return dst


# ------------------------------------------------------------------ timing


@dataclass
class Run:
    ok: bool
    wall: float
    rss_mb: float | None
    cpu: float | None
    compiles: int
    load: str
    stdout: str
    err_tail: str


@dataclass
class Job:
    name: str
    group: str
    argv: list[str]
    baseline: str | None = None  # job name for the ratio column
    out: Path | None = None  # removed before each run
    env: dict[str, str] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    section: str = ""


def _parse_time_v(text: str) -> tuple[float | None, float | None]:
    rss = user = sys_ = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Maximum resident set size"):
            rss = int(line.rsplit(":", 1)[1]) / 1024
        elif line.startswith("User time"):
            user = float(line.rsplit(":", 1)[1])
        elif line.startswith("System time"):
            sys_ = float(line.rsplit(":", 1)[1])
    cpu = user + sys_ if user is not None and sys_ is not None else None
    return rss, cpu


def _clear(path: Path | None) -> None:
    if path is None:
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def pretouch(nbytes: int) -> None:
    """Touch ``nbytes`` of fresh anonymous memory, then free it.

    On a VM with free-page reporting (virtio-balloon), freed guest pages are
    handed back to the host after a few seconds and the next first touch costs
    a host fault: writing 1.35 GB of new page cache then takes ~2-3 s instead
    of ~0.35 s. Touching memory just before each timed command gives every
    command the same start (host-backed free pages).
    """
    if nbytes <= 0:
        return
    import numpy as np

    buf = np.empty(nbytes, np.uint8)
    buf[::4096] = 1
    del buf


def drop_caches() -> None:
    """Empty the page cache (root only): the next reads of the inputs come from the disk."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def run_job(job: Job, workdir: Path, pretouch_bytes: int = 0, cold: bool = False) -> Run:
    _clear(job.out)
    os.sync()
    pretouch(pretouch_bytes)
    if cold and job.group != "startup":
        drop_caches()
    env = {**os.environ, "JAX_LOG_COMPILES": "1", **job.env}
    tfile = workdir / "time-v.txt"
    tfile.unlink(missing_ok=True)
    load = loadavg()
    argv = [a.replace("{T0}", "%.6f" % time.time()) for a in job.argv]
    t = time.perf_counter()
    p = subprocess.run([TIME, "-v", "-o", str(tfile), *argv], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    rss, cpu = _parse_time_v(tfile.read_text() if tfile.exists() else "")
    compiles = p.stderr.count("Finished XLA compilation")
    noise = ("Finished XLA compilation", "Compiling ", "Finished tracing", "Finished jaxpr", "Persistent compilation")
    err = [ln for ln in p.stderr.splitlines() if ln.strip() and not any(n in ln for n in noise)]
    return Run(p.returncode == 0, wall, rss, cpu, compiles, load, p.stdout, "\n".join(err[-25:]))


# ------------------------------------------------------------------ jobs


def build_jobs(args, work: Path, models: Path, tiny: Path | None, recipes: dict[str, Path]) -> list[Job]:
    py, cli = venv_python(), cli_path()
    sw, tu = models / "swallow", models / "tulu"
    only = set(args.only)
    jobs: list[Job] = []
    if "floor" in only:
        out = work / "floor.safetensors"
        jobs.append(Job("io-floor", "floor", [py, str(BENCH / "io_floor.py"), str(sw), str(tu), str(out)], out=out))
        dout = work / "disk-floor.bin"
        jobs.append(Job("disk-floor", "floor", [py, str(BENCH / "disk_floor.py"), str(dout), str(sw), str(tu)],
                        out=dout))
    floor = "io-floor" if "floor" in only else None
    cfgs = {r: rewrite_config(src, models, work / f"{r}.yaml") for r, src in recipes.items()}
    for r, cfg in cfgs.items():
        if "ours" in only:
            out = work / f"out-ours-{r}"
            jobs.append(Job(f"ours {r} (CLI)", "ours", [cli, "merge", str(cfg), str(out), "--force", "-q"],
                            floor, out))
        if "ours-lib" in only:
            out = work / f"out-lib-{r}"
            jobs.append(Job(f"ours {r} (--no-fsync)", "ours-lib",
                            [cli, "merge", str(cfg), str(out), "--force", "-q", "--no-fsync"], floor, out))
            out2 = work / f"out-lib2-{r}"
            jobs.append(Job(f"ours {r} (--no-fsync --no-digests)", "ours-lib",
                            [cli, "merge", str(cfg), str(out2), "--force", "-q", "--no-fsync", "--no-digests"],
                            floor, out2))
        if "scaling" in only:  # the streaming loop on one core, then on every core (probe: loop time, thread CPU)
            for label, pin in (("1 core", ["taskset", "-c", "0"]), ("all cores", [])):
                out = work / f"out-scale-{r}-{len(pin)}"
                jobs.append(Job(f"probe {r} ({label})", "scaling",
                                [*pin, py, str(BENCH / "merge_probe.py"), str(cfg), str(out), "--no-fsync",
                                 "--t0", "{T0}"], None, out))
        if "mergekit" in only and args.mergekit:
            out = work / f"out-mergekit-{r}"
            jobs.append(Job(f"mergekit {r}", "mergekit",
                            [args.mergekit, str(cfg), str(out), "--random-seed", "0", "--quiet",
                             "--no-write-model-card"], floor, out))
    for j in jobs:
        j.section = j.name.split()[1] if j.group in ("ours", "ours-lib", "mergekit", "scaling") else j.group
    if "startup" in only:
        jobs.append(Job("python -c pass", "startup", [py, "-c", "pass"]))
        base = "python -c pass"
        jobs.append(Job("import jax", "startup", [py, "-c", "import jax"], base))
        jobs.append(Job("import superswallow_jax.merge", "startup", [py, "-c", "import superswallow_jax.merge"], base))
        jobs.append(Job("superswallow --help", "startup", [cli, "--help"], base))
        if tiny is not None:
            cfg = rewrite_config(RECIPES["superswallow"], tiny, work / "tiny-superswallow.yaml")
            out = work / "out-tiny"
            jobs.append(Job("ours tiny preset (CLI)", "startup", [cli, "merge", str(cfg), str(out), "--force", "-q"],
                            base, out))
            out2 = work / "out-tiny-probe"
            jobs.append(Job("ours tiny preset (probe, no fsync)", "startup",
                            [py, str(BENCH / "merge_probe.py"), str(cfg), str(out2), "--t0", "{T0}", "--no-fsync"],
                            base, out2))
    for j in jobs:
        j.section = j.section or j.group
    return jobs


# ------------------------------------------------------------------ report


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def _probe_json(job: Job) -> list[dict]:
    out = []
    for r in job.runs:
        if r.ok:
            try:
                out.append(json.loads(r.stdout.strip().splitlines()[-1]))
            except (ValueError, IndexError):
                pass
    return out


def floor_report(jobs: list[Job], medians: dict) -> None:
    """The disk floor (parallel reads; a same-size write with fsync) and our merges against it."""
    disk = next((j for j in jobs if j.name == "disk-floor"), None)
    runs = _probe_json(disk) if disk else []
    if not runs:
        return
    mx, sm = med([x["max_s"] for x in runs]), med([x["sum_s"] for x in runs])
    print(f"\ndisk floor (median): read {med([x['read_s'] for x in runs]):.3f} s, write+fsync "
          f"{med([x['write_s'] for x in runs]):.3f} s; larger {mx:.3f} s, sum {sm:.3f} s")
    for j in jobs:
        m = medians.get(j.name)
        if j.group in ("ours", "mergekit") and m:
            print(f"  {j.name:<44} {m:.3f} s = {m / mx:.2f}x the larger, {m / sm:.2f}x the sum")


def scaling_report(jobs: list[Job]) -> None:
    """Probe runs: the streaming loop's wall (first chunk to last) and CPU seconds per thread role."""
    lines = []
    for j in jobs:
        runs = _probe_json(j)
        if not runs or "merge_probe.py" not in " ".join(j.argv):
            continue
        loop = med([x["marks"]["loop_done"] - x["marks"]["first_chunk"] for x in runs])
        roles = runs[len(runs) // 2].get("threads_cpu_s") or {}
        parts = ", ".join(f"{k} {v['total']:.2f} (busiest {v['busiest']:.2f}, {v['threads']})" for k, v in roles.items())
        lines.append((j, loop, parts))
    if not lines:
        return
    print("\nstreaming loop (first chunk to last, median s) and CPU s by thread role (a middle run):")
    for j, loop, parts in lines:
        print(f"  {j.name:<44} loop {loop:.3f} s;  {parts}")
    for j, loop, _ in lines:
        if j.name.endswith("(1 core)"):
            other = next((x for x in lines if x[0].name == j.name.replace("(1 core)", "(all cores)")), None)
            if other and other[1]:
                print(f"  {j.name.removesuffix(' (1 core)')}: 1 core / all cores = {loop / other[1]:.2f}x")


def report(jobs: list[Job]) -> None:
    sections = list(dict.fromkeys(j.section for j in jobs))
    order = ["floor", *RECIPES, *(x for x in sections if x not in ("floor", "startup", *RECIPES)), "startup"]
    jobs = sorted(jobs, key=lambda j: order.index(j.section) if j.section in order else len(order))
    medians = {j.name: med([r.wall for r in j.runs if r.ok]) for j in jobs}
    w = max(len(j.name) for j in jobs) + 2
    print()
    head = (f"{'measurement':<{w}}{'median s':>9}{'min s':>8}{'max s':>8}{'ratio':>8}  {'vs':<15}"
            f"{'RSS MB':>8}{'CPU s':>8}{'XLA':>5}{'ok':>6}")
    print(head)
    print("-" * len(head))
    section = None
    for j in jobs:
        if j.section != section and section is not None:
            print()
        section = j.section
        ok = [r for r in j.runs if r.ok]
        m = medians[j.name]
        base = medians.get(j.baseline) if j.baseline else None
        ratio = m / base if (m is not None and base) else None
        walls = [r.wall for r in ok]
        print(f"{j.name:<{w}}{fmt(m, '.3f'):>9}{fmt(min(walls) if walls else None, '.3f'):>8}"
              f"{fmt(max(walls) if walls else None, '.3f'):>8}{fmt(ratio, '.2f') + ('x' if ratio else ''):>8}  "
              f"{(j.baseline or '-'):<15}{fmt(med([r.rss_mb for r in ok]), '.0f'):>8}"
              f"{fmt(med([r.cpu for r in ok]), '.2f'):>8}{fmt(med([r.compiles for r in ok]), '.0f'):>5}"
              f"{f'{len(ok)}/{len(j.runs)}':>6}")

    # mergekit vs ours
    lines = []
    for r in dict.fromkeys(j.section for j in jobs):
        mk, ours = medians.get(f"mergekit {r}"), medians.get(f"ours {r} (CLI)")
        if mk and ours:
            lines.append(f"  {r}: mergekit {mk:.2f} s / ours (CLI) {ours:.2f} s = {mk / ours:.1f}x faster")
    if lines:
        print("\nspeed-up over mergekit (median wall):")
        print("\n".join(lines))

    # probe phases
    phase_lines = []
    for j in jobs:
        if "merge_probe.py" not in " ".join(j.argv):
            continue
        marks = []
        for r in j.runs:
            if r.ok:
                try:
                    marks.append(json.loads(r.stdout.strip().splitlines()[-1])["marks"])
                except (ValueError, IndexError, KeyError):
                    pass
        if not marks:
            continue
        keys = ["python_up", "imported", "planned", "first_chunk", "loop_done", "done"]
        vals = {k: med([m.get(k) for m in marks]) for k in keys}
        phase_lines.append(f"  {j.name:<{w}}" + "".join(f"{fmt(vals[k], '.2f'):>12}" for k in keys))
    if phase_lines:
        print("\nphase times of probe runs (median s since launch):")
        print(f"  {'':<{w}}" + "".join(f"{k:>12}" for k in
                                        ["python_up", "imported", "planned", "first_chunk", "loop_done", "done"]))
        print("\n".join(phase_lines))

    floor_report(jobs, medians)
    scaling_report(jobs)

    loads = [r.load for j in jobs for r in j.runs]
    if loads:
        one = [float(x.split()[0]) for x in loads]
        print(f"\n1-min load average before each run: min {min(one):.2f}, median {statistics.median(one):.2f}, "
              f"max {max(one):.2f}")

    failed = [(j, r) for j in jobs for r in j.runs if not r.ok]
    if failed:
        print("\nFAILURES (stderr tail, JAX compile-log lines removed):")
        seen = set()
        for j, r in failed:
            key = (j.name, r.err_tail)
            if key in seen:
                continue
            seen.add(key)
            print(f"--- {j.name}:")
            print(r.err_tail)


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=Path("/tmp/ssj-bench-models"),
                    help="folder for the 1.3gb pair (made if missing, reused if present)")
    ap.add_argument("--preset", default="1.3gb", choices=("1.3gb", "7b"),
                    help="size of the pair made in --models when missing (7b: Llama-2-7B shapes, 13.5 GB each)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder for configs and outputs (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mergekit", default=None, help="path to a mergekit-yaml executable")
    ap.add_argument("--only", default=",".join(GROUPS), help=f"comma list of {','.join(GROUPS)}")
    ap.add_argument("--pretouch-gb", type=float, default=4.0,
                    help="touch and free this much memory before each timed command (0: off; see pretouch())")
    ap.add_argument("--recipes", default=None,
                    help=f"comma list of {','.join(RECIPES)} (default: {','.join(DEFAULT_RECIPES)}, or none when --configs is given)")
    ap.add_argument("--configs", nargs="*", type=Path, default=[],
                    help="more configs to time, named by file stem (e.g. configs/examples/*.yaml); their "
                         "models/<name> paths point into --models, where missing 1.3gb models are made")
    ap.add_argument("--keep", action="store_true", help="keep the outputs of the last round")
    ap.add_argument("--cold", action="store_true",
                    help="empty the page cache before each timed merge (root): inputs come from the disk, "
                         "as they do for a 70B merge that does not fit in memory")
    args = ap.parse_args()
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    if args.recipes is None:
        args.recipes = [] if args.configs else list(DEFAULT_RECIPES)
    else:
        args.recipes = [x.strip() for x in args.recipes.split(",") if x.strip()]
    if set(args.recipes) - set(RECIPES):
        ap.error(f"--recipes: unknown {sorted(set(args.recipes) - set(RECIPES))} (choose from {','.join(RECIPES)})")
    bad = set(args.only) - set(GROUPS)
    if bad:
        ap.error(f"--only: unknown {sorted(bad)} (choose from {','.join(GROUPS)})")
    if not Path(TIME).exists():
        raise SystemExit(f"{TIME} not found (apt-get install time)")
    if "mergekit" in args.only and args.mergekit and not Path(args.mergekit).exists():
        raise SystemExit(f"--mergekit {args.mergekit}: not found")
    if args.cold:
        try:
            drop_caches()
        except OSError as e:
            raise SystemExit(f"--cold: cannot drop the page cache ({e}); run as root")

    info = machine_info()
    print(f"# bench_merge  {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    print("# machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"# load average at start: {loadavg()}")

    recipes = {r: RECIPES[r] for r in args.recipes}
    for c in args.configs:
        if not c.is_file():
            raise SystemExit(f"--configs: {c}: not found")
        if c.stem in recipes:
            raise SystemExit(f"--configs: two recipes named {c.stem!r}")
        recipes[c.stem] = c
    models = args.models.resolve()
    needed = {"swallow", "tulu"}.union(*(config_models(c) for c in recipes.values()))
    ensure_models(models, args.preset, tuple(sorted(needed)))
    tiny = None
    if "startup" in args.only:
        tiny = models / "tiny"
        ensure_models(tiny, "tiny", ("swallow", "tulu"))
    inputs = [models / n for n in sorted(needed)]
    print("# inputs: " + ", ".join(f"{d.relative_to(models)} {weight_bytes(d) / 1e9:.3f} GB" for d in inputs))

    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="ssj-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    jobs = build_jobs(args, work, models, tiny, recipes)
    if args.mergekit is None and "mergekit" in args.only:
        print("# mergekit: skipped (no --mergekit PATH)")
    print(f"# {len(jobs)} measurements x {args.repeat} repeats, round-robin; work dir {work}")
    print(f"# warm-up read of the inputs: {warm(inputs):.2f} s" + ("; --cold: page cache emptied before each merge" if args.cold else ""), flush=True)

    try:
        for rep in range(args.repeat):
            if not args.cold:
                warm(inputs)
            for j in jobs:
                cached = cached_fraction(inputs) if j.group != "startup" and not args.cold else None
                r = run_job(j, work, int(args.pretouch_gb * 2**30), args.cold)
                j.runs.append(r)
                status = "ok" if r.ok else "FAILED"
                cache = f"  inputs cached {cached:.0%}" if cached is not None else ""
                print(f"  [{rep + 1}/{args.repeat}] {j.name:<44} {r.wall:8.3f} s  "
                      f"{fmt(r.rss_mb, '.0f'):>6} MB  cpu={fmt(r.cpu, '.2f')} s  xla={r.compiles}  "
                      f"load={r.load}{cache}  {status}", flush=True)
    finally:
        print(f"# load average at end: {loadavg()}")
        report(jobs)
        if not args.keep:
            for j in jobs:
                _clear(j.out)
            if args.work is None:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
