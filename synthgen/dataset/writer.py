"""ShardWriter: one parquet shard per call, written to a temp name then renamed, then marked done.

The order (write temp -> fsync -> rename -> write marker) means a crash at any point leaves either
no shard, a stray temp file (removed on the next run), or a complete shard without its marker
(redone on the next run): never a half-written shard that looks finished.

A shard counts as done only when its file matches its marker: size and sha256, a row count and an
``index`` column that are exactly the marker's rows. The check reads each shard once per process
(cached by inode, size and modification time), so a garbled, truncated or swapped shard is rebuilt
instead of trusted. Each marker also records the model provenance and settings hash of its rows,
so the manifest can be rebuilt from markers alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features
from PIL import Image

from synthgen.dataset.plan import ShardSpec

STATE_DIR = ".synthgen"  # build state inside the dataset folder (plan, markers, locks)
TMP_PREFIX = ".tmp-"


@dataclass
class ShardRow:
    """One generated image and its provenance, as the writer stores it."""

    index: int
    image: Image.Image
    prompt: Optional[str]
    label: Optional[int]
    group: int
    seed: int
    retries: int
    meta: dict[str, Any]


def encode_image(image: Image.Image, image_format: str, jpeg_quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        # compress_level 1: PNG stays lossless; higher levels cost far more CPU for a few % of size
        image.save(buffer, format="PNG", compress_level=1)
    elif image_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=jpeg_quality)
    elif image_format == "webp":
        image.save(buffer, format="WEBP", quality=jpeg_quality)
    else:
        raise ValueError(f"unknown image format {image_format!r}")
    return buffer.getvalue()


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


# (path, inode, size, mtime_ns) -> problem (None: the file matched its marker). Per process: a
# resume reads each finished shard once, however often the build asks.
_CHECKED: dict[tuple, Optional[str]] = {}


def check_shard_file(path: Path, marker: dict[str, Any]) -> Optional[str]:
    """Why the shard file at ``path`` does not hold what ``marker`` says, or None when it does.

    Compares size, sha256, row count and the ``index`` column (exactly ``start .. stop-1``): a
    copied, garbled, truncated or swapped shard is caught even when its marker was edited to match.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return "file missing"
    if st.st_size != marker.get("bytes"):
        return f"size {st.st_size} bytes, marker says {marker.get('bytes')}"
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, marker.get("sha256"), marker.get("start"), marker.get("stop"))
    if key not in _CHECKED:
        _CHECKED[key] = _check_contents(path, marker)
    return _CHECKED[key]


def _remember_written(path: Path, marker: dict[str, Any]) -> None:
    """A shard this process just wrote matches its marker: no need to read it back."""
    st = path.stat()
    _CHECKED[(str(path), st.st_ino, st.st_size, st.st_mtime_ns, marker["sha256"], marker["start"], marker["stop"])] = None


def _check_contents(path: Path, marker: dict[str, Any]) -> Optional[str]:
    if file_sha256(path) != marker.get("sha256"):
        return "sha256 differs from its marker"
    try:
        indices = pq.read_table(path, columns=["index"]).column("index").to_pylist()
    except (OSError, pa.ArrowException) as exc:
        return f"unreadable parquet ({str(exc).splitlines()[0][:120]})"
    expected = list(range(marker.get("start", -1), marker.get("stop", -1)))
    if indices != expected:
        return f"holds rows {_span(indices)}, expected {_span(expected)}"
    return None


def _span(indices: Sequence[int]) -> str:
    if not indices:
        return "none"
    duplicates = len(indices) - len(set(indices))
    extra = f", {duplicates} duplicate(s)" if duplicates else ""
    return f"{min(indices)}..{max(indices)} ({len(indices)} rows{extra})"


class ShardWriter:
    """Writes the shards of one dataset folder and their completion markers."""

    def __init__(
        self,
        folder: str | Path,
        features: Features,
        settings_hash: str = "",
        image_format: str = "png",
        jpeg_quality: int = 95,
        encode_workers: int | None = None,
    ) -> None:
        # PIL releases the GIL while it compresses, so threads encode in parallel; on a GPU box
        # PNG encoding at 512 px (~25 images/s per core) would otherwise throttle generation.
        self.encode_workers = encode_workers or min(8, os.cpu_count() or 1)
        self.folder = Path(folder)
        self.features = features
        self.settings_hash = settings_hash  # stamped on every row; set once the model is loaded
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        self.has_labels = "label" in features
        self.markers = self.folder / STATE_DIR / "done"

    # ---------------------------------------------------------------------------------------------
    def marker_path(self, spec: ShardSpec) -> Path:
        return self.markers / f"{spec.name}.json"

    def read_marker(self, spec: ShardSpec) -> Optional[dict[str, Any]]:
        """The shard's marker, or None when there is none (or it is unreadable: redo the shard)."""
        try:
            marker = json.loads(self.marker_path(spec).read_text())
        except (OSError, ValueError):
            return None
        return marker if isinstance(marker, dict) else None

    def finished(self, spec: ShardSpec) -> Optional[dict[str, Any]]:
        """The marker of the shard's verified file when it holds at least ``spec``'s rows, else None.

        A shard cut short by an earlier ``--limit`` holds a prefix of its rows: it is done for a
        spec that stops no later, and :meth:`kept_rows` gives its rows to the build that completes it.
        """
        marker = self.read_marker(spec)
        if marker is None or marker.get("file") != spec.filename or marker.get("start") != spec.start:
            return None
        if marker.get("stop", -1) < spec.stop:
            return None
        return marker if check_shard_file(self.folder / spec.filename, marker) is None else None

    def is_done(self, spec: ShardSpec) -> bool:
        return self.finished(spec) is not None

    def problem(self, spec: ShardSpec) -> Optional[str]:
        """Why a shard that has a marker is not done (None without a marker, or when it is fine)."""
        marker = self.read_marker(spec)
        if marker is None:
            return None
        if marker.get("file") != spec.filename or marker.get("start") != spec.start:
            return f"its marker describes {marker.get('file')} rows from {marker.get('start')}"
        return check_shard_file(self.folder / spec.filename, marker)

    def kept_rows(self, spec: ShardSpec) -> Optional[pa.Table]:
        """The verified rows of a shard an earlier partial build cut short (``start .. stop'``,
        ``stop' < spec.stop``), to be kept byte for byte while the rest is generated."""
        marker = self.read_marker(spec)
        if marker is None or marker.get("file") != spec.filename or marker.get("start") != spec.start:
            return None
        if not spec.start < marker.get("stop", -1) < spec.stop:
            return None
        path = self.folder / spec.filename
        if check_shard_file(path, marker) is not None:
            return None
        table = pq.read_table(path)
        return table if table.schema.equals(self.features.arrow_schema, check_metadata=False) else None

    def stray_files(self) -> dict[str | None, list[Path]]:
        """Temp files a killed run may have left (ours all start with ``.tmp-``), by shard name.

        Shard and marker temp files are keyed by their shard's name; the folder's own state files
        (plan, manifest, card) by ``None``. Another live process may still be writing any of them:
        the caller removes a shard's files only while holding that shard's lock.
        """
        found: dict[str | None, list[Path]] = {}
        for sub in (self.folder / "data", self.markers):
            if sub.is_dir():
                for path in sub.glob(f"{TMP_PREFIX}*"):
                    # .tmp-<shard>.parquet.<pid> or .tmp-<shard>.json.<pid>
                    stem = path.name[len(TMP_PREFIX):].rsplit(".", 1)[0]
                    shard = stem.removesuffix(".parquet").removesuffix(".json")
                    found.setdefault(shard, []).append(path)
        for sub in (self.folder, self.folder / STATE_DIR):
            if sub.is_dir():
                found.setdefault(None, []).extend(sub.glob(f"{TMP_PREFIX}*"))
        return found

    def unplanned_files(self, planned: Iterable[ShardSpec]) -> list[Path]:
        """Files in ``data/`` that are neither a planned shard nor our temp files: the dataset card's
        ``data/<split>-*.parquet`` pattern would load a stray one as extra (duplicate) rows."""
        names = {Path(spec.filename).name for spec in planned}
        data = self.folder / "data"
        if not data.is_dir():
            return []
        return sorted(p for p in data.iterdir() if p.name not in names and not p.name.startswith(TMP_PREFIX))

    # ---------------------------------------------------------------------------------------------
    def to_table(self, rows: Sequence[ShardRow]) -> pa.Table:
        def encode(row: ShardRow) -> dict:
            return {"bytes": encode_image(row.image, self.image_format, self.jpeg_quality), "path": None}

        if self.encode_workers > 1 and len(rows) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(self.encode_workers) as pool:
                images = list(pool.map(encode, rows))
        else:
            images = [encode(r) for r in rows]
        columns: dict[str, list] = {
            "image": images,
            "index": [r.index for r in rows],
            "prompt": [r.prompt for r in rows],
        }
        if self.has_labels:
            columns["label"] = [r.label for r in rows]
        columns["group"] = [r.group for r in rows]
        columns["seed"] = [r.seed for r in rows]
        columns["retries"] = [r.retries for r in rows]
        columns["settings_hash"] = [self.settings_hash] * len(rows)
        columns["meta"] = [json.dumps(r.meta, sort_keys=True, ensure_ascii=False) for r in rows]
        # features.arrow_schema carries the "huggingface" metadata, so datasets reads the Image and
        # ClassLabel features back from the file itself, not only from the dataset card.
        return pa.Table.from_pydict(columns, schema=self.features.arrow_schema)

    def write(
        self,
        spec: ShardSpec,
        rows: Iterable[ShardRow],
        extra: dict[str, Any] | None = None,
        kept: Optional[pa.Table] = None,
    ) -> dict:
        """Write shard ``spec`` from ``rows`` (after ``kept``, rows an earlier build made) and mark it done."""
        rows = sorted(rows, key=lambda r: r.index)
        head = kept.num_rows if kept is not None else 0
        expected = list(range(spec.start + head, spec.stop))
        got = [r.index for r in rows]
        if got != expected:
            raise ValueError(f"shard {spec.name} expects indices {spec.start + head}..{spec.stop - 1}, got {got[:5]}...")
        table = self.to_table(rows)
        if kept is not None:
            table = pa.concat_tables([kept.cast(table.schema), table]).combine_chunks()
        retries = table.column("retries").to_pylist()
        path = self.folder / spec.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        # Row groups of ~100 images keep the Hub viewer and random access responsive.
        write_atomically(path, lambda tmp: pq.write_table(table, tmp, row_group_size=100))
        info = {
            "shard": spec.name,
            "file": spec.filename,
            "rows": table.num_rows,
            "start": spec.start,
            "stop": spec.stop,
            "bytes": path.stat().st_size,
            "sha256": file_sha256(path),
            "retries": sum(retries),
            "retried_images": sum(1 for r in retries if r),
            "settings_hash": self.settings_hash,
            **(extra or {}),
        }
        _remember_written(path, info)
        self.markers.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.marker_path(spec), json.dumps(info, indent=1))
        return info
