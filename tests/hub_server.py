"""A stand-in for the Hugging Face Hub in the tests: the endpoints huggingface_hub calls to download a model.

* ``GET /api/models/{org}/{name}[/revision/{rev}]`` (``?blobs=true``): the model
  info, ``sha`` (the commit) and ``siblings`` (file names, sizes, LFS sha256);
* ``HEAD``/``GET /{org}/{name}/resolve/{rev}/{file}``: ``X-Repo-Commit``,
  ``ETag`` (the sha256 for LFS files, the git blob id for the others),
  ``Content-Length``, and ``Range: bytes=N-`` answered with 206.

Errors come as the Hub sends them: ``X-Error-Code`` ``RepoNotFound`` (401
without a token, 404 with one), ``GatedRepo`` (401 on files; the model info
of a gated repo is public), ``RevisionNotFound`` and ``EntryNotFound`` (404).
``cut[file] = n`` sends the first ``n`` bytes of the file's next full GET and
drops the connection; ``fail[file] = k`` answers its next ``k`` GETs with 500.
Every request is logged as ``(method, path, Range header)``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

TOKEN = "hf_standin_token"
LFS_SUFFIXES = (".safetensors", ".bin", ".onnx")


def commit_of(text: str) -> str:
    """A 40-hex commit id made from ``text``."""
    return hashlib.sha1(text.encode()).hexdigest()


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def etag_of(name: str, data: bytes) -> str:
    """The Hub's ETag: the sha256 of an LFS file, the git blob id of any other."""
    return hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else git_blob_id(data)


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> file name -> bytes
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    private: bool = False
    gated: bool = False


class StandInHub:
    """Serves ``repos`` on 127.0.0.1 (``url``) from a thread; ``with StandInHub() as hub:``."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str, str | None]] = []
        self.cut: dict[str, int] = {}
        self.fail: dict[str, int] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, repo_id: str, files: dict[str, bytes], ref: str = "main", **flags) -> str:
        """Commit ``files`` to ``repo_id`` under branch/tag ``ref``; returns the commit id."""
        repo = self.repos.setdefault(repo_id, Repo())
        for k, v in flags.items():
            setattr(repo, k, v)
        commit = commit_of(f"{repo_id}:{len(repo.commits)}:{sorted(files)}")
        repo.commits[commit] = dict(files)
        repo.refs[ref] = commit
        return commit

    def downloads(self) -> list[str]:
        """Paths of the file GETs so far (``org/name/resolve/rev/file``), in order."""
        return [p for m, p, _ in self.log if m == "GET" and "/resolve/" in p]

    def __enter__(self) -> "StandInHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(hub: StandInHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            self._route(body=True)

        def do_HEAD(self) -> None:
            self._route(body=False)

        def _route(self, body: bool) -> None:
            path = urlsplit(self.path).path
            hub.log.append((self.command, unquote(path), self.headers.get("Range")))
            parts = [unquote(p) for p in path.strip("/").split("/")]
            authed = self.headers.get("Authorization") == f"Bearer {TOKEN}"
            if parts[:2] == ["api", "models"] and len(parts) in (4, 6):
                self._info("/".join(parts[2:4]), parts[5] if len(parts) == 6 else "main", authed, body)
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._file("/".join(parts[:2]), parts[3], "/".join(parts[4:]), authed, body)
            else:
                self._send(404, {"error": "no such endpoint"}, body)

        def _repo(self, repo_id: str, rev: str, authed: bool, body: bool, file: bool):
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not authed):
                self._send(404 if authed else 401, {"error": "Repository not found"}, body,
                           {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
                return None
            if repo.gated and file and not authed:
                msg = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
                self._send(401, {"error": msg}, body, {"X-Error-Code": "GatedRepo", "X-Error-Message": msg})
                return None
            commit = repo.refs.get(rev, rev if rev in repo.commits else None)
            if commit is None:
                msg = f"Invalid rev id: {rev}"
                self._send(404, {"error": msg}, body, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": msg})
                return None
            return repo, commit

        def _info(self, repo_id: str, rev: str, authed: bool, body: bool) -> None:
            found = self._repo(repo_id, rev, authed, body, file=False)
            if found is None:
                return
            repo, commit = found
            siblings = []
            for name, data in sorted(repo.commits[commit].items()):
                s = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
                if name.endswith(LFS_SUFFIXES):
                    s["lfs"] = {"size": len(data), "sha256": etag_of(name, data), "pointerSize": 134}
                siblings.append(s)
            self._send(200, {"id": repo_id, "modelId": repo_id, "sha": commit, "private": repo.private,
                             "gated": "manual" if repo.gated else False, "siblings": siblings}, body)

        def _file(self, repo_id: str, rev: str, name: str, authed: bool, body: bool) -> None:
            found = self._repo(repo_id, rev, authed, body, file=True)
            if found is None:
                return
            repo, commit = found
            data = repo.commits[commit].get(name)
            if data is None:
                self._send(404, {"error": "Entry not found"}, body,
                           {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
                return
            if body and hub.fail.get(name):
                hub.fail[name] -= 1
                self._send(500, {"error": "Internal Error"}, body)
                return
            start = 0
            rng = self.headers.get("Range")
            if body and rng and rng.startswith("bytes="):
                start = int(rng[len("bytes="):].split("-")[0])
            headers = {"X-Repo-Commit": commit, "ETag": f'"{etag_of(name, data)}"', "Accept-Ranges": "bytes"}
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self.send_response(206 if start else 200)
            for k, v in {**headers, "Content-Length": str(len(data) - start),
                         "Content-Type": "application/octet-stream"}.items():
                self.send_header(k, v)
            self.end_headers()
            if not body:
                return
            cut = hub.cut.pop(name, None) if not start else None
            if cut is not None:
                self.wfile.write(data[:cut])
                self.wfile.flush()
                self.close_connection = True  # the rest never comes: the client sees the body cut short
                return
            self.wfile.write(data[start:])

        def _send(self, status: int, obj: dict, body: bool, headers: dict | None = None) -> None:
            raw = json.dumps(obj).encode()
            self.send_response(status)
            for k, v in {**(headers or {}), "Content-Type": "application/json",
                         "Content-Length": str(len(raw))}.items():
                self.send_header(k, v)
            self.end_headers()
            if body:
                self.wfile.write(raw)

    return Handler
