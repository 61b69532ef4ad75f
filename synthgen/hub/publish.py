"""Publish a prepared folder to a Hub repository as one revision, optionally tagged.

The shared path of dataset and model pushes, on ``huggingface_hub``'s own API:
``create_repo(exist_ok=True)`` -> checks -> ``upload_folder`` -> ``create_tag`` on the commit the
upload returned. What it guarantees:

* **Tags are versions.** A tag is never moved: if it exists and holds exactly these files, the
  push is a no-op; otherwise it fails before anything is uploaded.
* **Safe retries.** ``huggingface_hub`` retries uploads but sends the commit once. A failed commit
  is retried here with backoff (honouring ``Retry-After``), pinned with ``parent_commit``, after
  checking what landed: if the branch already moved to a tree holding exactly our files, the commit
  went through and only its response was lost, so that commit is the result (no duplicate).
* **Re-runs finish the job.** After ``kill -9``, running the same push again finds the uploaded
  files (nothing re-sent), the landed commit (no new commit: ``upload_folder`` skips unchanged
  files) and the tag, and completes what is missing.
* **The token** comes from ``HF_TOKEN`` or the ``hf`` login and is redacted from every message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from synthgen.errors import SynthgenError
from synthgen.hub.retry import TRANSPORT_ERRORS, Backoff, status_of, with_retries

log = logging.getLogger("synthgen.hub")

# Never uploaded, whatever the folder holds: build state, temp files, caches, VCS metadata.
IGNORE_PATTERNS = [".synthgen", ".synthgen/*", "*/.synthgen/*", ".tmp-*", "*/.tmp-*", ".cache/*", ".git/*"]
URL_PREFIX = {"dataset": "datasets/", "model": ""}
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class PushResult:
    """Where a push went: ``commit`` is the sha the tag (if any) points at."""

    repo_id: str
    repo_type: str
    commit: str
    tag: Optional[str]
    revision: str  # the branch (or refs/pr/N) the commit is on
    url: str
    pr_url: Optional[str] = None
    new_commit: bool = True  # False when the Hub already held exactly this content
    pushed_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def record(self) -> dict[str, Any]:
        """What the manifest keeps of a push."""
        return {k: v for k, v in asdict(self).items() if k != "new_commit"}


# --------------------------------------------------------------------------------------------------
# arguments, token and errors
# --------------------------------------------------------------------------------------------------
def check_push_args(repo_id: str, tag: Optional[str], branch: Optional[str], create_pr: bool) -> None:
    """Reject malformed arguments before anything touches the disk or the network."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise SynthgenError(f"malformed repo id {repo_id!r}: {str(exc).splitlines()[0]}") from None
    if repo_id.count("/") != 1:
        raise SynthgenError(f"malformed repo id {repo_id!r}: give it as namespace/name (a user or organisation)")
    for kind, name in (("tag", tag), ("branch", branch)):
        if name is not None and (not _REF.match(name) or ".." in name or name.endswith((".lock", "."))):
            raise SynthgenError(f"malformed {kind} {name!r}: use letters, digits, '.', '_' and '-' (e.g. v1.0.0)")
    if create_pr and tag:
        raise SynthgenError("--tag and --create-pr don't combine: a tag names a published revision; merge the "
                            "pull request, then push again with --tag to tag it")
    if create_pr and branch:
        raise SynthgenError("--create-pr opens a pull request against main; it doesn't combine with --branch")


def require_token(token: Optional[str] = None) -> str:
    """The Hub token: the one given, else ``HF_TOKEN``, else the ``hf auth login`` token."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise SynthgenError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`")
    return found


def redact(text: str, token: Optional[str]) -> str:
    return text.replace(token, "<token>") if token else text


@contextlib.contextmanager
def hub_errors(token: str, repo_id: str) -> Iterator[None]:
    """Turn the Hub's errors (also when ``huggingface_hub`` wraps them, as it does for uploads)
    into one-line :class:`SynthgenError` messages without the token."""
    try:
        yield
    except SynthgenError as exc:
        raise SynthgenError(redact(str(exc), token)) from None
    except Exception as exc:
        message = describe_hub_error(exc, repo_id)
        if message is None:
            raise
        raise SynthgenError(redact(" ".join(message.split()), token)) from None


def describe_hub_error(exc: BaseException, repo_id: str) -> Optional[str]:
    """What went wrong, if ``exc`` (or what caused it) is an error of the Hub or of reaching it."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RepositoryNotFoundError):
            return f"{repo_id} was not found on the Hub, or the token may not access it"
        if isinstance(exc, HfHubHTTPError):
            status = status_of(exc)
            detail = (exc.server_message or "").strip().splitlines()
            detail_text = f": {detail[0]}" if detail else ""
            if status == 401:
                return "the Hub refused the token (HTTP 401): check HF_TOKEN or run `hf auth login`"
            if status == 403:
                return f"the token may not write to {repo_id} (HTTP 403){detail_text}"
            if status == 412:
                return f"{repo_id} changed during the push (someone else pushed); run the push again"
            return f"the Hub answered HTTP {status} for {repo_id}{detail_text}; run the push again to resume it"
        if isinstance(exc, HFValidationError):
            return str(exc).splitlines()[0]
        if isinstance(exc, TRANSPORT_ERRORS):
            return f"could not reach the Hub ({type(exc).__name__}); run the push again to resume it"
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


# --------------------------------------------------------------------------------------------------
# the files of a push, and comparing them with a revision on the Hub
# --------------------------------------------------------------------------------------------------
@dataclass
class LocalFile:
    path: Path
    size: int
    sha256: Optional[str] = None  # computed on first use unless known (e.g. from a manifest)

    def lfs_oid(self) -> str:
        if self.sha256 is None:
            with open(self.path, "rb") as f:
                self.sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        return self.sha256

    def git_oid(self) -> str:
        from huggingface_hub.utils.sha import git_hash

        return git_hash(self.path.read_bytes())  # only asked for small (non-LFS) files


def index_files(folder: Path, known_sha256: Optional[dict[str, str]] = None) -> dict[str, LocalFile]:
    """Every file under ``folder`` by its path in the repo (hidden entries left out)."""
    known = known_sha256 or {}
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            files[rel] = LocalFile(path, path.stat().st_size, known.get(rel))
    return files


def same_content(entry, local: LocalFile) -> bool:
    """Whether a remote file (a ``RepoFile`` of a tree listing) holds ``local``'s bytes."""
    if entry.size != local.size:
        return False
    if entry.lfs is not None:
        return entry.lfs.sha256 == local.lfs_oid()
    return entry.blob_id == local.git_oid()


def matcher(patterns: list[str]) -> Callable[[str], bool]:
    import fnmatch

    return lambda path: any(fnmatch.fnmatch(path, p) for p in patterns)


# --------------------------------------------------------------------------------------------------
# staging: the exact tree to upload, without copying large files
# --------------------------------------------------------------------------------------------------
STAGE_PREFIX = ".synthgen-push-"


@contextlib.contextmanager
def staging_folder(parent: Path) -> Iterator[Path]:
    """A fresh hidden folder in ``parent`` to assemble the upload in (on the same file system as
    the files it links to), removed afterwards; those of killed pushes on this host go too."""
    import socket
    import tempfile

    parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().replace("-", "_")
    for stale in parent.glob(f"{STAGE_PREFIX}{host}-*"):
        pid = stale.name[len(STAGE_PREFIX) + len(host) + 1:].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{host}-{os.getpid()}-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def link_file(source: Path, target: Path) -> None:
    """``target`` shows ``source``'s bytes: a hard link (it keeps the verified inode even if the
    source is replaced meanwhile), else a symbolic link on another file system."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        os.symlink(Path(source).resolve(), target)


# --------------------------------------------------------------------------------------------------
# the push
# --------------------------------------------------------------------------------------------------
@dataclass
class Remote:
    """One Hub repository, read with retries where ``huggingface_hub`` sends a call only once."""

    api: Any
    repo_id: str
    repo_type: str
    backoff: Backoff

    def refs(self) -> tuple[dict[str, str], dict[str, str]]:
        refs = with_retries(lambda: self.api.list_repo_refs(self.repo_id, repo_type=self.repo_type),
                            self.backoff, "list_repo_refs")
        return ({r.name: r.target_commit for r in refs.branches}, {r.name: r.target_commit for r in refs.tags})

    def head(self, revision: str) -> str:
        return with_retries(lambda: self.api.repo_info(self.repo_id, repo_type=self.repo_type, revision=revision).sha,
                            self.backoff, "repo_info")

    def tree(self, revision: Optional[str]) -> dict[str, Any]:
        """Path -> ``RepoFile`` of every file at ``revision`` (none for no revision)."""
        from huggingface_hub import RepoFile

        if revision is None:
            return {}
        listing = self.api.list_repo_tree(self.repo_id, repo_type=self.repo_type, revision=revision, recursive=True)
        return {entry.path: entry for entry in listing if isinstance(entry, RepoFile)}

    def read_json(self, path: str, revision: str) -> dict[str, Any]:
        local = self.api.hf_hub_download(self.repo_id, path, repo_type=self.repo_type, revision=revision)
        return json.loads(Path(local).read_text())


@dataclass
class Upload:
    """The files of a push, and how they compare with trees on the Hub."""

    files: dict[str, LocalFile]
    owned: Callable[[str], bool]  # remote paths the push replaces (absent from ``files``: deleted)

    def matches(self, tree: dict[str, Any]) -> bool:
        """``tree`` holds exactly these files, and no other file the push owns (a stale shard)."""
        return all(path in tree and same_content(tree[path], local) for path, local in self.files.items()) and \
            not any(self.owned(path) and path not in self.files for path in tree if path != ".gitattributes")

    def content_id(self) -> str:
        """A short hash of every path and its bytes: names this content (e.g. in a pull request's title)."""
        listing = "".join(f"{path}\0{local.lfs_oid()}\n" for path, local in sorted(self.files.items()))
        return hashlib.sha256(listing.encode()).hexdigest()[:12]

    def only_progress(self, before: dict[str, Any], after: dict[str, Any]) -> bool:
        """Every change from ``before`` to ``after`` is one of these files landing (or an owned file
        going): what an interrupted or partly committed push of these files leaves behind."""
        for path, entry in after.items():
            unchanged = path in before and before[path].blob_id == entry.blob_id
            if not unchanged and not (path in self.files and same_content(entry, self.files[path])):
                return False
        return all(path in after or self.owned(path) for path in before)


# check_remote(remote, head, tree at head, paths of this push): raise to refuse the repository
RemoteCheck = Callable[[Remote, Optional[str], dict[str, Any], set[str]], None]


def publish_folder(
    stage: Path,
    repo_id: str,
    *,
    repo_type: str,
    message: str,
    description: str = "",
    tag: Optional[str] = None,
    branch: Optional[str] = None,
    create_pr: bool = False,
    private: bool = False,
    delete_patterns: list[str],
    check_remote: Optional[RemoteCheck] = None,
    known_sha256: Optional[dict[str, str]] = None,
    token: Optional[str] = None,
    backoff: Backoff = Backoff(),
) -> PushResult:
    """Upload every file of ``stage`` to ``repo_id`` as one revision and tag it.

    ``delete_patterns``: remote files the push owns; those not in ``stage`` are deleted in the same
    commit (e.g. ``data/*``, so a smaller new version leaves no stale shard behind).
    ``check_remote`` may refuse the repository (e.g. it holds another dataset).
    """
    from huggingface_hub import HfApi

    check_push_args(repo_id, tag, branch, create_pr)
    token = require_token(token)
    upload = Upload(index_files(stage, known_sha256), matcher(delete_patterns))
    api = HfApi(token=token)
    remote = Remote(api, repo_id, repo_type, backoff)
    with hub_errors(token, repo_id):
        with_retries(lambda: api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True),
                     backoff, "create_repo")
        branches, tags = remote.refs()
        if tag is not None and tag in tags:
            if upload.matches(remote.tree(tags[tag])):
                log.info("%s already holds tag %s with this content at %s", repo_id, tag, tags[tag])
                return _result(remote, tags[tag], tag, branch or "main", new_commit=False)
            raise SynthgenError(
                f"tag {tag} of {repo_id} already exists (commit {tags[tag][:12]}) with other content; "
                "a published tag is never moved: push this version under a new tag"
            )
        if tag is not None and tag in branches:
            raise SynthgenError(f"{tag} is a branch of {repo_id}; choose another tag name")
        target = branch or "main"
        if check_remote is not None:
            head = branches.get(target, branches.get("main"))
            check_remote(remote, head, remote.tree(head), set(upload.files))
        pr_url = None
        if create_pr:
            # the title names the content: a re-run finds its own pull request, another version opens its own
            revision, parent, pr_url = _pull_request(remote, f"{message} [{upload.content_id()}]", description)
        elif target not in branches:
            parent = branches.get("main")
            with_retries(lambda: api.create_branch(repo_id, branch=target, revision=parent, repo_type=repo_type,
                                                   exist_ok=True), backoff, "create_branch")
            revision = target
        else:
            revision, parent = target, branches[target]
        commit = _commit(remote, stage, upload, revision, parent, message, description, delete_patterns)
        if tag is not None:
            _tag(remote, tag, commit, message)
        return _result(remote, commit, tag, revision, new_commit=commit != parent, pr_url=pr_url)


def _result(remote: Remote, commit: str, tag: Optional[str], revision: str, *, new_commit: bool,
            pr_url: Optional[str] = None) -> PushResult:
    prefix = URL_PREFIX.get(remote.repo_type, remote.repo_type + "s/")
    url = f"{remote.api.endpoint}/{prefix}{remote.repo_id}/tree/{tag or commit}"
    return PushResult(remote.repo_id, remote.repo_type, commit, tag, revision, url, pr_url, new_commit)


def _commit(remote: Remote, stage: Path, upload: Upload, revision: str, parent: Optional[str], message: str,
            description: str, delete_patterns: list[str]) -> str:
    """Upload and commit ``stage`` on ``revision`` (whose head is ``parent``); the result's sha.

    After a failure, look at the head before trying again: unchanged -> commit again (the
    uploaded files are not sent twice); our files all there -> the commit landed and only its
    response was lost: done; some of ours there (``upload_folder`` commits large folders in
    batches) -> go on from there; anything else -> someone else pushed: stop.
    """
    from huggingface_hub.errors import HfHubHTTPError

    state = {"parent": parent}

    def commit() -> str:
        try:
            info = remote.api.upload_folder(
                repo_id=remote.repo_id,
                repo_type=remote.repo_type,
                folder_path=stage,
                revision=revision,
                commit_message=message,
                commit_description=description,
                allow_patterns=sorted(upload.files),
                ignore_patterns=list(IGNORE_PATTERNS),
                delete_patterns=delete_patterns,
                parent_commit=state["parent"],
            )
        except HfHubHTTPError as exc:
            # 412: the head is not our parent any more, e.g. huggingface_hub retried a commit whose
            # response was lost; it may be our own commit
            if status_of(exc) == 412 and (found := landed(exc)) is not None:
                return found
            raise
        return info.oid

    def landed(exc: BaseException) -> Optional[str]:
        head = remote.head(revision)
        if head == state["parent"]:
            return None
        tree = remote.tree(head)
        if upload.matches(tree):
            log.warning("the commit landed although its response was lost: %s", head)
            return head
        if upload.only_progress(remote.tree(state["parent"]), tree):
            log.warning("part of the upload was committed (%s); going on from there", head)
            state["parent"] = head
            return None
        raise SynthgenError(
            f"{revision} of {remote.repo_id} moved to {head[:12]} during the push, to other content "
            "(someone else pushed); run the push again"
        )

    return with_retries(commit, remote.backoff, "upload and commit", before_retry=landed)


def _tag(remote: Remote, tag: str, commit: str, message: str) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    def landed(exc: BaseException) -> Optional[bool]:
        found = remote.refs()[1].get(tag)
        if found is None:
            return None
        if found != commit:
            raise SynthgenError(f"tag {tag} of {remote.repo_id} was created meanwhile at another commit ({found[:12]})")
        return True

    try:
        with_retries(lambda: remote.api.create_tag(remote.repo_id, tag=tag, revision=commit,
                                                   repo_type=remote.repo_type, tag_message=message),
                     remote.backoff, "create_tag", before_retry=landed)
    except HfHubHTTPError as exc:
        if status_of(exc) != 409 or landed(exc) is None:  # 409: it exists; fine if it is ours
            raise


def _pull_request(remote: Remote, title: str, description: str) -> tuple[str, str, str]:
    """The open pull request titled ``title`` (a re-run reuses the one it opened), else a new one:
    its ref, head and url. Opened explicitly, then committed to like a branch, so that a retried
    commit can never open a second pull request."""
    api = remote.api

    def find() -> Optional[Any]:
        for discussion in api.get_repo_discussions(remote.repo_id, repo_type=remote.repo_type,
                                                   discussion_type="pull_request"):
            if discussion.status in ("open", "draft") and discussion.title == title:
                return discussion
        return None

    pr = find() or with_retries(
        lambda: api.create_pull_request(remote.repo_id, title=title, description=description or None,
                                        repo_type=remote.repo_type),
        remote.backoff, "create_pull_request", before_retry=lambda exc: find(),
    )
    ref = pr.git_reference
    return ref, remote.head(ref), pr.url
