"""ShardWriter: one parquet shard per call, written to a temp name then renamed, then marked done.

The order (write temp -> fsync -> rename -> write marker) means a crash at any point leaves either
no shard, a stray temp file (removed on the next run), or a complete shard without its marker
(redone on the next run): never a half-written shard that looks finished.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


class ShardWriter:
    """Writes the shards of one dataset folder and their completion markers."""

    def __init__(
        self,
        folder: str | Path,
        features: Features,
        settings_hash: str,
        image_format: str = "png",
        jpeg_quality: int = 95,
        encode_workers: int | None = None,
    ) -> None:
        # PIL releases the GIL while it compresses, so threads encode in parallel; on a GPU box
        # PNG encoding at 512 px (~25 images/s per core) would otherwise throttle generation.
        self.encode_workers = encode_workers or min(8, os.cpu_count() or 1)
        self.folder = Path(folder)
        self.features = features
        self.settings_hash = settings_hash
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        self.has_labels = "label" in features
        self.markers = self.folder / STATE_DIR / "done"

    # ---------------------------------------------------------------------------------------------
    def marker_path(self, spec: ShardSpec) -> Path:
        return self.markers / f"{spec.name}.json"

    def is_done(self, spec: ShardSpec) -> bool:
        """A shard is done when its marker exists and the file it describes is there, whole."""
        marker = self.marker_path(spec)
        if not marker.is_file():
            return False
        try:
            info = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        shard = self.folder / spec.filename
        return shard.is_file() and shard.stat().st_size == info.get("bytes")

    def read_marker(self, spec: ShardSpec) -> dict[str, Any]:
        return json.loads(self.marker_path(spec).read_text())

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

    def write(self, spec: ShardSpec, rows: Iterable[ShardRow], extra: dict[str, Any] | None = None) -> dict:
        rows = sorted(rows, key=lambda r: r.index)
        expected = list(range(spec.start, spec.stop))
        got = [r.index for r in rows]
        if got != expected:
            raise ValueError(f"shard {spec.name} expects indices {spec.start}..{spec.stop - 1}, got {got[:5]}...")
        table = self.to_table(rows)
        path = self.folder / spec.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
        # Row groups of ~100 images keep the Hub viewer and random access responsive.
        pq.write_table(table, tmp, row_group_size=100)
        with open(tmp, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        info = {
            "shard": spec.name,
            "file": spec.filename,
            "rows": len(rows),
            "start": spec.start,
            "stop": spec.stop,
            "bytes": path.stat().st_size,
            "sha256": digest,
            "retries": sum(r.retries for r in rows),
            "retried_images": sum(1 for r in rows if r.retries),
            **(extra or {}),
        }
        self.markers.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.marker_path(spec), json.dumps(info, indent=1))
        return info
