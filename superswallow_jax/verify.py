"""``verify``: is a model folder exactly what a config makes? Every file, not only the tensors.

:func:`verify_folder` rebuilds, from the config and the options OUT's
manifest recorded (seed, ``out_dtype``, shard size), everything the merge
would write and compares it with OUT:

* every small file (``config.json``, tokenizer files, model card,
  ``mergekit_config.yml``, the index) byte for byte;
* every shard's header (names, dtypes, shapes, offsets, ``__metadata__``);
* every tensor's bytes, by digest (the merge re-run as a stream; or, with
  ``against``, another folder's tensors);
* the manifest against itself and against the folder: the recorded config,
  seed and options; each listed file's sha256, each tensor's digest and the
  model digest against what is there; the list of files against the folder.

Each difference is one :class:`Finding` naming the file (or tensor). A
``tensors`` selection that matches nothing is an error, not a pass.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from . import __version__
from . import manifest as mf
from .config import MergeConfig
from .errors import ConfigError, ModelError
from .extras import extra_files
from .io.hub import HubAccess
from .io.reader import INDEX_NAME
from .io.writer import index_json
from .options import MergeOptions
from .plan import build_plan

__all__ = ["Finding", "Report", "verify_folder", "verify_recipe"]


@dataclass(frozen=True)
class Finding:
    kind: str  # MISMATCH (tensor), MISSING, EXTRA, DIFFERS (file)
    name: str
    detail: str = ""

    def line(self) -> str:
        return f"{self.kind} {self.name}" + (f": {self.detail}" if self.detail else "")


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    tensors_checked: int = 0
    tensors_matched: int = 0
    files_checked: int = 0
    seed: int = 0

    @property
    def ok(self) -> bool:
        return not self.findings

    def add(self, kind: str, name: str, detail: str = "") -> None:
        self.findings.append(Finding(kind, name, detail))


def _pinned(hub: HubAccess | None, manifest: dict | None) -> HubAccess:
    """``hub`` with every model by id pinned to the commit ``manifest`` records for it."""
    from dataclasses import replace

    hub = hub or HubAccess()
    return replace(hub, pins={**mf.pins(manifest), **hub.pins})


def _sha(path: Path) -> str:
    return mf.file_sha256(path)


def _options(manifest: dict | None, seed: int | None) -> MergeOptions:
    rec = dict((manifest or {}).get("options") or {})
    if not rec and manifest and "seed" in manifest:
        rec = {"seed": manifest["seed"]}
    if seed is not None:
        rec["seed"] = seed
    try:
        return MergeOptions(fsync=False, **{k: v for k, v in rec.items() if k in MergeOptions.__dataclass_fields__})
    except (TypeError, ConfigError) as e:
        raise ModelError(f"{mf.MANIFEST_NAME}: options are not valid ({e})") from None


def _check_files(out: Path, expected: dict[str, bytes], rep: Report) -> None:
    for name, data in sorted(expected.items()):
        p = out / name
        rep.files_checked += 1
        if not p.is_file():
            rep.add("MISSING", name)
        elif p.stat().st_size != len(data) or _sha(p) != hashlib.sha256(data).hexdigest():
            rep.add("DIFFERS", name, "not the bytes the config makes")


def _check_headers(out: Path, layouts, rep: Report) -> None:
    for lay in layouts:
        p = out / lay.filename
        rep.files_checked += 1
        if not p.is_file():
            rep.add("MISSING", lay.filename)
            continue
        with open(p, "rb") as f:
            head = f.read(len(lay.header))
        if head != lay.header:
            rep.add("DIFFERS", lay.filename, "header (names, dtypes, shapes, offsets or __metadata__)")
        elif p.stat().st_size != lay.size:
            rep.add("DIFFERS", lay.filename, f"{p.stat().st_size} bytes, expected {lay.size}")


def _check_manifest(out: Path, man: dict, cfg: MergeConfig, opts: MergeOptions, expected_files: set[str],
                    actual: dict[str, mf.TensorDigest], rep: Report) -> None:
    name = mf.MANIFEST_NAME
    want = {"config_sha256": mf.config_hash(cfg.normalized), "config": json.loads(cfg.normalized),
            "seed": opts.seed, "merge_method": cfg.method.name}
    if "options" in man:
        want["options"] = opts.recorded()
    for k, v in want.items():
        if man.get(k) != v:
            rep.add("DIFFERS", name, f"{k} is not this config's")
    listed = man.get("files")
    if isinstance(listed, list) and set(listed) != expected_files:
        odd = sorted(set(listed) ^ expected_files)
        rep.add("DIFFERS", name, f"files lists {', '.join(odd[:3])} differently from the merge")
    for f, sha in sorted((man.get("files_sha256") or {}).items()):
        p = out / f
        if not p.is_file():
            rep.add("MISSING", f, f"listed in {name}")
        elif _sha(p) != sha:
            rep.add("DIFFERS", f, f"its sha256 is not the one {name} records")
    tensors = man.get("tensors") or {}
    for n, t in sorted(tensors.items()):
        d = actual.get(n)
        if d is not None and (not isinstance(t, dict) or t.get("sha256") != d.sha256):
            rep.add("DIFFERS", name, f"tensor {n}'s digest is not the tensor's")
    if tensors and actual and set(tensors) == set(actual) and man.get("model_digest") != mf.model_digest(actual.values()):
        rep.add("DIFFERS", name, "model_digest is not the tensors'")


def verify_folder(cfg: MergeConfig, out: Path, *, seed: int | None = None, select: Callable[[str], bool] | None = None,
                  against: Path | None = None, progress: Callable[[int], None] | None = None,
                  stage: str | None = None, aliases: Mapping[str, Path] | None = None,
                  rep: Report | None = None, hub: HubAccess | None = None) -> Report:
    """Compare folder ``out`` with what ``cfg`` makes (see the module docstring).

    ``stage``/``aliases``: the final stage of a recipe and its earlier stages' folders (:func:`verify_recipe`).
    ``hub``: how Hugging Face ids may reach the Hub; each id is resolved to the
    commit the manifest records for it (downloaded if it is not in the cache).
    """
    from .merge import verify_stream

    out = Path(out)
    man = mf.read_manifest(out)
    opts = _options(man, seed)
    rep = rep or Report()
    rep.seed = opts.seed
    hub = _pinned(hub, man)
    plan = build_plan(cfg, shard_size=opts.shard_size, out_dtype=opts.out_dtype, aliases=aliases, hub=hub,
                      seed=opts.seed)
    hub_inputs = mf.hub_inputs(plan)
    with plan:
        if select is not None and not any(select(s.name) for s in plan.steps):
            raise ConfigError("--tensors: the pattern matches no tensor of this merge")
        layouts = list(plan.layout.files)
        files = extra_files(plan, out.name)
        files[INDEX_NAME] = index_json(layouts, plan.layout.specs, {"superswallow_jax": __version__})
    _check_files(out, files, rep)
    _check_headers(out, layouts, rep)
    actual = mf.folder_digests(out, select)
    if against is not None:
        expected = mf.folder_digests(against, select)
    else:
        expected = verify_stream(cfg, opts, select, progress, stage=stage, aliases=aliases, hub=hub)
    res = mf.compare(expected, actual)
    rep.tensors_checked = len(set(expected) | set(actual))
    rep.tensors_matched = len(res.matched)
    for kind, names in (("MISMATCH", res.mismatched), ("MISSING", res.missing), ("EXTRA", res.extra)):
        for n in names:
            rep.add(kind, n)
    all_files = {*files, *(lay.filename for lay in layouts), mf.MANIFEST_NAME}
    if man is None:
        rep.add("MISSING", mf.MANIFEST_NAME)
    else:
        _check_manifest(out, man, cfg, opts, all_files, actual if select is None else {}, rep)
        if "hub_inputs" in man and man["hub_inputs"] != hub_inputs:
            rep.add("DIFFERS", mf.MANIFEST_NAME, "hub_inputs is not what the config's models resolve to")
    return rep


def verify_recipe(recipe, out: Path, *, seed: int | None = None, select: Callable[[str], bool] | None = None,
                  progress: Callable[[int], None] | None = None, say: Callable[[str], None] = lambda _line: None,
                  hub: HubAccess | None = None) -> Report:
    """Replay a multi-stage recipe (:mod:`superswallow_jax.recipe`) and compare its final stage with ``out``.

    Every stage before the last is merged again into a temporary folder beside
    ``out`` (removed afterwards); each one's model digest and identity are
    compared with the stages ``out``'s manifest records, then the final stage
    is checked as :func:`verify_folder` checks a single merge. Models by id
    are resolved to the commits the manifest records (``hub``, see :func:`verify_folder`).
    """
    import shutil
    import tempfile
    from dataclasses import replace

    from .merge import run_merge
    from .recipe import check_references, identities

    out = Path(out)
    man = mf.read_manifest(out) or {}
    opts = replace(_options(man, seed), force=False, digests=True, file_digests=False)
    hub = _pinned(hub, man)
    check_references(recipe, hub)
    rep = Report()
    recorded = man.get("stages") if isinstance(man.get("stages"), dict) else {}
    ids = identities(recipe, opts, hub)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.superswallow-verify-", dir=out.resolve().parent))
    try:
        dirs = {s.name: tmp / s.name for s in recipe.stages[:-1]}
        for s in recipe.stages[:-1]:
            say(f"stage {s.label}: merging again into {dirs[s.name]}")
            res = run_merge(s.config, dirs[s.name], opts, stage=s.name, aliases=dirs, hub=hub)
            got = (mf.read_manifest(res.out_dir) or {}).get("model_digest")
            rec = recorded.get(s.name) or {}
            if not rec:
                rep.add("MISSING", mf.MANIFEST_NAME, f"no record of stage {s.name}")
            elif rec.get("model_digest") != got or rec.get("identity") != ids[s.name]:
                rep.add("DIFFERS", mf.MANIFEST_NAME, f"stage {s.name} is not what the recipe makes")
        if man.get("stage_identity") != ids[recipe.final.name]:
            rep.add("DIFFERS", mf.MANIFEST_NAME, "stage_identity is not this recipe's final stage")
        return verify_folder(recipe.final.config, out, seed=seed, select=select, progress=progress,
                             stage=recipe.final.name, aliases=dirs, rep=rep, hub=hub)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
