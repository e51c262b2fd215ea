"""Models by id from the Hugging Face Hub, through ``huggingface_hub``.

An id ``org/name`` or ``org/name@revision`` resolves **cache first**: when the
Hugging Face cache (the folder huggingface_hub writes, :func:`hub_cache_dir`)
holds a snapshot of the revision (``refs/<revision>``, or the commit itself)
with ``config.json`` and every weight file the reader will open, that folder
is used and the network is never touched. Otherwise, unless downloads are off
(``HubAccess.offline``, the CLI's ``--offline``, or ``HF_HUB_OFFLINE=1``), the
revision is resolved to a commit and only what a merge reads is downloaded
into that cache, pinned to that commit:

1. the weight index, when the chosen format has one (a few kB), then the free
   space is checked against the bytes still to fetch;
2. ``config.json``, ``generation_config.json`` and the tokenizer files;
3. the weights, in the one format the reader will use (safetensors when the
   repo has them, else ``.bin``; :func:`~.checkpoint.choose_weights`).

Each file lands whole (huggingface_hub downloads to a temporary file and
renames it), and the weights come last, so a snapshot with complete weights
has its small files too. A connection dropped in the middle of a file is
resumed by huggingface_hub from the bytes already received (an HTTP range
request); a run that is killed keeps the files it finished, and the next run
fetches only the rest.

huggingface_hub is imported only here, and only when an id is resolved: a
merge of local folders never loads it. The environment (``HF_HUB_CACHE``,
``HF_HOME``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_TOKEN``) is read when a
model is resolved. Every failure is one :class:`~superswallow_jax.errors.ModelError`
line naming the model: a gated or private repo (how to log in), an id or a
revision that does not exist, no network (the cache and ``--offline``), too
little disk space, a download cut off for good.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

from ..errors import ModelError, SafetensorsError, short
from .checkpoint import WeightChoice, choose_weights, read_index
from .model_dir import COPY_FILES, TOKENIZER_FILES

__all__ = ["HubAccess", "HubSource", "hub_cache_dir", "offline_by_env", "resolve_hub_adapter", "resolve_hub_model",
           "wanted_files"]

#: Values of HF_HUB_OFFLINE that mean "on" (huggingface_hub's own list).
_TRUE = {"1", "ON", "YES", "TRUE"}
_LOGIN = "log in with `hf auth login` or set HF_TOKEN"


@dataclass(frozen=True)
class HubSource:
    """Where a model given by id came from: ``repo_id``, the ``revision`` asked
    for (None: the default branch) and the ``commit`` (40 hex digits) it resolved to."""

    repo_id: str
    revision: str | None
    commit: str

    def record(self) -> dict:
        """The manifest's entry for this input."""
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}


@dataclass(frozen=True)
class HubAccess:
    """How model ids may reach the Hub.

    ``offline``: never touch the network (the cache only; so does
    ``HF_HUB_OFFLINE=1``). ``download``: False for a caller that must not
    download weights (``plan``): it may still ask the Hub what a download
    would fetch, to say so. ``pins``: model reference -> commit to use
    instead of the reference's revision (``verify`` replays the commits a
    manifest records). ``progress(label, total_bytes)`` returns the function
    that is called with each chunk's byte count; ``say`` gets one line per download.
    """

    offline: bool = False
    download: bool = True
    pins: Mapping[str, str] = field(default_factory=dict)
    progress: Callable[[str, int], Callable[[int], None]] | None = None
    say: Callable[[str], None] | None = None


def hub_cache_dir() -> Path:
    """The Hugging Face cache, as huggingface_hub finds it: ``$HF_HUB_CACHE`` (or the
    older ``$HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub`` or ``~/.cache/huggingface/hub``."""
    env = os.environ
    where = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not where:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        where = os.path.join(home, "hub")
    return Path(os.path.expandvars(where)).expanduser()


def offline_by_env() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return (value or "").upper() in _TRUE


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def _client() -> dict:
    """The keyword arguments every huggingface_hub call gets: the endpoint (read now) and who is asking."""
    from .. import __version__

    return {"endpoint": _endpoint(), "library_name": "superswallow_jax", "library_version": __version__}


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def resolve_hub_model(ref: str, access: HubAccess | None = None) -> tuple[Path, HubSource]:
    """The snapshot folder of Hub id ``ref`` (``org/name[@revision]``) and where it came from.

    From the cache when it holds the files, else downloaded (see the module
    docstring). Raises ModelError (one line) when neither works.
    """
    access = access or HubAccess()
    repo_id, _, revision = ref.partition("@")
    revision = revision or None
    want = access.pins.get(ref) or revision
    _check_id(ref, repo_id)
    cache = hub_cache_dir()
    snap = cached_snapshot(repo_id, want, cache)
    if snap is None:
        what = f"{repo_id}@{want}" if want else repo_id
        if access.offline or offline_by_env():
            raise ModelError(f"model {short(ref)}: {what} is not in the Hugging Face cache {cache} and downloads "
                             "are off (--offline or HF_HUB_OFFLINE=1); run once without them to download it")
        with _hub_errors(ref, repo_id, want, cache):
            snap = _fetch(ref, repo_id, want, cache, access)
    return snap, HubSource(repo_id, revision, snap.name)


#: The files of a PEFT LoRA adapter repo that a merge reads.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def resolve_hub_adapter(ref: str, access: HubAccess | None = None) -> tuple[Path, HubSource]:
    """The snapshot folder of the LoRA adapter repo ``ref`` (``org/name[@revision]``) and where it came from.

    The cache first; else (unless offline, or for ``plan``) a download of
    ``adapter_config.json`` and the adapter weights only. Raises ModelError (one line).
    """
    access = access or HubAccess()
    repo_id, _, revision = ref.partition("@")
    want = access.pins.get(ref) or revision or None
    _check_id(ref, repo_id, "adapter")
    cache = hub_cache_dir()
    snap = _cached_adapter(repo_id, want, cache)
    if snap is None:
        what = f"{repo_id}@{want}" if want else repo_id
        if access.offline or offline_by_env() or not access.download:
            why = ("plan reads only cached adapters: `superswallow merge` downloads it" if not access.download
                   else "downloads are off (--offline or HF_HUB_OFFLINE=1); run once without them to download it")
            raise ModelError(f"adapter {short(ref)}: {what} is not in the Hugging Face cache {cache}; {why}")
        with _hub_errors(ref, repo_id, want, cache, "adapter"):
            snap = _fetch_adapter(ref, repo_id, want, cache, access)
    return snap, HubSource(repo_id, revision or None, snap.name)


def _cached_adapter(repo_id: str, revision: str | None, cache: Path) -> Path | None:
    """The cache's snapshot of an adapter repo if it holds ``adapter_config.json`` and weights, else None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, ADAPTER_FILES[0], cache_dir=cache, revision=revision or "main")
    if not isinstance(found, str):
        return None
    snap = Path(found).parent
    return snap.resolve() if any((snap / n).is_file() for n in ADAPTER_FILES[1:]) else None


def _fetch_adapter(ref: str, repo_id: str, revision: str | None, cache: Path, access: HubAccess) -> Path:
    """Download ``adapter_config.json`` and the adapter's weights (safetensors if the repo has them)."""
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi(**_client())
    rev = api.resolve_revision(repo_id, revision=revision, cache_dir=cache)
    info = api.model_info(repo_id, revision=rev.resolved, files_metadata=True)
    if info.gated and _token() is None:
        raise ModelError(_gated(ref, repo_id, "adapter"))
    top = {x.rfilename for x in info.siblings or ()}
    weights = [n for n in ADAPTER_FILES[1:] if n in top][:1]
    if ADAPTER_FILES[0] not in top or not weights:
        raise ModelError(f"adapter {short(ref)}: {repo_id}@{rev.resolved[:12]} has no adapter_config.json with "
                         "adapter_model.safetensors or adapter_model.bin")
    if access.say is not None:
        access.say(f"downloading adapter {repo_id}@{revision or 'main'} (commit {rev.resolved})")
    for name in (ADAPTER_FILES[0], *weights):
        last = hf_hub_download(repo_id, name, revision=rev, cache_dir=cache, **_client())
    return Path(last).parent.resolve()


def _check_id(ref: str, repo_id: str, what: str = "model") -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ModelError(f"{what} {short(ref)}: not a Hugging Face id ({str(e).splitlines()[0]})") from None


def cached_snapshot(repo_id: str, revision: str | None, cache: Path) -> Path | None:
    """The cache's snapshot of ``repo_id`` at ``revision`` (a branch, tag or commit; None: main)
    if it holds ``config.json`` and complete weights, else None. Never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache, revision=revision or "main")
    if not isinstance(found, str):
        return None
    snap = Path(found).parent
    try:
        choice = choose_weights([p.name for p in snap.iterdir() if p.is_file()], str(snap))
    except (SafetensorsError, OSError):
        return None
    if choice is None:
        return None
    if choice.index is not None:
        try:
            needed = set(read_index(snap / choice.index).values())
        except SafetensorsError:
            return snap.resolve()  # a broken index is not fixed by downloading it again: the reader says what is wrong
    else:
        needed = set(choice.files)
    return snap.resolve() if all((snap / n).is_file() for n in needed) else None


def wanted_files(repo_files: Mapping[str, int | None], choice: WeightChoice, shards: list[str]) -> list[str]:
    """The files of a repo a merge reads, in download order: config.json,
    generation_config.json and the tokenizer files the repo has, then the
    weights (``choice.files``, or the index's ``shards``, sorted).
    ``repo_files``: every file of the repo (name -> size)."""
    small = [n for n in ("config.json", *COPY_FILES, *TOKENIZER_FILES) if n in repo_files]
    weights = sorted(set(shards)) if choice.index is not None else list(choice.files)
    return list(dict.fromkeys(small + weights))


def _listing(ref: str, repo_id: str, revision: str | None, cache: Path):
    """Resolve ``revision`` (writing ``refs/<revision>`` into the cache) and list what a merge needs:
    ``(resolved revision, {file: size})``, the index first when there is one (downloaded: it names the shards)."""
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi(**_client())
    rev = api.resolve_revision(repo_id, revision=revision, cache_dir=cache)
    info = api.model_info(repo_id, revision=rev.resolved, files_metadata=True)
    if info.gated and _token() is None:  # the Hub lists a gated repo to anyone but serves its files only with a token
        raise ModelError(_gated(ref, repo_id))
    sizes = {s.rfilename: s.size for s in info.siblings or ()}
    top = {n: s for n, s in sizes.items() if "/" not in n}
    where = f"{repo_id}@{rev.resolved[:12]}"
    choice = choose_weights(top, where)
    if choice is None:
        raise ModelError(f"model {short(ref)}: {where} has no weights superswallow reads "
                         "(model.safetensors[.index.json], *.safetensors or pytorch_model.bin[.index.json])")
    if "config.json" not in top:
        raise ModelError(f"model {short(ref)}: {where} has no config.json")
    shards: list[str] = []
    files: dict[str, int | None] = {}
    if choice.index is not None:
        index = Path(hf_hub_download(repo_id, choice.index, revision=rev, cache_dir=cache, **_client()))
        shards = sorted(set(read_index(index).values()))
        missing = [s for s in shards if s not in top]
        if missing:
            raise ModelError(f"model {short(ref)}: {choice.index} of {where} names {missing[0]}, which the repo lacks")
        files[choice.index] = top[choice.index]
    files.update({n: top[n] for n in wanted_files(top, choice, shards)})
    return rev, files


def _to_fetch(repo_id: str, commit: str, files: Mapping[str, int | None], cache: Path) -> dict[str, int]:
    """The files not yet in the cache's snapshot of ``commit``, with their sizes (0 when the Hub gave none)."""
    from huggingface_hub import try_to_load_from_cache

    return {n: s or 0 for n, s in files.items()
            if not isinstance(try_to_load_from_cache(repo_id, n, cache_dir=cache, revision=commit), str)}


def _free_bytes(path: Path) -> int:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent)."""
    for p in [path, *path.parents]:
        if p.exists():
            return shutil.disk_usage(p).free
    return shutil.disk_usage(Path.cwd()).free


def _fetch(ref: str, repo_id: str, revision: str | None, cache: Path, access: HubAccess) -> Path:
    """Download what a merge reads of ``repo_id`` at ``revision`` into ``cache``; the snapshot folder."""
    from huggingface_hub import hf_hub_download

    rev, files = _listing(ref, repo_id, revision, cache)
    todo = _to_fetch(repo_id, rev.resolved, files, cache)
    need = sum(todo.values())
    asked = revision or "main"
    if not access.download:
        raise ModelError(f"model {short(ref)}: {repo_id}@{asked} is not in the Hugging Face cache {cache}; "
                         f"plan reads only cached models: `superswallow merge` downloads {len(todo)} files "
                         f"({_size(need)}) of commit {rev.resolved[:12]}, or fetch them with `hf download {repo_id}`")
    free = _free_bytes(cache)
    if need > free:
        raise ModelError(f"model {short(ref)}: downloading {len(todo)} files ({_size(need)}) needs more space than "
                         f"the {_size(free)} free in {cache}; free some, or set HF_HUB_CACHE to a larger disk")
    if todo and access.say is not None:
        access.say(f"downloading {repo_id}@{asked} (commit {rev.resolved}): {len(todo)} files, {_size(need)}")
    advance = access.progress(f"downloading {repo_id}", need) if (todo and access.progress) else None
    bar = _bar_class(advance) if advance is not None else None
    last = None
    for name in files:
        last = hf_hub_download(repo_id, name, revision=rev, cache_dir=cache, tqdm_class=bar, **_client())
    snap = Path(last).parent if last else cache
    if cached_snapshot(repo_id, rev.resolved, cache) is None:
        raise ModelError(f"model {short(ref)}: downloaded, but {snap} is still incomplete")
    return snap.resolve()


def _bar_class(advance: Callable[[int], None]) -> type:
    """A class with the part of tqdm's interface huggingface_hub drives, sending byte counts to ``advance``."""

    class _Bytes:
        def __init__(self, *args, total=None, initial=0, **kwargs):
            self.n, self.total = initial or 0, total
            if initial:
                advance(int(initial))

        def update(self, n=1):
            self.n += n or 0
            advance(int(n or 0))

        def update_transfer(self, n=1):  # network bytes of a Xet download: the file bytes are counted in update
            pass

        def set_postfix_str(self, *args, **kwargs):
            pass

        set_transfer_postfix_str = set_postfix_str
        set_description = set_description_str = refresh = set_postfix_str

        def close(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    return _Bytes


@contextmanager
def _hub_errors(ref: str, repo_id: str, revision: str | None, cache: Path, what: str = "model") -> Iterator[None]:
    """huggingface_hub's and the network's exceptions as one ModelError line naming the model."""
    from huggingface_hub import errors as he
    from huggingface_hub.utils import OfflineModeIsEnabled, httpx  # httpx: the HTTP client huggingface_hub uses

    where = _endpoint() or "https://huggingface.co"
    head = f"{what} {short(ref)}"
    try:
        yield
    except he.GatedRepoError:
        raise ModelError(_gated(ref, repo_id, what)) from None
    except he.RepositoryNotFoundError:
        raise ModelError(f"{head}: {_not_found(repo_id, where)}") from None
    except he.RevisionNotFoundError:
        raise ModelError(f"{head}: {repo_id} has no revision {revision!r} "
                         "(a branch, tag or full commit hash)") from None
    except he.RemoteEntryNotFoundError as e:
        raise ModelError(f"{head}: a file listed in {repo_id} is missing on the Hub ({_first_line(e)})") from None
    except (httpx.TransportError, OfflineModeIsEnabled, he.RevisionResolutionError, he.LocalEntryNotFoundError) as e:
        raise ModelError(f"{head}: not in the Hugging Face cache {cache}, and the Hub ({where}) cannot be reached "
                         f"({type(e).__name__}); connect, or put the model in that cache "
                         "(--offline then uses it without trying the network)") from None
    except he.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise ModelError(f"{head}: the Hub ({where}) answered HTTP {status}: {_first_line(e)}") from None
    except OSError as e:  # disk full, a file that arrived with the wrong size, ...
        raise ModelError(f"{head}: download failed: {_first_line(e)}") from None


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def _gated(ref: str, repo_id: str, what: str = "model") -> str:
    where = _endpoint() or "https://huggingface.co"
    return f"{what} {short(ref)}: {repo_id} is gated: accept its conditions at {where}/{repo_id}, then {_LOGIN}"


def _not_found(repo_id: str, where: str) -> str:
    if _token() is None:
        return (f"no folder {repo_id} here, and {where} has no repo {repo_id} or it is private or gated and you "
                f"are not logged in: check the id, or {_LOGIN}")
    return (f"no folder {repo_id} here, and {where} has no repo {repo_id} or your token cannot read it: "
            "check the id and the token's access")


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (huggingface_hub's run to several), at most 200 characters."""
    text = next((x.strip() for x in str(e).splitlines() if x.strip()), type(e).__name__)
    return text if len(text) <= 200 else text[:197] + "..."
