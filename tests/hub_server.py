"""A local fake of the Hugging Face Hub's HTTP API, for tests that must not touch the network.

It is the one fake at the edge we cannot reach: the real ``huggingface_hub`` client and the real
``datasets.load_dataset`` talk to it over HTTP. It implements exactly the endpoints they use to
publish and read a repository (repo create, preupload, LFS batch + upload, NDJSON commit,
tags/branches/refs, pull requests, file resolve, tree listing, paths-info, repo info at a revision,
commit history, YAML validation) and keeps a real content-addressed, git-like history: every commit
has a sha computed from its tree, parents and message; branches and tags point at commits.

Tests use it to:

* record every request (:attr:`FakeHub.requests`) and assert what was sent;
* inject faults on chosen calls (:meth:`FakeHub.fail`): an HTTP status with optional
  ``Retry-After``, a dropped connection before the request is handled, or a dropped connection
  *after* it was handled (the response is lost but the change landed);
* run a hook when a chosen call arrives (:meth:`FakeHub.on`), e.g. to ``kill -9`` a client there.

Use the ``fake_hub`` fixture (import it into a test module: ``from hub_server import fake_hub``),
which starts a server on a free port and points this process at it (``HF_ENDPOINT``, xet off, a
private ``HF_HOME``, ``HF_TOKEN``); ``fake_hub.env`` holds the same variables for subprocesses.
``HF_ENDPOINT`` is read when ``huggingface_hub`` and ``datasets`` are imported, so in this process
the fixture also patches the constants they computed from it (see :func:`pointed_at`).

To read a dataset "from the Hub" without pushing it through a client, seed a repo directly::

    sha = fake_hub.put_folder("org/demo", build_folder, tag="v1.0.0")  # .synthgen/ left out
    datasets.load_dataset("org/demo", revision="v1.0.0")  # resolves to commit ``sha``
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

TOKEN = "hf_fakehubTOKEN0123456789abcdefSECRET"  # the only token the fake accepts for writes
USER = "tester"
TREE_PAGE_SIZE = 50  # entries per tree page; tests lower it to exercise pagination
LFS_SUFFIXES = (".parquet", ".png", ".jpg", ".jpeg", ".webp", ".safetensors", ".bin", ".pt", ".ckpt", ".arrow")
TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


# --------------------------------------------------------------------------------------------------
# the repository model: content-addressed blobs, trees, commits, refs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Blob:
    """A file in a tree. LFS files keep their content in the LFS store, keyed by sha256."""

    size: int
    oid: str  # git blob sha1 (of the content, or of the LFS pointer)
    sha256: Optional[str] = None  # set for LFS files

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None


@dataclass
class Commit:
    sha: str
    parents: list[str]
    tree: dict[str, Blob]
    title: str
    message: str
    date: str


@dataclass
class PullRequest:
    num: int
    title: str
    description: str
    author: str
    created_at: str
    status: str = "draft"
    target: str = "main"


@dataclass
class Repo:
    type: str  # model / dataset / space
    id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha
    tags: dict[str, str] = field(default_factory=dict)
    prs: dict[int, PullRequest] = field(default_factory=dict)

    def resolve(self, revision: str) -> Optional[str]:
        """A branch, tag, refs/heads/..., refs/tags/..., refs/pr/N or (short) commit sha -> sha."""
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        for prefix, refs in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            if revision.startswith(prefix) and revision[len(prefix):] in refs:
                return refs[revision[len(prefix):]]
        if revision.startswith("refs/pr/") and f"pr/{revision[8:]}" in self.branches:
            return self.branches[f"pr/{revision[8:]}"]
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            found = [sha for sha in self.commits if sha.startswith(revision)]
            if len(found) == 1:
                return found[0]
        return None

    def branch_of(self, revision: str) -> Optional[str]:
        """The branch name a commit to ``revision`` moves (refs/pr/N is stored as branch pr/N)."""
        if revision.startswith("refs/heads/"):
            revision = revision[len("refs/heads/"):]
        if revision.startswith("refs/pr/"):
            revision = f"pr/{revision[8:]}"
        return revision if revision in self.branches else None


class HubError(Exception):
    """An error response: status, JSON body and the ``X-Error-Code`` the client maps to exceptions."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


@dataclass
class Request:
    method: str
    path: str  # unquoted path, no query
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    status: Optional[int] = None  # the status sent back (None: connection dropped)
    fault: Optional[str] = None  # the fault injected on this request, if any
    at: float = field(default_factory=time.monotonic)  # when it arrived (time.monotonic)

    @property
    def authorized(self) -> bool:
        return self.headers.get("authorization") == f"Bearer {TOKEN}"

    def json(self) -> Any:
        return json.loads(self.body)

    def ndjson(self) -> list[dict]:
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]

    def matches(self, method: Optional[str], pattern: Optional[str]) -> bool:
        return (method is None or method == self.method) and (pattern is None or re.search(pattern, self.path) is not None)


@dataclass
class Fault:
    method: Optional[str]
    pattern: Optional[str]
    kind: str  # "status", "drop" (before handling) or "drop-after" (handled, response lost)
    status: int = 500
    retry_after: Optional[int] = None
    times: int = 1
    skip: int = 0  # let this many matching requests through first
    message: Optional[str] = None  # the error message of a "status" answer (default: "injected <status>")


# --------------------------------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------------------------------
class FakeHub:
    """The Hub's state plus an HTTP server on ``127.0.0.1`` serving it (see the module docstring)."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs: dict[str, bytes] = {}  # LFS store: sha256 -> content
        self.blobs: dict[str, bytes] = {}  # regular files: git blob sha1 -> content
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self.hooks: list[tuple[Optional[str], Optional[str], Callable[[Request], None]]] = []
        self.tree_page_size = TREE_PAGE_SIZE
        self.lock = threading.RLock()
        self._clock = 0
        self.server: Optional[ThreadingHTTPServer] = None
        self.thread: Optional[threading.Thread] = None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-hub", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def url(self) -> str:
        assert self.server is not None, "the fake hub is not running"
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    # -- test controls ----------------------------------------------------------------------------
    def fail(
        self,
        method: Optional[str],
        pattern: Optional[str],
        *,
        status: int = 500,
        kind: str = "status",
        retry_after: Optional[int] = None,
        times: int = 1,
        skip: int = 0,
        message: Optional[str] = None,
    ) -> Fault:
        """Make the next ``times`` requests matching ``method`` and the ``pattern`` regex (searched
        in the request path as sent, URL-quoted) fail: ``kind="status"`` answers ``status`` (with ``Retry-After`` if
        given; ``message`` as its error message), ``"drop"`` closes the connection unanswered, ``"drop-after"`` handles the request and
        then closes the connection (the change lands, the client never hears of it)."""
        assert kind in ("status", "drop", "drop-after")
        fault = Fault(method, pattern, kind, status, retry_after, times, skip, message)
        with self.lock:
            self.faults.append(fault)
        return fault

    def on(self, method: Optional[str], pattern: Optional[str], hook: Callable[[Request], None]) -> None:
        """Call ``hook(request)`` when a matching request arrives, before it is handled."""
        with self.lock:
            self.hooks.append((method, pattern, hook))

    def calls(self, method: Optional[str] = None, pattern: Optional[str] = None) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.matches(method, pattern)]

    def repo(self, repo_id: str, repo_type: str = "dataset") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "dataset") -> dict[str, bytes]:
        """Every file of ``repo_id`` at ``revision``, with its content."""
        repo = self.repo(repo_id, repo_type)
        sha = repo.resolve(revision)
        assert sha is not None, f"no revision {revision!r} in {repo_id}"
        return {path: self._content(blob) for path, blob in repo.commits[sha].tree.items()}

    def history(self, repo_id: str, revision: str = "main", repo_type: str = "dataset") -> list[Commit]:
        """Commits reachable from ``revision``, newest first (first parents)."""
        repo = self.repo(repo_id, repo_type)
        sha, out = repo.resolve(revision), []
        while sha is not None:
            commit = repo.commits[sha]
            out.append(commit)
            sha = commit.parents[0] if commit.parents else None
        return out

    # -- state changes ----------------------------------------------------------------------------
    def _content(self, blob: Blob) -> bytes:
        return self.lfs[blob.sha256] if blob.is_lfs else self.blobs[blob.oid]

    def _store_regular(self, data: bytes) -> Blob:
        oid = git_blob_sha1(data)
        self.blobs[oid] = data
        return Blob(size=len(data), oid=oid)

    def _store(self, path: str, data: bytes) -> Blob:
        """Store a file the way a push would: binary types in LFS, text as a git blob."""
        if not path.endswith(LFS_SUFFIXES):
            return self._store_regular(data)
        sha = hashlib.sha256(data).hexdigest()
        self.lfs[sha] = data
        return Blob(len(data), git_blob_sha1(lfs_pointer(sha, len(data))), sha)

    def _commit(self, repo: Repo, branch: str, tree: dict[str, Blob], title: str, message: str = "") -> Commit:
        parent = repo.branches.get(branch)
        self._clock += 1
        date = _now()
        tree_id = hashlib.sha1(
            "".join(f"{path}\0{blob.oid}\n" for path, blob in sorted(tree.items())).encode()
        ).hexdigest()
        header = f"tree {tree_id}\n" + (f"parent {parent}\n" if parent else "") + f"time {self._clock} {date}\n\n"
        sha = hashlib.sha1((header + title + "\n\n" + message).encode()).hexdigest()
        commit = Commit(sha, [parent] if parent else [], dict(tree), title, message, date)
        repo.commits[sha] = commit
        repo.branches[branch] = sha
        return commit

    def create_repo(self, repo_id: str, repo_type: str = "dataset", private: bool = False) -> Repo:
        """Create a repo the way the Hub does: one initial commit holding ``.gitattributes``."""
        with self.lock:
            assert (repo_type, repo_id) not in self.repos, f"{repo_id} exists"
            repo = Repo(repo_type, repo_id, private, _now())
            self.repos[(repo_type, repo_id)] = repo
            attributes = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
            self._commit(repo, "main", {".gitattributes": self._store_regular(attributes)}, "initial commit")
            return repo

    def put_files(self, repo_id: str, files: dict[str, bytes], repo_type: str = "dataset", message: str = "seed",
                  tag: Optional[str] = None, branch: str = "main") -> str:
        """Commit ``files`` (path -> bytes) to ``branch`` directly, creating the repo if needed, and
        optionally tag the commit: to set up a repo without going through a client. Its sha."""
        with self.lock:
            if (repo_type, repo_id) not in self.repos:
                self.create_repo(repo_id, repo_type)
            repo = self.repo(repo_id, repo_type)
            tree = dict(repo.commits[repo.branches.get(branch, repo.branches["main"])].tree)
            tree.update({path: self._store(path, data) for path, data in files.items()})
            sha = self._commit(repo, branch, tree, message).sha
            if tag is not None:
                assert tag not in repo.tags, f"tag {tag} exists"
                repo.tags[tag] = sha
            return sha

    def put_folder(self, repo_id: str, folder: str | Path, repo_type: str = "dataset", tag: Optional[str] = None,
                   message: str = "upload folder") -> str:
        """Commit every file of a local folder except hidden ones (``.synthgen/``) in one commit,
        e.g. a dataset folder from ``synthgen build``, so tests can read it from the "Hub"."""
        folder = Path(folder)
        files = {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        }
        return self.put_files(repo_id, files, repo_type, message, tag=tag)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    # ---------------------------------------------------------------------------------------------
    def _serve(self) -> None:
        fake = self.fake
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = self.rfile.read(length) if length else b""
        except OSError:
            body = b""
        if len(body) < length:  # the client went away mid-request (e.g. killed): nothing to answer
            self.close_connection = True
            return
        request = Request(
            method=self.command,
            path=split.path,  # still quoted: routes split on "/" first, then unquote each part
            query=parse_qs(split.query),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        with fake.lock:
            fake.requests.append(request)
            hooks = [hook for method, pattern, hook in fake.hooks if request.matches(method, pattern)]
            fault = None
            for candidate in fake.faults:
                if candidate.times > 0 and request.matches(candidate.method, candidate.pattern):
                    if candidate.skip > 0:
                        candidate.skip -= 1
                        continue
                    candidate.times -= 1
                    fault = candidate
                    break
        for hook in hooks:
            hook(request)
        if fault is not None:
            request.fault = fault.kind if fault.kind != "status" else str(fault.status)
            if fault.kind == "drop":
                self._drop()
                return
            if fault.kind == "status":
                headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                if fault.message is not None:
                    headers["X-Error-Message"] = fault.message
                self._send_json(fault.status, {"error": fault.message or f"injected {fault.status}"}, request, headers)
                return
        try:
            with fake.lock:
                status, payload, headers = _route(fake, request, self.server.server_address)
        except HubError as exc:
            status, payload = exc.status, {"error": exc.message, **exc.extra}
            headers = {"X-Error-Code": exc.code} if exc.code else {}
            headers["X-Error-Message"] = exc.message
        if fault is not None and fault.kind == "drop-after":
            self._drop()
            return
        if isinstance(payload, (bytes, bytearray)):
            self._send_bytes(status, bytes(payload), request, headers)
        else:
            self._send_json(status, payload, request, headers)

    def _drop(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    def _send_json(self, status: int, payload: Any, request: Request, headers: dict[str, str]) -> None:
        self._send_bytes(status, json.dumps(payload).encode(), request, {"Content-Type": "application/json", **headers})

    def _send_bytes(self, status: int, data: bytes, request: Request, headers: dict[str, str]) -> None:
        request.status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


# --------------------------------------------------------------------------------------------------
# routes
# --------------------------------------------------------------------------------------------------
Response = tuple[int, Any, dict[str, str]]


def _route(fake: FakeHub, request: Request, address: tuple) -> Response:
    parts = [unquote(p) for p in request.path.strip("/").split("/")]
    base = f"http://{address[0]}:{address[1]}"
    method = request.method
    if parts[:2] == ["api", "whoami-v2"]:
        _require_auth(request)
        return 200, {"type": "user", "name": USER, "fullname": "Test User", "orgs": [], "auth": {"type": "access_token"}}, {}
    if parts[:2] == ["api", "validate-yaml"] and method == "POST":
        return _validate_yaml(request)
    if parts[:3] == ["api", "repos", "create"] and method == "POST":
        return _create_repo(fake, request, base)
    if parts[:1] == ["_lfs"] and method == "PUT":
        return _lfs_put(fake, request, parts[1])
    if len(parts) >= 4 and parts[0] == "api" and parts[1] in TYPES:
        repo_type, repo_id, rest = TYPES[parts[1]], f"{parts[2]}/{parts[3]}", parts[4:]
        repo = _get_repo(fake, request, repo_type, repo_id)
        return _api(fake, request, repo, rest, base)
    # LFS batch: /{prefix}{ns}/{name}.git/info/lfs/objects/batch
    joined = "/".join(parts)
    match = re.fullmatch(r"(?:(datasets|spaces)/)?([^/]+)/([^/]+)\.git/info/lfs/objects/batch", joined)
    if match and method == "POST":
        repo_type = TYPES[match.group(1)] if match.group(1) else "model"
        repo = _get_repo(fake, request, repo_type, f"{match.group(2)}/{match.group(3)}", write=True)
        return _lfs_batch(fake, request, repo, base)
    # resolve: /{prefix}{ns}/{name}/resolve/{revision}/{path...}
    offset = 1 if parts and parts[0] in ("datasets", "spaces") else 0
    if len(parts) >= offset + 5 and parts[offset + 2] == "resolve" and method in ("GET", "HEAD"):
        repo_type = TYPES[parts[0]] if offset else "model"
        repo = _get_repo(fake, request, repo_type, f"{parts[offset]}/{parts[offset + 1]}")
        return _resolve(fake, request, repo, parts[offset + 3], "/".join(parts[offset + 4:]))
    raise HubError(404, f"no route for {method} {request.path}")


def _require_auth(request: Request) -> None:
    if "authorization" not in request.headers:
        raise HubError(401, "You must be authenticated", None)
    if not request.authorized:
        raise HubError(401, "Invalid credentials in Authorization header", None)


def _get_repo(fake: FakeHub, request: Request, repo_type: str, repo_id: str, write: bool = False) -> Repo:
    repo = fake.repos.get((repo_type, repo_id))
    if repo is None or (repo.private and not request.authorized):
        raise HubError(404, "Repository not found", "RepoNotFound")
    if write:
        _require_auth(request)
    return repo


def _validate_yaml(request: Request) -> Response:
    import yaml

    content = request.json().get("content", "")
    if content.startswith("---"):
        try:
            header = content.split("---", 2)[1]
            data = yaml.safe_load(header)
            if data is not None and not isinstance(data, dict):
                raise ValueError("metadata must be a mapping")
        except Exception as exc:  # noqa: BLE001 - any parse error is the client's
            return 400, {"errors": [{"message": str(exc)}], "warnings": []}, {}
    return 200, {"errors": [], "warnings": []}, {}


def _create_repo(fake: FakeHub, request: Request, base: str) -> Response:
    _require_auth(request)
    payload = request.json()
    name, namespace = payload["name"], payload.get("organization") or USER
    repo_type = payload.get("type") or "model"
    repo_id = f"{namespace}/{name}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", namespace):
        raise HubError(400, f"invalid repo name {repo_id!r}")
    url = f"{base}/{PREFIX[repo_type]}{repo_id}"
    if (repo_type, repo_id) in fake.repos:
        raise HubError(409, "You already created this repo", url=url)
    private = payload.get("private")
    if private is None:
        private = payload.get("visibility") == "private"
    fake.create_repo(repo_id, repo_type, bool(private))
    return 200, {"url": url, "name": repo_id, "id": repo_id}, {}


def _api(fake: FakeHub, request: Request, repo: Repo, rest: list[str], base: str) -> Response:
    method = request.method
    if not rest or rest[0] == "revision":
        revision = rest[1] if len(rest) > 1 else "main"
        return 200, _repo_info(repo, _resolve_rev(repo, revision), base), {}
    head, args = rest[0], rest[1:]
    if head == "refs" and method == "GET":
        return 200, _refs(repo, "include_prs" in request.query), {}
    if head == "tree" and method == "GET":
        return _tree(fake, request, repo, args, base)
    if head == "paths-info" and method == "POST":
        return _paths_info(repo, request, args[0])
    if head == "commits" and method == "GET":
        return _commits(repo, args[0] if args else "main")
    if head == "preupload" and method == "POST":
        _require_auth(request)
        return _preupload(repo, request, args[0])
    if head == "commit" and method == "POST":
        _require_auth(request)
        return _apply_commit(fake, repo, request, args[0], base)
    if head == "tag" and method == "POST":
        _require_auth(request)
        return _create_tag(repo, request, args[0])
    if head == "tag" and method == "DELETE":
        _require_auth(request)
        if repo.tags.pop(args[0], None) is None:
            raise HubError(404, f"tag {args[0]} not found", "RevisionNotFound")
        return 200, {}, {}
    if head == "branch" and method == "POST":
        _require_auth(request)
        return _create_branch(repo, request, args[0])
    if head == "discussions":
        return _discussions(fake, repo, request, args, base)
    raise HubError(404, f"no route for {method} {request.path}")


def _resolve_rev(repo: Repo, revision: str) -> str:
    sha = repo.resolve(revision)
    if sha is None:
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
    return sha


def _repo_info(repo: Repo, sha: str, base: str) -> dict:
    commit = repo.commits[sha]
    return {
        "_id": hashlib.md5(repo.id.encode()).hexdigest()[:24],
        "id": repo.id,
        "author": repo.id.split("/")[0],
        "sha": sha,
        "private": repo.private,
        "gated": False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "createdAt": repo.created_at,
        "lastModified": commit.date,
        "siblings": [{"rfilename": path} for path in sorted(commit.tree)],
    }


def _refs(repo: Repo, include_prs: bool) -> dict:
    def ref(kind: str, name: str, sha: str) -> dict:
        return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}

    branches = [ref("heads", n, s) for n, s in sorted(repo.branches.items()) if not n.startswith("pr/")]
    out = {"branches": branches, "tags": [ref("tags", n, s) for n, s in sorted(repo.tags.items())], "converts": []}
    if include_prs:
        out["pullRequests"] = [
            {"name": n, "ref": f"refs/{n}", "targetCommit": s} for n, s in sorted(repo.branches.items()) if n.startswith("pr/")
        ]
    return out


def _entry(path: str, blob: Blob) -> dict:
    entry: dict[str, Any] = {"type": "file", "oid": blob.oid, "size": blob.size, "path": path}
    if blob.is_lfs:
        entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(lfs_pointer(blob.sha256, blob.size))}
    return entry


def _folders(tree: dict[str, Blob]) -> set[str]:
    return {"/".join(p.split("/")[:i]) for p in tree for i in range(1, p.count("/") + 1)}


def _folder_entry(path: str) -> dict:
    return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}


def _tree(fake: FakeHub, request: Request, repo: Repo, args: list[str], base: str) -> Response:
    revision, path = args[0], "/".join(args[1:]).strip("/")
    commit = repo.commits[_resolve_rev(repo, revision)]
    recursive = request.query.get("recursive", ["false"])[0].lower() in ("1", "true")
    folders = _folders(commit.tree)
    if path and path not in folders:
        if path in commit.tree:
            raise HubError(400, f"{path} is a file, not a folder")
        raise HubError(404, f"{path} does not exist at {revision}", "EntryNotFound")
    prefix = f"{path}/" if path else ""
    entries: list[dict] = []
    for folder in sorted(folders):
        if folder.startswith(prefix) and (recursive or "/" not in folder[len(prefix):]):
            entries.append(_folder_entry(folder))
    for file_path, blob in sorted(commit.tree.items()):
        if file_path.startswith(prefix) and (recursive or "/" not in file_path[len(prefix):]):
            entries.append(_entry(file_path, blob))
    entries.sort(key=lambda e: e["path"])
    start = int(request.query.get("cursor", ["0"])[0])
    page = entries[start : start + fake.tree_page_size]
    headers = {}
    if start + fake.tree_page_size < len(entries):
        query = f"recursive={str(recursive).lower()}&expand=false&cursor={start + fake.tree_page_size}"
        quoted = "/".join(quote(a, safe="") for a in args)
        headers["Link"] = f'<{base}/api/{repo.type}s/{repo.id}/tree/{quoted}?{query}>; rel="next"'
    return 200, page, headers


def _paths_info(repo: Repo, request: Request, revision: str) -> Response:
    commit = repo.commits[_resolve_rev(repo, revision)]
    form = parse_qs(request.body.decode())
    folders = _folders(commit.tree)
    out = []
    for path in form.get("paths", []):
        path = path.strip("/")
        if path in commit.tree:
            out.append(_entry(path, commit.tree[path]))
        elif path in folders:
            out.append(_folder_entry(path))
    return 200, out, {}


def _commits(repo: Repo, revision: str) -> Response:
    sha, out = _resolve_rev(repo, revision), []
    while sha is not None:
        commit = repo.commits[sha]
        out.append(
            {
                "id": commit.sha,
                "title": commit.title,
                "message": commit.message,
                "authors": [{"user": USER}],
                "date": commit.date,
            }
        )
        sha = commit.parents[0] if commit.parents else None
    return 200, out, {}


def _preupload(repo: Repo, request: Request, revision: str) -> Response:
    sha = repo.resolve(revision)
    tree = repo.commits[sha].tree if sha is not None else {}
    files = []
    for item in request.json()["files"]:
        sample = base64.b64decode(item["sample"])
        lfs = item["path"].endswith(LFS_SUFFIXES) or b"\0" in sample or item["size"] > 10 * 1024 * 1024
        remote = tree.get(item["path"])
        oid = None
        if remote is not None:
            oid = remote.sha256 if remote.is_lfs else remote.oid
        files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
    return 200, {"files": files, "commitOid": sha}, {}


def _lfs_batch(fake: FakeHub, request: Request, repo: Repo, base: str) -> Response:
    payload = request.json()
    objects = []
    for obj in payload["objects"]:
        entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
        if obj["oid"] not in fake.lfs:
            entry["actions"] = {"upload": {"href": f"{base}/_lfs/{obj['oid']}", "expires_in": 3600}}
        objects.append(entry)
    return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, {}


def _lfs_put(fake: FakeHub, request: Request, oid: str) -> Response:
    if hashlib.sha256(request.body).hexdigest() != oid:
        raise HubError(400, "uploaded content does not match its sha256")
    fake.lfs[oid] = request.body
    return 200, b"", {}


def _apply_commit(fake: FakeHub, repo: Repo, request: Request, revision: str, base: str) -> Response:
    lines = request.ndjson()
    if not lines or lines[0].get("key") != "header":
        raise HubError(400, "commit payload must start with a header line")
    header = lines[0]["value"]
    create_pr = request.query.get("create_pr", ["0"])[0] == "1"
    branch = repo.branch_of(revision)
    if branch is None:
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
    head = repo.branches[branch]
    parent = header.get("parentCommit")
    if parent is not None and not head.startswith(parent):
        raise HubError(412, f"A commit has happened since. Please refresh and try again. (parent {parent} is not the head of {branch})")
    tree = dict(repo.commits[head].tree)
    for line in lines[1:]:
        key, value = line["key"], line["value"]
        if key == "file":
            tree[value["path"]] = fake._store_regular(base64.b64decode(value["content"]))
        elif key == "lfsFile":
            sha, size = value["oid"], value["size"]
            if sha not in fake.lfs or len(fake.lfs[sha]) != size:
                raise HubError(422, f"LFS object {sha} of {value['path']} was never uploaded")
            tree[value["path"]] = Blob(size, git_blob_sha1(lfs_pointer(sha, size)), sha)
        elif key == "deletedFile":
            if tree.pop(value["path"], None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
        elif key == "deletedFolder":
            prefix = value["path"].rstrip("/") + "/"
            for path in [p for p in tree if p.startswith(prefix)]:
                del tree[path]
        else:
            raise HubError(400, f"unknown commit operation {key!r}")
    pr_url = None
    if create_pr:
        num = max(repo.prs, default=0) + 1
        repo.prs[num] = PullRequest(num, header["summary"], header.get("description", ""), USER, _now(), target=branch)
        repo.branches[f"pr/{num}"] = head
        branch = f"pr/{num}"
        pr_url = f"{base}/{PREFIX[repo.type]}{repo.id}/discussions/{num}"
    commit = fake._commit(repo, branch, tree, header["summary"], header.get("description", ""))
    url = f"{base}/{PREFIX[repo.type]}{repo.id}/commit/{commit.sha}"
    return 200, {"commitUrl": url, "commitOid": commit.sha, "pullRequestUrl": pr_url, "success": True}, {}


def _create_tag(repo: Repo, request: Request, revision: str) -> Response:
    payload = request.json()
    tag = payload["tag"]
    sha = _resolve_rev(repo, revision)
    if tag in repo.tags or tag in repo.branches:
        raise HubError(409, f"Tag {tag} already exists")
    repo.tags[tag] = sha
    return 200, {"name": tag, "ref": f"refs/tags/{tag}", "targetCommit": sha}, {}


def _create_branch(repo: Repo, request: Request, branch: str) -> Response:
    payload = request.json() if request.body else {}
    if branch in repo.branches or branch in repo.tags:
        raise HubError(409, f"Reference {branch} already exists")
    repo.branches[branch] = _resolve_rev(repo, payload.get("startingPoint") or "main")
    return 200, {}, {}


def _discussions(fake: FakeHub, repo: Repo, request: Request, args: list[str], base: str) -> Response:
    def summary(pr: PullRequest) -> dict:
        return {
            "num": pr.num,
            "title": pr.title,
            "status": pr.status,
            "isPullRequest": True,
            "createdAt": pr.created_at,
            "author": {"name": pr.author},
            "repo": {"name": repo.id, "type": repo.type},
        }

    if not args and request.method == "POST":
        _require_auth(request)
        payload = request.json()
        if not payload.get("pullRequest"):
            raise HubError(400, "the fake hub only supports pull requests")
        num = max(repo.prs, default=0) + 1
        repo.prs[num] = PullRequest(num, payload["title"], payload.get("description") or "", USER, _now())
        repo.branches[f"pr/{num}"] = repo.branches["main"]
        return 200, {"num": num, "url": f"{base}/{PREFIX[repo.type]}{repo.id}/discussions/{num}"}, {}
    if not args and request.method == "GET":
        wanted = request.query.get("status", ["all"])[0]
        prs = [pr for pr in sorted(repo.prs.values(), key=lambda p: -p.num)]
        if wanted == "open":
            prs = [pr for pr in prs if pr.status in ("open", "draft")]
        if "author" in request.query:
            prs = [pr for pr in prs if pr.author == request.query["author"][0]]
        return 200, {"discussions": [summary(pr) for pr in prs], "count": len(prs), "start": 0, "numClosedDiscussions": 0}, {}
    if len(args) == 1 and request.method == "GET":
        pr = repo.prs.get(int(args[0]))
        if pr is None:
            raise HubError(404, f"discussion {args[0]} not found")
        return 200, {**summary(pr), "events": [], "changes": {"base": f"refs/heads/{pr.target}"}, "filesWithConflicts": []}, {}
    raise HubError(404, f"no route for {request.method} {request.path}")


def _resolve(fake: FakeHub, request: Request, repo: Repo, revision: str, path: str) -> Response:
    sha = _resolve_rev(repo, revision)
    blob = repo.commits[sha].tree.get(path)
    if blob is None:
        raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
    data = fake._content(blob)
    headers = {
        "X-Repo-Commit": sha,
        "ETag": f'"{blob.sha256 or blob.oid}"',
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
    }
    if blob.is_lfs:
        headers["X-Linked-Etag"] = f'"{blob.sha256}"'
        headers["X-Linked-Size"] = str(blob.size)
    status = 200
    byte_range = request.headers.get("range")
    if byte_range and request.method == "GET":
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", byte_range.strip())
        if match:
            start = int(match.group(1)) if match.group(1) else max(0, len(data) - int(match.group(2)))
            stop = int(match.group(2)) + 1 if match.group(1) and match.group(2) else len(data)
            if start >= len(data) and len(data) > 0:
                return 416, b"", {"Content-Range": f"bytes */{len(data)}"}
            headers["Content-Range"] = f"bytes {start}-{min(stop, len(data)) - 1}/{len(data)}"
            data, status = data[start:stop], 206
    headers["Content-Length"] = str(len(data))
    return status, data, headers


# --------------------------------------------------------------------------------------------------
# pointing a process at the fake
# --------------------------------------------------------------------------------------------------
def hub_env(url: str, home: Path, token: Optional[str] = TOKEN) -> dict[str, str]:
    """Environment variables that point ``huggingface_hub`` and ``datasets`` at the fake (for
    subprocesses): endpoint, xet off, no telemetry, a private HF_HOME and datasets cache."""
    env = {
        "HF_ENDPOINT": url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_DATASETS_CACHE": str(home / "datasets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
    }
    if token is not None:
        env["HF_TOKEN"] = token
    return env


@contextlib.contextmanager
def pointed_at(url: str, home: Path, token: Optional[str] = TOKEN) -> Iterator[dict[str, str]]:
    """Point this process at the fake: set the variables of :func:`hub_env` and patch the module
    constants that ``huggingface_hub`` and ``datasets`` computed from them at import time (the way
    their own test suites do), then restore everything."""
    import datasets.config
    import huggingface_hub.constants as hf_constants
    import huggingface_hub.hf_api as hf_api

    env = hub_env(url, home, token)
    patches: list[tuple[Any, str, Any]] = [
        (hf_constants, "ENDPOINT", url),
        (hf_api.api, "endpoint", url),  # the module-level HfApi behind huggingface_hub.model_info & co
        (hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"),
        (hf_constants, "HF_HUB_DISABLE_XET", True),
        (hf_constants, "HF_HUB_DISABLE_TELEMETRY", True),
        (hf_constants, "HF_HUB_DISABLE_PROGRESS_BARS", True),
        (hf_constants, "HF_HOME", str(home)),
        (hf_constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"]),
        (hf_constants, "HUGGINGFACE_HUB_CACHE", env["HF_HUB_CACHE"]),
        (hf_constants, "HF_XET_CACHE", env["HF_XET_CACHE"]),
        (hf_constants, "HF_TOKEN_PATH", env["HF_TOKEN_PATH"]),
        (hf_constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens")),
        (datasets.config, "HF_ENDPOINT", url),
        (datasets.config, "HUB_DATASETS_URL", url + "/datasets/{repo_id}/resolve/{revision}/{path}"),
        (datasets.config, "HF_DATASETS_CACHE", Path(env["HF_DATASETS_CACHE"])),
        (datasets.config, "DOWNLOADED_DATASETS_PATH", Path(env["HF_DATASETS_CACHE"]) / datasets.config.DOWNLOADED_DATASETS_DIR),
        (datasets.config, "HF_MODULES_CACHE", home / "modules"),
        (datasets.config, "EXTRACTED_DATASETS_PATH", Path(env["HF_DATASETS_CACHE"]) / datasets.config.DOWNLOADED_DATASETS_DIR / datasets.config.EXTRACTED_DATASETS_DIR),
    ]
    saved_env = {key: os.environ.get(key) for key in [*env, "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"]}
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        os.environ.pop("HUGGING_FACE_HUB_TOKEN", None)
        os.environ.pop("HF_TOKEN", None)
        os.environ.update(env)
        for module, name, value in patches:
            setattr(module, name, value)
        yield env
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def fake_hub(tmp_path_factory) -> Iterator[FakeHub]:
    """A running :class:`FakeHub`, with this process pointed at it (see :func:`pointed_at`);
    ``fake_hub.env`` holds the variables for subprocesses and ``fake_hub.home`` the HF_HOME."""
    from huggingface_hub import HfFileSystem

    hub = FakeHub().start()
    home = tmp_path_factory.mktemp("hf-home")
    try:
        with pointed_at(hub.url, home) as env:
            hub.env = env  # type: ignore[attr-defined]
            hub.home = home  # type: ignore[attr-defined]
            yield hub
    finally:
        hub.stop()
        HfFileSystem.clear_instance_cache()  # its listings belong to this server (a port may be reused)


__all__ = ["FakeHub", "Request", "TOKEN", "USER", "fake_hub", "git_blob_sha1", "hub_env", "pointed_at"]
