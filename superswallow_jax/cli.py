"""The ``superswallow`` command line: a thin typer layer over the library.

It parses options, calls the library, draws progress, and maps user errors
(:class:`~superswallow_jax.errors.SuperswallowError`) to a one-line message
and a non-zero exit code.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,  # plain help: flags as --fsync / --no-fsync, no type column
    help="Memory-mapped, streaming LLM weight merger in JAX (mergekit YAML configs).",
)


OFFLINE_HELP = ("never use the network: models given by Hugging Face id must be in the Hugging Face cache "
                "(as HF_HUB_OFFLINE=1)")


def _version(value: bool) -> None:
    if value:
        from superswallow_jax import __version__

        typer.echo(f"superswallow_jax {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Memory-mapped, streaming LLM weight merger in JAX (mergekit YAML configs)."""


def _fail(err: Exception) -> None:
    code = getattr(err, "exit_code", 2)
    if isinstance(err, OSError):  # disk full, permission denied, ...: the environment, not a bug
        where = f"{err.filename}: " if err.filename else ""
        err = f"{where}{err.strerror or err}"
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code)


def _imports_done() -> None:
    """Turn the garbage collector back on, with everything allocated so far frozen.

    :func:`main` turns the collector off before a command imports the library:
    importing jax allocates about a million long-lived objects, and CPython's
    full collections would walk them all again during start-up and while the
    plan builds the tokenizer vocabularies (about 80 ms of a 1.3 GB merge;
    docs/performance.md). Frozen objects are never collected; the few cycles
    the imports leave behind stay. Does nothing where the collector is on
    (commands invoked through ``app``, as the tests do).
    """
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def _streaming_setup() -> None:
    """Process-wide settings for commands that stream a merge: the collector, the XLA compile cache and malloc thresholds."""
    from superswallow_jax.compile_cache import enable_persistent_cache
    from superswallow_jax.malloc_tuning import tune_malloc

    _imports_done()
    tune_malloc()
    enable_persistent_cache()


def _size(n: float) -> str:
    """Bytes in the units the progress bar uses (kB, MB, GB: powers of 1000)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _merge_options(command):
    """Give ``command`` one option per :class:`MergeOptions` field, generated from the
    field (flag, type, default, help: ``MergeOptions.cli_flags``); it receives their
    raw values as ``options`` (``MergeOptions.from_cli`` parses them)."""
    import functools
    import inspect

    from superswallow_jax.options import MergeOptions

    flags = MergeOptions.cli_flags()
    sig = inspect.signature(command)
    extra = []
    for f in flags:
        decl = f"{f.flag}/--no-{f.flag[2:]}" if f.type is bool else f.flag
        kind = f.type if f.default is not None else Optional[f.type]
        extra.append(inspect.Parameter(f.field, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                       default=typer.Option(f.default, decl, help=f.help)))

    @functools.wraps(command)
    def with_options(*args, **kwargs):
        kwargs["options"] = {f.field: kwargs.pop(f.field) for f in flags}
        return command(*args, **kwargs)

    mine = [p for p in sig.parameters.values() if p.name != "options"]
    with_options.__signature__ = sig.replace(parameters=[*mine, *extra])
    with_options.__annotations__ = {**{k: v for k, v in command.__annotations__.items() if k != "options"},
                                    **{p.name: p.annotation for p in extra}}
    return with_options


@app.command()
@_merge_options
def merge(
    config: Path = typer.Argument(..., help="mergekit YAML config"),
    out: Path = typer.Argument(..., help="output model folder"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    coordinator: Optional[str] = typer.Option(None, help="multi-process: HOST:PORT of process 0's coordinator"),
    num_processes: Optional[int] = typer.Option(None, help="multi-process: number of processes"),
    process_id: Optional[int] = typer.Option(None, help="multi-process: this process's index"),
    distributed: bool = typer.Option(False, help="multi-process: take the set-up from the environment (TPU pods, SLURM)"),
    intermediate_dir: Optional[Path] = typer.Option(None, help="multi-stage recipes: where the stages before the last go (default: .OUT.superswallow-stages beside OUT)"),
    keep_intermediate: bool = typer.Option(False, help="multi-stage recipes: keep every stage's output (default: delete each once no later stage reads it)"),
    offline: bool = typer.Option(False, "--offline", help=OFFLINE_HELP),
    *,
    options: dict,  # --seed, --shard-size, ...: one option per MergeOptions field (_merge_options)
) -> None:
    """Merge the models of CONFIG into the folder OUT.

    CONFIG may be a multi-stage recipe (several YAML documents with names, as
    mergekit-multi reads them): every stage runs in order and the last lands in
    OUT. Uses all local devices. With --coordinator/--num-processes/--process-id
    (or --distributed), each process merges and writes a share of the output shards.

    A model given by Hugging Face id (org/name or org/name@revision) is read
    from the Hugging Face cache when it is there; otherwise its config,
    tokenizer and weights (one format) are downloaded into that cache first.
    """
    from superswallow_jax.devices import init_distributed
    from superswallow_jax.errors import ConfigError, SuperswallowError
    from superswallow_jax.io.hub import HubAccess
    from superswallow_jax.merge import run_merge
    from superswallow_jax.options import MergeOptions
    from superswallow_jax.recipe import load_recipe, run_recipe

    t0 = time.perf_counter()
    try:
        if coordinator is not None and (num_processes is None or process_id is None):
            raise ConfigError("--coordinator needs --num-processes and --process-id")
        _streaming_setup()
        procs = init_distributed(coordinator, num_processes, process_id, distributed)
        recipe = load_recipe(config)
        opts = MergeOptions.from_cli(options)
        bar = _Bar(quiet or not procs.is_main)
        say = lambda line: typer.echo(line, err=True)  # noqa: E731
        hub = HubAccess(offline=offline, progress=bar.download, say=say)

        def one(cfg, dest, o, **stage):
            return run_merge(cfg, dest, o, progress=bar.advance, on_plan=bar.start, procs=procs, say=say, **stage)

        try:
            if recipe.multi:
                res = run_recipe(recipe, out, opts, intermediate_dir=intermediate_dir,
                                 keep_intermediate=keep_intermediate, say=say, run=one, hub=hub)
            else:
                res = one(recipe.final.config, out, opts, hub=hub)
        finally:
            bar.stop()
        _say_written(res, time.perf_counter() - t0)
    except (SuperswallowError, OSError) as e:
        _fail(e)


def _say_written(res, took: float) -> None:
    """The last line of a merge: tensors, bytes, folder, time and rate."""
    kept = f", {res.kept} kept from the interrupted run" if res.kept else ""
    typer.echo(f"wrote {res.tensors} tensors ({_size(res.bytes_written)}{kept}) to {res.out_dir} in "
               f"{took:.1f} s ({_size(res.bytes_written / max(took, 1e-9))}/s)")


class _Bar:
    """The command's progress display, in bytes: a bar per download of a model by id
    and a bar per merge (per stage of a recipe) in output bytes."""

    def __init__(self, quiet: bool):
        self.quiet, self.progress, self.task = quiet, None, None

    def _display(self):
        if self.progress is None:
            from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

            self.progress = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), TimeRemainingColumn(), transient=False)
            self.progress.start()
        return self.progress

    def start(self, plan) -> None:
        for w in plan.warnings:
            typer.echo(f"warning: {w}", err=True)
        if self.quiet:
            return
        self.task = self._display().add_task(f"writing {len(plan.steps)} tensors", total=plan.total_output_bytes)

    def download(self, label: str, total: int):
        """A new bar for one model's download (``total`` bytes); returns the function that advances it."""
        if self.quiet:
            return lambda n: None
        display = self._display()
        task = display.add_task(label, total=total)
        return lambda n: display.advance(task, n)

    def advance(self, n: int) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task, n)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@app.command()
def plan(
    config: Path = typer.Argument(..., help="mergekit YAML config"),
    as_json: bool = typer.Option(False, "--json", help="print the full plan as JSON"),
    tensors: bool = typer.Option(False, "--tensors", help="also list every output tensor with its sources and parameters"),
    shard_size: str = typer.Option("5B", help="max bytes per output shard"),
    seed: int = typer.Option(0, min=0, help="the seed the merge will use (it is in every shard header, so it moves the byte offsets shown)"),
    out: Optional[Path] = typer.Option(None, "--out", help="multi-stage recipes: the OUT a merge would write (finished earlier stages beside it are planned from)"),
    offline: bool = typer.Option(False, "--offline", help=OFFLINE_HELP),
) -> None:
    """Explain what a merge would do, without reading tensor data or writing anything.

    For a multi-stage recipe: the stage graph, then each stage's plan (a stage
    that reads a stage not yet merged is planned once that stage has run).

    plan downloads no weights: a model given by Hugging Face id must be in the
    Hugging Face cache. For one that is not, it says what merge would download
    (files, bytes, commit; asking the Hub unless --offline) and exits 2."""
    from superswallow_jax.errors import SuperswallowError
    from superswallow_jax.explain import plan_text, recipe_plan_text
    from superswallow_jax.io.hub import HubAccess
    from superswallow_jax.io.writer import parse_size
    from superswallow_jax.merge import dumps_plan
    from superswallow_jax.plan import build_plan
    from superswallow_jax.recipe import load_recipe

    _imports_done()

    try:
        recipe = load_recipe(config)
        hub = HubAccess(offline=offline, download=False)
        if recipe.multi:
            typer.echo(recipe_plan_text(recipe, out, parse_size(shard_size), as_json, tensors, hub))
            return
        with build_plan(recipe.final.config, shard_size=parse_size(shard_size), hub=hub, seed=seed) as p:
            typer.echo(dumps_plan(p) if as_json else "\n".join(plan_text(p, tensors)))
    except (SuperswallowError, OSError) as e:
        _fail(e)


@app.command("extract-lora")
def extract_lora(
    finetuned: str = typer.Argument(..., help="the fine-tuned model (folder or Hugging Face id; an id not in the Hugging Face cache is downloaded into it)"),
    base: str = typer.Argument(..., help="its base model (the same)"),
    out: Path = typer.Argument(..., help="the adapter folder to write"),
    rank: int = typer.Option(..., "--rank", help="the rank of every LoRA (the largest, with --rank-by-energy)"),
    modules: Optional[list[str]] = typer.Option(None, "--modules", help="only modules whose name matches this regular expression (repeatable; default: every linear layer)"),
    rank_by_energy: Optional[float] = typer.Option(None, "--rank-by-energy", help="per tensor, the smallest rank keeping this share of ||dW||^2 (at most --rank)"),
    dtype: str = typer.Option("float32", help="dtype of the factors: float32, bfloat16 or float16"),
    skip_embeddings: bool = typer.Option(False, "--skip-embeddings", help="leave embeddings and lm_head out (default: saved whole in modules_to_save, as mergekit does)"),
    seed: int = typer.Option(0, help="seed of the randomized SVD's test matrices; same seed -> same bytes"),
    iters: int = typer.Option(4, help="power iterations of the randomized SVD (big tensors)"),
    force: bool = typer.Option(False, help="replace an adapter already in OUT"),
    fsync: bool = typer.Option(True, help="fsync the files before renaming them into place"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="only the summary, not a line per tensor"),
    offline: bool = typer.Option(False, "--offline", help=OFFLINE_HELP),
) -> None:
    """Factorise a fine-tune's difference from its base into a PEFT LoRA adapter (truncated SVD per tensor).

    Prints, per tensor, the rank, the relative Frobenius error of the reconstruction and the energy kept
    (also in OUT/extract_report.json), then a summary."""
    from superswallow_jax.dtypes import config_code
    from superswallow_jax.errors import ConfigError, SuperswallowError
    from superswallow_jax.io.hub import HubAccess
    from superswallow_jax.lora.extract import ExtractOptions, run_extract

    _streaming_setup()

    def line(rep, i: int, n: int) -> None:
        if not quiet:
            typer.echo(f"[{i}/{n}] {rep.name} {list(rep.shape)}: " + (
                f"rank {rep.rank}, error {rep.error:.4f} (merged {rep.merged_error:.4f}), energy {rep.energy:.4f} "
                f"({rep.svd} SVD)"
                if rep.kind == "lora" else rep.kind))

    try:
        code = config_code(dtype)
        if code is None:
            raise ConfigError(f"--dtype: unsupported dtype {dtype!r} (use float32, float16 or bfloat16)")
        opts = ExtractOptions(rank=rank, energy=rank_by_energy, modules=tuple(modules or ()), dtype=code, seed=seed,
                              iters=iters, skip_embeddings=skip_embeddings, force=force, fsync=fsync)
        hub = HubAccess(offline=offline, say=lambda text: typer.echo(text, err=True))
        res = run_extract(finetuned, base, out, opts, on_tensor=line, hub=hub)
    except (SuperswallowError, OSError) as e:
        _fail(e)
        return
    s = res.summary()
    typer.echo(f"{res.out}: {s['lora']} LoRA modules (rank <= {s['max_rank']}), {s['saved']} tensors saved whole, "
               f"{s['unchanged']} unchanged, {s['left_out']} left out; relative error mean {s['mean_error']:.4f} "
               f"max {s['max_error']:.4f} (merged into the base: max {s['max_merged_error']:.4f}), "
               f"energy kept mean {s['mean_energy']:.4f}")
    for t in res.tensors:
        if t.kind == "left out":
            typer.echo(f"warning: {t.name}: left out: {t.note}", err=True)


@app.command()
def tiny(
    out: Path = typer.Argument(Path("models"), help="folder for the tiny models"),
    preset: str = typer.Option("tiny", help="tiny (seconds), 1.3gb (a ~1.3 GB pair for speed/memory work) or 7b (Llama-2-7B shapes, 13.5 GB per model, for big hosts)"),
    seed: int = typer.Option(0, help="generator seed"),
    model: Optional[list[str]] = typer.Option(None, "--model", help="only this model (repeatable; default: all four for tiny, swallow and tulu for 1.3gb)"),
    published: bool = typer.Option(False, "--published", help="save llama, swallow and tulu as the real repos are: .bin weights for llama and tulu (sharded), safetensors for swallow, sentencepiece-only tokenizers"),
) -> None:
    """Make tiny Llama-shaped checkpoints (llama, swallow, tulu, hermes) locally."""
    from superswallow_jax.errors import SuperswallowError
    from superswallow_jax.tiny import make_tiny_models

    _imports_done()

    try:
        made = make_tiny_models(out, preset=preset, seed=seed, progress=lambda msg: typer.echo(msg), models=model or None,
                                published=published)
    except (SuperswallowError, OSError) as e:
        _fail(e)
        return
    for name, path in made.items():
        typer.echo(f"{name}: {path}")


@app.command()
def methods() -> None:
    """List the merge methods with their parameters, defaults and a one-line description."""
    from superswallow_jax.registry import METHODS

    _imports_done()

    def fmt(p) -> str:
        return f"{p.name}={'required' if p.required else p.default}"

    for name in sorted(METHODS):
        m = METHODS[name]
        typer.echo(f"{name}: {m.doc}")
        typer.echo(f"    base model: {m.base}")
        if m.per_model:
            typer.echo("    per model: " + ", ".join(fmt(p) for p in m.per_model.values()))
        if m.global_:
            typer.echo("    global:    " + ", ".join(fmt(p) for p in m.global_.values()))


@app.command("hash")
def hash_cmd(
    model: Path = typer.Argument(..., help="model folder (safetensors, single or sharded)"),
    tensors: bool = typer.Option(False, "--tensors", help="also list each tensor's digest"),
) -> None:
    """Print one digest of a model folder's tensors (names, dtypes, shapes, bytes).

    It does not depend on how tensors are split into shards or ordered.
    """
    from superswallow_jax import manifest as mf
    from superswallow_jax.errors import SuperswallowError

    _imports_done()
    try:
        digests = mf.folder_digests(model)
    except (SuperswallowError, OSError) as e:
        _fail(e)
        return
    if tensors:
        for d in sorted(digests.values(), key=lambda d: d.name):
            typer.echo(f"{d.sha256}  {d.name}  {d.dtype}{list(d.shape)}")
    typer.echo(f"{mf.model_digest(digests.values())}  {model}")


@app.command()
def verify(
    config: Path = typer.Argument(..., help="the merge config that is claimed to produce OUT"),
    out: Path = typer.Argument(..., help="the merged model folder to check"),
    seed: Optional[int] = typer.Option(None, help="seed (default: the one OUT's manifest records, else 0)"),
    tensors: Optional[list[str]] = typer.Option(None, "--tensors", help="only check tensors matching this glob or substring (repeatable); the files are always checked"),
    against: Optional[Path] = typer.Option(None, help="compare OUT's tensors with this folder's instead of re-running CONFIG"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    offline: bool = typer.Option(False, "--offline", help=OFFLINE_HELP),
) -> None:
    """Check that OUT is exactly what CONFIG makes: every file, shard header and tensor, and the manifest.

    A multi-stage recipe is replayed: its earlier stages are merged again into a
    temporary folder beside OUT and checked against the stages OUT's manifest records.

    The merge is re-run as a stream (nothing written) with the options OUT's
    manifest records. Exit 0 only on a full match; otherwise each difference
    is listed by file or tensor and the exit code is 1. A model given by
    Hugging Face id is read at the commit OUT's manifest records (downloaded
    into the Hugging Face cache if it is not there, unless --offline).
    """
    from superswallow_jax import manifest as mf
    from superswallow_jax.errors import SuperswallowError, VerifyError
    from superswallow_jax.io.hub import HubAccess
    from superswallow_jax.recipe import load_recipe
    from superswallow_jax.verify import verify_folder, verify_recipe

    _streaming_setup()
    try:
        recipe, select = load_recipe(config), mf.make_selector(tensors)
        say = lambda line: typer.echo(line, err=True)  # noqa: E731
        bar = _Bar(quiet)
        hub = HubAccess(offline=offline, progress=bar.download, say=say)
        try:
            if recipe.multi and against is None:
                rep = verify_recipe(recipe, out, seed=seed, select=select, say=say, hub=hub)
            else:
                rep = verify_folder(recipe.final.config, out, seed=seed, select=select, against=against, hub=hub)
        finally:
            bar.stop()
        for f in rep.findings:
            typer.echo(f.line())
        typer.echo(f"{rep.tensors_matched} of {rep.tensors_checked} tensors match; {rep.files_checked} files checked; "
                   f"{len(rep.findings)} differences")
        if not rep.ok:
            what = f"the folder {against}" if against else f"{config} (seed {rep.seed})"
            raise VerifyError(f"{out} does not match {what}")
    except (SuperswallowError, OSError) as e:
        _fail(e)


class _Interrupted(BaseException):
    """SIGINT or SIGTERM, raised in the main thread (not a KeyboardInterrupt, which click
    would turn into its own exit); the exit status is 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.code = 128 + signum


def _interrupted(signum, frame) -> None:
    raise _Interrupted(signum)


def _distributed_active() -> bool:
    if "jax" not in sys.modules:  # nothing started it (and --help stays fast)
        return False
    from superswallow_jax.devices import distributed_active

    return distributed_active()


def main() -> None:
    """Console-script entry point.

    Ends the process with ``os._exit`` once the command has returned and
    stdout/stderr are flushed: every file a command writes is closed (and
    fsynced) before it returns, and the interpreter's teardown of JAX's
    runtime and thread pools took 0.15-0.25 s after a merge, for nothing.
    A multi-process run exits normally (JAX's exit handler shuts the
    distributed runtime down cleanly).
    """
    code = 0
    gc.disable()  # until the command's imports are done: see _imports_done
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup and background jobs keep ignoring it
            signal.signal(sig, _interrupted)
    try:
        app()
    except SystemExit as e:  # click/typer end every command with sys.exit
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except _Interrupted as e:
        typer.echo("interrupted", err=True)  # the command's own clean-up ran as the exception passed
        code = e.code
    if _distributed_active():
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
