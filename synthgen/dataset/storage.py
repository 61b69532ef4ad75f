"""Where a dataset folder lives: a local path, or any fsspec URL (``s3://``, ``gs://``, ``memory://``).

A build touches its folder only through a :class:`Store`, which gives it whole-file writes, listings
with sizes, and one claim per shard:

* :class:`LocalStore` (a path or ``file://``): a file is written to a temp name, fsynced and renamed,
  so a reader sees the old file or the new one; a shard is claimed with an advisory ``flock`` on
  ``.synthgen/locks/<shard>.lock``, which the OS releases when its process dies, even on ``kill -9``
  (on a shared file system that supports ``flock``).
* :class:`ObjectStore` (any other fsspec protocol): an object is written whole by one PUT, which is
  atomic on object stores (no rename there). ``flock`` does not exist, so a shard is claimed with a
  *lease object* ``.synthgen/leases/<shard>.json`` holding a random owner id and an expiry: the
  claimer writes it, waits ``LEASE_SETTLE_SECONDS`` and reads it back (a rival that wrote meanwhile
  wins; whoever reads back someone else's id backs off), and renews it every third of
  ``SYNTHGEN_LEASE_SECONDS`` (default 60) while it works. A process that dies stops renewing, and
  its shard is taken over once the lease expires. Leases are an optimisation, not what keeps the
  data right: a shard's content is fixed by the plan, the file is written whole before its marker,
  and a marker counts only when the file matches it, so two processes making the same shard write
  the same rows and the dataset never holds a duplicate row or an unchecked file.

Credentials come from the usual environment (``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``,
fsspec's ``FSSPEC_<PROTOCOL>_<OPTION>`` variables) or from ``storage_options`` passed in Python;
they are never written to the folder and never printed (the URL is shown without user info).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

from synthgen.errors import OutputFolderError

STATE_DIR = ".synthgen"  # build state inside the dataset folder (plan, markers, locks, leases)
TMP_PREFIX = ".tmp-"
FOLDER_LOCK = "folder.lock"
LEASE_SETTLE_SECONDS = 0.25  # longer than a PUT's round trip: a rival's lease written meanwhile is seen
LEASE_ENV = "SYNTHGEN_LEASE_SECONDS"


# --------------------------------------------------------------------------------------------------
# local files: write whole, then rename
# --------------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """Where ``path`` is written before its atomic rename (``.tmp-<name>.<pid>``, cleaned up later)."""
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)``, fsync, rename over ``path``; on any failure (disk full...) the temp file goes."""
    tmp = temp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    write_atomically(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
def disk_error_message(exc: OSError, folder: Optional[Path | str] = None) -> str:
    """One line for a file-system error: what failed, where, and what to do about a full disk."""
    where = f" {exc.filename}" if getattr(exc, "filename", None) else (f" {folder}" if folder else "")
    if exc.errno == errno.ENOSPC or "No space left" in str(exc):
        return (f"disk full writing{where or ' the dataset'}: free some space, then run the same "
                "command again to resume (finished shards are kept)")
    reason = exc.strerror or (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write{where}: {reason} (the folder is read-only; choose another with --out)"
    if exc.errno == errno.ENOTDIR:
        return f"cannot create{where}: a part of that path is a file, not a folder"
    return f"file-system error at{where or ' the dataset folder'}: {reason}"


@contextlib.contextmanager
def disk_errors(folder: Optional[Path | str] = None) -> Iterator[None]:
    """Turn ``OSError`` (read-only folder, disk full, a file where a folder should be) into one
    line; ``folder`` names the place when the error itself does not (pyarrow's do not)."""
    try:
        yield
    except OSError as exc:
        raise OutputFolderError(disk_error_message(exc, folder)) from None


# --------------------------------------------------------------------------------------------------
# claims
# --------------------------------------------------------------------------------------------------
class Claim:
    """An exclusive claim on one shard. ``acquire(wait=False)`` returns False at once when another
    process holds it; ``wait=True`` blocks until it is free (its holder finished or died). Also a
    context manager yielding whether it is held. A claim may be released from another thread (a
    background writer finishing the shard)."""

    def acquire(self, wait: bool = False) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def release(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def __init__(self, wait: bool = False) -> None:
        self.wait = wait
        self.held = False

    def __enter__(self) -> bool:
        self.held = self.acquire(self.wait)
        return self.held

    def __exit__(self, *exc: Any) -> None:
        if self.held:
            self.release()
            self.held = False


class FlockClaim(Claim):
    """``flock`` on a lock file; the OS drops it when the process dies. The holder's pid is written
    into the file (diagnostics: which process is making the shard)."""

    def __init__(self, path: Path, wait: bool = False) -> None:
        super().__init__(wait)
        self.path = path
        self.handle: Optional[IO[str]] = None

    def acquire(self, wait: bool = False) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.close()
            return False
        except BaseException:
            handle.close()
            raise
        self.handle = handle
        try:
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n")
            handle.flush()
        except OSError:
            pass  # the pid is a courtesy; a full disk must not fail the claim
        return True

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def lease_seconds() -> float:
    try:
        return max(1.0, float(os.environ.get(LEASE_ENV, "60")))
    except ValueError:
        raise OutputFolderError(f"{LEASE_ENV} must be a number of seconds, got {os.environ[LEASE_ENV]!r}") from None


class LeaseClaim(Claim):
    """A lease object (owner id + expiry) on an object store; renewed by a thread while held."""

    def __init__(self, store: "ObjectStore", rel: str, wait: bool = False, poll: float = 1.0) -> None:
        super().__init__(wait)
        self.store, self.rel, self.poll = store, rel, poll
        self.owner = f"{os.getpid()}-{secrets.token_hex(8)}"
        self.ttl = lease_seconds()
        self._stop = threading.Event()
        self._renewer: Optional[threading.Thread] = None

    def _read(self) -> Optional[dict]:
        try:
            lease = json.loads(self.store.read_bytes(self.rel))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # half a lease cannot exist (whole PUTs): an edited one counts as expired
        return lease if isinstance(lease, dict) else {}

    def _write(self) -> None:
        lease = {"owner": self.owner, "expires": time.time() + self.ttl}
        self.store.write_bytes(self.rel, json.dumps(lease).encode())

    def _free(self, lease: Optional[dict]) -> bool:
        return not lease or lease.get("owner") == self.owner or float(lease.get("expires", 0)) < time.time()

    def acquire(self, wait: bool = False) -> bool:
        while True:
            if self._free(self._read()):
                self._write()
                time.sleep(LEASE_SETTLE_SECONDS)
                if (self._read() or {}).get("owner") == self.owner:
                    self._renewer = threading.Thread(target=self._renew, daemon=True)
                    self._renewer.start()
                    return True
            if not wait:
                return False
            time.sleep(self.poll)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            with contextlib.suppress(Exception):  # a missed renewal is retried; expiry is ttl away
                self._write()

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if (self._read() or {}).get("owner") == self.owner:
            self.store.remove(self.rel)


# --------------------------------------------------------------------------------------------------
# stores
# --------------------------------------------------------------------------------------------------
class Store(ABC):
    """A dataset folder's files by relative path (``data/train-00000-of-00004.parquet``)."""

    display: str  # how the folder is shown: a path, or the URL without credentials
    local: Optional[Path] = None  # the folder, for a local store

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """The file's bytes; FileNotFoundError when it is missing."""

    @abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write the file whole: a reader sees the old file or the new one, never a part."""

    @abstractmethod
    def remove(self, rel: str) -> None:
        """Remove a file (a missing one is fine)."""

    @abstractmethod
    def remove_tree(self, rel: str) -> None: ...

    @abstractmethod
    def listing(self, rel: str = "") -> dict[str, int]:
        """The files directly in ``rel``: name -> size ({} when ``rel`` does not exist)."""

    @abstractmethod
    def names(self) -> list[str]:
        """The entries at the folder's top (files and folders)."""

    @abstractmethod
    def version(self, rel: str) -> Optional[tuple]:
        """``(size, ...)``: a key that changes whenever the file does (None: missing)."""

    @abstractmethod
    def open_read(self, rel: str) -> IO[bytes]: ...

    @abstractmethod
    def claim(self, name: str, wait: bool = False) -> Claim: ...

    @abstractmethod
    def folder_lock(self) -> contextlib.AbstractContextManager: ...

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def read_json(self, rel: str) -> Optional[Any]:
        """Parsed JSON, or None when the file is missing or unreadable."""
        try:
            return json.loads(self.read_bytes(rel))
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return None

    def read_many(self, rels: list[str]) -> dict[str, Optional[bytes]]:
        """Several small files (markers): rel -> bytes, None where missing."""
        out: dict[str, Optional[bytes]] = {}
        for rel in rels:
            try:
                out[rel] = self.read_bytes(rel)
            except FileNotFoundError:
                out[rel] = None
        return out

    def sha256(self, rel: str) -> str:
        digest = hashlib.sha256()
        with self.open_read(rel) as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        return digest.hexdigest()

    def temp_files(self) -> dict[Optional[str], list[str]]:
        """Temp files a killed writer left, by shard name (None: the folder's own files)."""
        return {}


class LocalStore(Store):
    def __init__(self, folder: str | Path) -> None:
        self.local = Path(folder)
        self.display = str(folder)

    def path(self, rel: str) -> Path:
        return self.local / rel if rel else self.local

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def read_bytes(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)

    def remove(self, rel: str) -> None:
        self.path(rel).unlink(missing_ok=True)

    def remove_tree(self, rel: str) -> None:
        import shutil

        path = self.path(rel)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def listing(self, rel: str = "") -> dict[str, int]:
        folder = self.path(rel)
        if not folder.is_dir():
            return {}
        out = {}
        for entry in os.scandir(folder):
            with contextlib.suppress(FileNotFoundError):  # removed while we list
                if entry.is_file():
                    out[entry.name] = entry.stat().st_size
        return out

    def names(self) -> list[str]:
        return [p.name for p in self.local.iterdir()] if self.local.is_dir() else []

    def version(self, rel: str) -> Optional[tuple]:
        try:
            st = self.path(rel).stat()
        except FileNotFoundError:
            return None
        return (st.st_size, st.st_ino, st.st_mtime_ns)

    def open_read(self, rel: str) -> IO[bytes]:
        return open(self.path(rel), "rb")

    def sha256(self, rel: str) -> str:
        return file_sha256(self.path(rel))

    def claim(self, name: str, wait: bool = False) -> Claim:
        return FlockClaim(self.local / STATE_DIR / "locks" / f"{name}.lock", wait)

    @contextlib.contextmanager
    def folder_lock(self) -> Iterator[None]:
        """Serialises folder-wide changes (plan, clean-up, manifest) between processes sharing it.

        The lock file is never deleted, not even by ``--overwrite``: a process that opened a fresh
        file at the same path would not exclude one holding the old inode.
        """
        (self.local / STATE_DIR).mkdir(parents=True, exist_ok=True)
        with open(self.local / STATE_DIR / FOLDER_LOCK, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def temp_files(self) -> dict[Optional[str], list[str]]:
        found: dict[Optional[str], list[str]] = {}
        for sub in ("data", f"{STATE_DIR}/done"):
            folder = self.path(sub)
            if folder.is_dir():
                for path in folder.glob(f"{TMP_PREFIX}*"):
                    # .tmp-<shard>.parquet.<pid> or .tmp-<shard>.json.<pid>
                    stem = path.name[len(TMP_PREFIX):].rsplit(".", 1)[0]
                    shard = stem.removesuffix(".parquet").removesuffix(".json")
                    found.setdefault(shard, []).append(f"{sub}/{path.name}")
        for sub in ("", STATE_DIR):
            folder = self.path(sub)
            if folder.is_dir():
                found.setdefault(None, []).extend(
                    f"{sub}/{p.name}".lstrip("/") for p in folder.glob(f"{TMP_PREFIX}*")
                )
        return found


class ObjectStore(Store):
    """A folder on an fsspec file system without rename or flock (S3, GCS, Azure, memory)."""

    def __init__(self, fs: Any, root: str, display: str, secret: str = "") -> None:
        self.fs, self.root, self.display = fs, root.rstrip("/"), display
        self.secret = secret  # a URL's ``user:secret`` part: never in a message

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    @contextlib.contextmanager
    def _errors(self, rel: str = "") -> Iterator[None]:
        """Storage errors as one line; FileNotFoundError passes (callers use it)."""
        try:
            yield
        except FileNotFoundError:
            raise
        except OutputFolderError:
            raise
        except Exception as exc:  # botocore, aiohttp, gcsfs... raise many kinds
            msg = _scrub(" ".join(str(exc).split()), self.secret)[:300] or type(exc).__name__
            where = f"{self.display}/{rel}" if rel else self.display
            hint = ("; check the credentials this process has for it (environment variables such as "
                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or storage_options)") if isinstance(exc, PermissionError) else ""
            raise OutputFolderError(f"storage error at {where}: {type(exc).__name__}: {msg}{hint}") from None

    def _fresh(self, path: str) -> None:
        # Other processes write here too: a listing cached by this process may be stale.
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)

    def exists(self, rel: str) -> bool:
        with self._errors(rel):
            self._fresh(self._path(rel))
            return bool(self.fs.exists(self._path(rel)))

    def read_bytes(self, rel: str) -> bytes:
        with self._errors(rel):
            return self.fs.cat_file(self._path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self._errors(rel):
            self.fs.pipe_file(self._path(rel), data)

    def read_many(self, rels: list[str]) -> dict[str, Optional[bytes]]:
        # One request each, many at a time: hundreds of markers in well under a second.
        from concurrent.futures import ThreadPoolExecutor

        def read(rel: str) -> Optional[bytes]:
            try:
                return self.read_bytes(rel)
            except FileNotFoundError:
                return None

        with ThreadPoolExecutor(min(32, max(1, len(rels)))) as pool:
            return dict(zip(rels, pool.map(read, rels)))

    def remove(self, rel: str) -> None:
        with self._errors(rel), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(rel))

    def remove_tree(self, rel: str) -> None:
        with self._errors(rel):
            path = self._path(rel)
            self._fresh(path)
            if self.fs.isdir(path):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(path, recursive=True)
            else:
                self.remove(rel)

    def listing(self, rel: str = "") -> dict[str, int]:
        path = self._path(rel)
        with self._errors(rel):
            self._fresh(path)
            try:
                entries = self.fs.ls(path, detail=True)
            except FileNotFoundError:
                return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
                for e in entries if e.get("type") == "file"}

    def names(self) -> list[str]:
        with self._errors():
            self._fresh(self.root)
            try:
                entries = self.fs.ls(self.root, detail=False)
            except FileNotFoundError:
                return []
        return [str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries]

    def version(self, rel: str) -> Optional[tuple]:
        path = self._path(rel)
        with self._errors(rel):
            self._fresh(path)
            try:
                info = self.fs.info(path)
            except FileNotFoundError:
                return None
        tag = next((info[k] for k in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "created") if info.get(k)), None)
        return (int(info.get("size") or 0), str(tag))

    def open_read(self, rel: str) -> IO[bytes]:
        with self._errors(rel):
            return self.fs.open(self._path(rel), "rb")

    def claim(self, name: str, wait: bool = False) -> Claim:
        return LeaseClaim(self, f"{STATE_DIR}/leases/{name}.json", wait)

    def folder_lock(self) -> contextlib.AbstractContextManager:
        # No lock exists here: folder-wide writes (plan, manifest, card) are idempotent instead.
        return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# opening
# --------------------------------------------------------------------------------------------------
def is_url(out: str | Path) -> bool:
    return isinstance(out, str) and "://" in out


def public_url(url: str) -> str:
    """``url`` without any ``user:secret@`` part: safe to print and to write."""
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme}{sep}{host.rpartition('@')[2]}{slash}{path}"


def _url_secret(url: str) -> str:
    """The ``user:secret`` part of ``url`` ("" when it has none)."""
    host = url.partition("://")[2].partition("/")[0]
    return host.rpartition("@")[0]


def _scrub(text: str, secret: str) -> str:
    """``text`` (an exception's message may quote the URL) with a URL's ``user:secret`` part masked."""
    return text.replace(secret, "***") if secret else text


def open_store(out: "str | Path | Store", storage_options: Optional[dict[str, Any]] = None, *,
               reading: bool = False) -> Store:
    """The store of the folder ``out``: a path or ``file://`` URL gives a :class:`LocalStore`,
    any other fsspec URL an :class:`ObjectStore` (its bucket must exist); a :class:`Store` is
    returned as it is. Raises one line when the protocol is unknown, its package is not
    installed, or the bucket is missing (``reading``: the folder is read, not built)."""
    if isinstance(out, Store):
        return out
    if not is_url(out):
        return LocalStore(Path(out))
    url = str(out)
    protocol = url.split("://", 1)[0].lower()
    if protocol in ("file", "local"):
        return LocalStore(Path(url.split("://", 1)[1]))
    shown = public_url(url)
    import fsspec
    from fsspec.registry import known_implementations

    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        hint = known_implementations.get(protocol, {}).get("err") or f"the package for {protocol}:// is not installed"
        raise OutputFolderError(f"cannot use {shown}: {hint.rstrip('.')}") from None
    except ValueError:
        raise OutputFolderError(
            f"cannot use {shown}: unknown storage protocol {protocol!r} (a local path, or an fsspec URL such as s3://bucket/folder)"
        ) from None
    secret = _url_secret(url)
    try:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except Exception as exc:  # bad storage options
        msg = _scrub(" ".join(str(exc).split()), secret)[:200]
        raise OutputFolderError(f"cannot open {shown}: {type(exc).__name__}: {msg}") from None
    store = ObjectStore(fs, root, shown.rstrip("/"), secret)
    bucket = root.split("/", 1)[0]
    if bucket and not root.startswith("/"):  # bucket-based stores (s3, gs, az...), not memory://
        try:
            with store._errors():  # info, not exists: exists reports an unreachable endpoint as "no bucket"
                fs.info(bucket)
            found = True
        except FileNotFoundError:
            found = False
        if not found:
            raise OutputFolderError(
                f"cannot use {shown}: bucket {bucket!r} does not exist (or these credentials cannot see it)"
                + ("" if reading else "; create it first")
            )
    return store
