"""Multi-stage recipes (mergekit-multi): several merges in one YAML file, later ones reading earlier ones.

A recipe file holds several YAML documents, each a merge config with a
``name:``; a model reference equal to an earlier document's name reads that
stage's output. At most one document has no name: it is the final merge,
written to OUT (without one, the last document is). A file with one unnamed
document is an ordinary config.

:func:`parse_recipe` checks the names (unique, strings), the references
(cycles are one-line errors) and orders the stages so that every stage
comes after the stages it reads. :func:`run_recipe` runs them: every stage
but the final one into an intermediate folder (``--intermediate-dir``,
default ``.<OUT>.superswallow-stages`` beside OUT), each with the full
commit protocol, so a rerun after a crash reuses every finished stage whose
manifest matches (its config, the options that change bytes, and its
inputs' digests) and resumes the interrupted one. An intermediate stage is
deleted once every stage that reads it is done, unless ``keep_intermediate``.

Random masks of a named stage come from keys that fold in the stage name
(:func:`superswallow_jax.prng.tensor_key_data`); the final stage's manifest
records every stage (its config digest, input digests and model digest).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import yaml

from . import manifest as mf
from .lora.reference import split_reference
from .config import MergeConfig, load_yaml, StrictLoader, parse_config, read_config_text
from .errors import ConfigError, ModelError, short
from .options import MergeOptions

__all__ = ["Recipe", "Stage", "check_references", "describe", "load_recipe", "parse_recipe", "run_recipe", "stage_dirs"]


@dataclass(frozen=True)
class Stage:
    name: str | None  # None: the unnamed final merge
    config: MergeConfig
    reads: tuple[str, ...]  # names of the stages it reads

    @property
    def label(self) -> str:
        return self.name if self.name is not None else "(final)"


@dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]  # every stage after the stages it reads; the final one last
    file: str = "<config>"  # for messages

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    @property
    def multi(self) -> bool:
        return len(self.stages) > 1 or self.final.name is not None


def _documents(text: str, file: str) -> list[tuple[str, dict]]:
    """(source text, parsed mapping) of every non-empty YAML document."""
    out = []
    try:
        nodes = list(yaml.compose_all(text, Loader=StrictLoader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"{file}: invalid YAML{f' at line {mark.line + 1}' if mark else ''}") from None
    except RecursionError:
        raise ConfigError(f"{file}: the YAML is nested too deeply") from None
    for node in nodes:
        if node is None:
            continue
        doc_text = text[node.start_mark.index:node.end_mark.index]
        data = load_yaml(doc_text, file)
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: line {node.start_mark.line + 1}: each document must be a mapping")
        out.append((doc_text, data))
    return out


def _refs(cfg: MergeConfig) -> set[str]:
    """The models a stage reads (a tokenizer source must be one of them, so it adds none); of a
    ``base+adapter`` reference, the base (which may be a stage)."""
    return {split_reference(r)[0] for r in cfg.referenced_models()}


def _adapters(cfg: MergeConfig) -> set[str]:
    """The LoRA adapters of a stage's ``base+adapter`` references."""
    return {a for r in cfg.referenced_models() if (a := split_reference(r)[1]) is not None}


def _order(stages: dict[str | None, Stage], file: str) -> list[Stage]:
    """Depth-first: every stage after the stages it reads; a cycle is an error naming it."""
    done: dict[str | None, Stage] = {}

    def visit(name: str | None, path: tuple) -> None:
        if name in done:
            return
        if name in path:
            cycle = " -> ".join(str(n) for n in (*path[path.index(name):], name))
            raise ConfigError(f"{file}: the stages form a cycle: {cycle}")
        for dep in stages[name].reads:
            visit(dep, (*path, name))
        done[name] = stages[name]

    for name in stages:
        visit(name, ())
    return list(done.values())


def parse_recipe(text: str, path: Path | None = None) -> Recipe:
    """Parse a config or a multi-stage recipe (see the module docstring). Raises ConfigError."""
    file = str(path) if path else "<config>"
    docs = _documents(text, file)
    if len(docs) <= 1 and not (docs and "name" in docs[0][1]):
        cfg = parse_config(text, path)  # the whole file: its comments are part of the card
        return Recipe((Stage(None, cfg, ()),), file)
    stages: dict[str | None, Stage] = {}
    order: list[str | None] = []
    for doc_text, data in docs:
        name = data.get("name")
        if name is not None and (not isinstance(name, str) or not name.strip() or "/" in name):
            raise ConfigError(f"{file}: name: {short(name)} must be a plain non-empty string")
        if name in stages:
            raise ConfigError(f"{file}: name: {short(name)} is given to two stages" if name is not None
                              else f"{file}: two documents have no name; only the final merge may be unnamed")
        cfg = parse_config(doc_text, path, allow_name=True)
        stages[name] = Stage(name, cfg, ())
        order.append(name)
    names = {n for n in stages if n is not None}
    for name in order:
        reads = tuple(sorted(r for r in _refs(stages[name].config) if r in names))
        stages[name] = replace(stages[name], reads=reads)
    final = None if None in stages else order[-1]
    ordered = [s for s in _order(stages, file) if s.name != final] + [stages[final]]
    for s in ordered:
        if s.name == final and s.name is not None and any(final in t.reads for t in ordered):
            raise ConfigError(f"{file}: the final stage {short(final)} is read by another stage")
    return Recipe(tuple(ordered), file)


def load_recipe(path: Path) -> Recipe:
    """Read and parse a config or recipe file (see :func:`parse_recipe`)."""
    return parse_recipe(read_config_text(path), Path(path))


def check_references(recipe: Recipe, hub=None) -> None:
    """Every model a stage names is an earlier stage or a model that resolves (before anything runs).

    Raises ConfigError naming the stage and the reference. ``hub``: how
    Hugging Face ids may reach the Hub (:class:`~superswallow_jax.io.hub.HubAccess`;
    a model by id is downloaded here, before any stage runs).
    """
    from .io.model_dir import resolve_model_dir

    names = {s.name for s in recipe.stages if s.name is not None}
    for s in recipe.stages:
        for ref in sorted(_refs(s.config) - names):
            try:
                resolve_model_dir(ref, hub)
            except ModelError as e:
                stages = ", ".join(sorted(names)) or "none"
                raise ConfigError(f"{recipe.file}: stage {s.label}: model {short(ref)} is neither a stage of this recipe "
                                  f"({stages}) nor a model that resolves: {e}") from None
        for ad in sorted(_adapters(s.config)):
            try:
                resolve_model_dir(ad, hub, "adapter")
            except ModelError as e:
                raise ConfigError(f"{recipe.file}: stage {s.label}: {e}") from None


def stage_dirs(recipe: Recipe, out: Path, intermediate_dir: Path | None) -> dict[str, Path]:
    """Folder of every named stage but the final one."""
    out = Path(out).expanduser().resolve()
    base = Path(intermediate_dir).expanduser().resolve() if intermediate_dir else out.parent / f".{out.name}.superswallow-stages"
    return {s.name: base / s.name for s in recipe.stages[:-1]}


def _raw_inputs(stage: Stage, names: set, hub=None) -> dict[str, Path]:
    """Weight files and config.json of every model a stage reads that is not a stage, by ``<ref>/<file>``."""
    from .io.checkpoint import Checkpoint
    from .io.model_dir import resolve_model_dir
    from .lora.adapter import Adapter

    files: dict[str, Path] = {}
    for ref in sorted(_refs(stage.config) - names):
        d = resolve_model_dir(ref, hub)
        with Checkpoint(d) as ck:
            for f in [*ck.files, d / "config.json"]:
                files[f"{ref}/{f.name}"] = f
    for ad in sorted(_adapters(stage.config)):
        adapter = Adapter(ad, resolve_model_dir(ad, hub, "adapter"))
        for f in adapter.files:
            files[f"{ad}/adapter/{f.name}"] = f
        adapter.close()
    return files


def identities(recipe: Recipe, opts: MergeOptions, hub=None) -> dict:
    """Each stage's identity: a digest of its name, config, byte options, raw inputs' sha256 and the
    identities of the stages it reads. Equal identities make equal bytes, so a finished stage with
    this identity is reused; it needs no earlier stage's output on disk (those may be deleted)."""
    import hashlib
    import json

    names = {s.name for s in recipe.stages if s.name is not None}
    ids: dict = {}
    for s in recipe.stages:
        raw = mf.InputHasher(_raw_inputs(s, names, hub)).start().join()
        rec = {"stage": s.name, "config_sha256": mf.config_hash(s.config.normalized), "options": opts.recorded(),
               "inputs": raw, "stages": {n: ids[n] for n in s.reads}}
        ids[s.name] = hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()
    return ids


def _finished(folder: Path, identity: str) -> bool:
    """A committed stage output (its manifest is written last) made with this identity."""
    man = mf.read_manifest(folder) if (folder / mf.MANIFEST_NAME).is_file() else None
    return bool(man) and man.get("stage_identity") == identity


def _to_run(recipe: Recipe, reusable: set) -> set:
    """The stages to merge: the final one, and every stage a stage to merge reads that is not reusable."""
    run = {recipe.final.name}
    for s in reversed(recipe.stages[:-1]):
        needed = any(s.name in t.reads for t in recipe.stages if t.name in run)
        if needed and s.name not in reusable:
            run.add(s.name)
    return run


def _record(path: Path, name: str, folder: Path, identity: str) -> dict:
    """This stage's entry in ``stages.json`` (kept after the stage's folder is deleted) and the final manifest."""
    import json

    rec = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    man = mf.read_manifest(folder) or {}
    rec[name] = {"identity": identity, **{k: man.get(k) for k in ("config_sha256", "input_files_sha256",
                                                                  "model_digest", "hub_inputs")}}
    path.write_text(json.dumps(rec, indent=1, sort_keys=True), encoding="utf-8")
    return rec[name]


def run_recipe(recipe: Recipe, out_dir: Path, opts: MergeOptions, *, intermediate_dir: Path | None = None,
               keep_intermediate: bool = False, say: Callable[[str], None] = lambda _line: None,
               run: Callable | None = None, hub=None):
    """Run the stages in order (see the module docstring); returns the final stage's MergeResult.

    ``run(cfg, out, opts, stage=..., aliases=..., manifest_extra=...)`` is
    :func:`superswallow_jax.merge.run_merge` with the caller's progress hooks;
    ``hub`` (:class:`~superswallow_jax.io.hub.HubAccess`) is passed to it and
    to the resolution of every model before the first stage.
    """
    import json

    from .merge import run_merge

    run = run or run_merge
    check_references(recipe, hub)
    dirs = stage_dirs(recipe, out_dir, intermediate_dir)
    ids = identities(recipe, opts, hub)
    reusable = {n for n, d in dirs.items() if _finished(d, ids[n])}
    todo = _to_run(recipe, reusable)
    readers = {n: {s.name for s in recipe.stages if n in s.reads} for n in dirs}
    root = _root(dirs)
    records_file = root / "stages.json" if root else None
    old = json.loads(records_file.read_text(encoding="utf-8")) if records_file and records_file.is_file() else {}
    records: dict[str, dict] = {}
    done: set = set()
    for stage in recipe.stages[:-1]:
        folder = dirs[stage.name]
        if stage.name in todo:
            say(f"stage {stage.label}: merging into {folder}")
            stale = (folder / mf.MANIFEST_NAME).is_file()  # finished, but not with this identity: replace it
            run(stage.config, folder, replace(opts, force=stale), stage=stage.name, aliases=dirs,
                manifest_extra={"stage_identity": ids[stage.name]}, hub=hub)
            records[stage.name] = _record(records_file, stage.name, folder, ids[stage.name])
        elif stage.name in reusable:
            say(f"stage {stage.label}: reusing {folder} (finished earlier with the same config, options and inputs)")
            records[stage.name] = _record(records_file, stage.name, folder, ids[stage.name])
        else:
            say(f"stage {stage.label}: not needed (every stage that reads it is finished)")
            records[stage.name] = old.get(stage.name) or {"identity": ids[stage.name]}
        done.add(stage.name)
        _drop_finished(dirs, readers, done, keep_intermediate, say)
    final = recipe.final
    say(f"stage {final.label}: merging into {Path(out_dir)}")
    res = run(final.config, out_dir, opts, stage=final.name, aliases=dirs,
              manifest_extra={"stages": records, "stage_identity": ids[final.name]}, hub=hub)
    done.add(final.name)
    _drop_finished(dirs, readers, done, keep_intermediate, say)
    if not keep_intermediate and root is not None:
        _remove_root(root, records_file)
    return res


def _remove_root(root: Path, records_file: Path) -> None:
    """Remove ``stages.json`` and the intermediate folder if nothing else is in it (it may be the user's)."""
    records_file.unlink(missing_ok=True)
    try:
        root.rmdir()
    except OSError:
        pass  # not empty: a stage kept, or files that are not ours


def _root(dirs: dict[str, Path]) -> Path | None:
    if not dirs:
        return None
    root = next(iter(dirs.values())).parent
    root.mkdir(parents=True, exist_ok=True)
    return root


def _drop_finished(dirs: dict[str, Path], readers: dict[str, set], done: set, keep: bool,
                   say: Callable[[str], None]) -> None:
    """Delete the intermediate stages every reader of which is done (disk), unless ``keep``."""
    if keep:
        return
    for name, folder in dirs.items():
        if name in done and readers[name] and readers[name] <= done and folder.exists():
            shutil.rmtree(folder)
            say(f"stage {name}: intermediate output deleted (no later stage reads it)")


def describe(recipe: Recipe, dirs: dict[str, Path]) -> list[str]:
    """The stage graph for ``plan``."""
    lines = [f"recipe: {len(recipe.stages)} stages, run in this order:"]
    for s in recipe.stages:
        where = dirs.get(s.name, "OUT") if s is not recipe.final else "OUT"
        reads = f" reads {', '.join(s.reads)}" if s.reads else ""
        lines.append(f"  {s.label}: {s.config.merge_method} of {len(s.config.referenced_models())} models{reads} -> {where}")
    return lines

