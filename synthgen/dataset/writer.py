"""ShardWriter: one parquet shard per call, written whole, then marked done.

The order (write the shard whole -> write its marker) means a crash at any point leaves either no
shard, a stray temp file on a local folder (removed on the next run), or a complete shard without
its marker (redone on the next run): never a half-written shard that looks finished. On a local
folder "whole" is temp file -> fsync -> rename; on an object store it is one PUT (see ``storage.py``).

A shard counts as done only when its file matches its marker: size and sha256, a row count and an
``index`` column that are exactly the marker's rows. The check reads each shard once per process
(cached by the file's version: inode, size and modification time, or size and ETag), so a garbled,
truncated or swapped shard is rebuilt instead of trusted. A cheaper check (:meth:`ShardWriter.marked_many`:
the marker is there and the file has its size) is what processes use for shards another process
made. Each marker also records the model provenance and settings hash of its rows, so the manifest
can be rebuilt from markers alone, with what the dataset card needs (images per label,
regenerated images per label, the uncompressed size), counted while the shard is in memory, so the
card never reads shards back.

Writing a shard is two steps a pipelined writer overlaps with generation (``shard_task.py``):
:meth:`ShardWriter.encode` (images -> resized to the stored size -> encoded -> an arrow table, CPU
threads) and :meth:`ShardWriter.commit` (table -> parquet bytes -> the store, then the marker).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features
from PIL import Image

from synthgen.dataset.plan import ShardSpec
from synthgen.dataset.storage import (  # noqa: F401 - the atomic helpers are imported from here too
    STATE_DIR,
    TMP_PREFIX,
    LocalStore,
    Store,
    atomic_write_bytes,
    atomic_write_text,
    file_sha256,
    temp_path,
    write_atomically,
)
from synthgen.generate.generator import resize_to_stored
from synthgen.recipe import OutputConfig

MARKERS = f"{STATE_DIR}/done"


@dataclass
class ShardRow:
    """One generated image and its provenance, as the writer stores it."""

    index: int
    image: Image.Image  # as generated: the writer resizes it to the stored size
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


# (store, path, version, marker's sha256/start/stop) -> problem (None: the file matched its marker).
# Per process: a resume reads each finished shard once, however often the build asks.
_CHECKED: dict[tuple, Optional[str]] = {}


def check_shard(store: Store, rel: str, marker: dict[str, Any]) -> Optional[str]:
    """Why the shard file ``rel`` does not hold what ``marker`` says, or None when it does.

    Compares size, sha256, row count and the ``index`` column (exactly ``start .. stop-1``): a
    copied, garbled, truncated or swapped shard is caught even when its marker was edited to match.
    """
    version = store.version(rel)
    problem = _size_problem(version, marker)
    if problem is not None:
        return problem
    key = (store.display, rel, version, marker.get("sha256"), marker.get("start"), marker.get("stop"))
    if key not in _CHECKED:
        _CHECKED[key] = _check_contents(store, rel, marker)
    return _CHECKED[key]


def read_checked_shard(store: Store, rel: str, marker: dict[str, Any]) -> tuple[Optional[str], Optional[pa.Table]]:
    """The shard ``rel`` read once and checked as :func:`check_shard` checks it: ``(problem, None)``,
    or ``(None, its table)`` -- for a caller that needs the rows anyway (one download from an object
    store instead of a checking pass and a reading pass)."""
    problem = _size_problem(store.version(rel), marker)
    if problem is not None:
        return problem, None
    data = store.read_bytes(rel)
    if hashlib.sha256(data).hexdigest() != marker.get("sha256"):
        return "sha256 differs from its marker", None
    try:
        table = pq.read_table(pa.BufferReader(data))
        indices = table.column("index").to_pylist()
    except (OSError, KeyError, pa.ArrowException) as exc:
        return _unreadable(exc), None
    problem = _index_problem(indices, marker)
    return problem, table if problem is None else None


def _size_problem(version: Optional[tuple], marker: dict[str, Any]) -> Optional[str]:
    if version is None:
        return "file missing"
    if version[0] != marker.get("bytes"):
        return f"size {version[0]} bytes, marker says {marker.get('bytes')}"
    return None


def _unreadable(exc: BaseException) -> str:
    return f"unreadable parquet ({str(exc).splitlines()[0][:120]})"


def _index_problem(indices: list[int], marker: dict[str, Any]) -> Optional[str]:
    expected = list(range(marker.get("start", -1), marker.get("stop", -1)))
    if indices != expected:
        return f"holds rows {_span(indices)}, expected {_span(expected)}"
    return None


def _remember_written(store: Store, rel: str, marker: dict[str, Any]) -> None:
    """A shard this process just wrote matches its marker: no need to read it back."""
    version = store.version(rel)
    if version is not None:
        _CHECKED[(store.display, rel, version, marker["sha256"], marker["start"], marker["stop"])] = None


def _check_contents(store: Store, rel: str, marker: dict[str, Any]) -> Optional[str]:
    if store.sha256(rel) != marker.get("sha256"):
        return "sha256 differs from its marker"
    try:
        with store.open_read(rel) as f:
            indices = pq.read_table(f, columns=["index"]).column("index").to_pylist()
    except (OSError, pa.ArrowException) as exc:
        return _unreadable(exc)
    return _index_problem(indices, marker)


def label_counts(labels: Iterable[Optional[int]]) -> dict[str, int]:
    """Images per label id, as a marker stores it: ``{"0": 3, "7": 1}`` (JSON keys are strings;
    labels with no image are left out, so a shard of one class stays small)."""
    counts = Counter(labels)
    return {str(label): counts[label] for label in sorted(counts, key=lambda x: (x is None, x))}


def shard_retried_label_counts(labels: Sequence[Optional[int]], retries: Sequence[int]) -> dict[str, int]:
    """Regenerated rows per label id of one shard (a marker's ``retried_label_counts``): the labels
    of the rows whose ``retries`` is not 0, counted as :func:`label_counts` does."""
    return label_counts(label for label, r in zip(labels, retries) if r)


def retried_label_counts(shards: Iterable[dict[str, Any]]) -> tuple[dict[str, int], int]:
    """Regenerated images per label id over shard markers (or a manifest's ``shards``), summed like
    :func:`label_counts`, and how many regenerated images no marker breaks down by label: markers
    of an older synthgen lack ``retried_label_counts`` (those with no regenerated image add nothing)."""
    counts: Counter = Counter()
    unknown = 0
    for shard in shards:
        per_label = shard.get("retried_label_counts")
        if isinstance(per_label, dict):
            counts.update(per_label)
        else:
            unknown += int(shard.get("retried_images", 0) or 0)
    ordered = sorted(counts, key=lambda k: (k == "None", int(k) if k != "None" else 0))
    return {k: counts[k] for k in ordered}, unknown


def parquet_uncompressed_bytes(metadata: pq.FileMetaData) -> int:
    """A parquet file's uncompressed size, from its footer (the card's ``num_bytes``)."""
    return sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))


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
        folder: str | Path | Store,
        features: Features,
        settings_hash: str = "",
        image_format: str = "png",
        jpeg_quality: int = 95,
        encode_workers: int | None = None,
        stored: Optional[OutputConfig] = None,
    ) -> None:
        # PIL releases the GIL while it compresses, so threads encode in parallel; on a GPU box
        # PNG encoding at 512 px (~25 images/s per core) would otherwise throttle generation.
        self.encode_workers = encode_workers or min(8, os.cpu_count() or 1)
        self.store = folder if isinstance(folder, Store) else LocalStore(Path(folder))
        self.features = features
        self.settings_hash = settings_hash  # stamped on every row; set once the model is loaded
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        self.has_labels = "label" in features
        # images are resized to ``stored.image_size`` in the encode threads, off the generator's thread
        self.stored = stored

    # ---------------------------------------------------------------------------------------------
    def marker_rel(self, spec: ShardSpec) -> str:
        return f"{MARKERS}/{spec.name}.json"

    def read_marker(self, spec: ShardSpec) -> Optional[dict[str, Any]]:
        """The shard's marker, or None when there is none (or it is unreadable: redo the shard)."""
        marker = self.store.read_json(self.marker_rel(spec))
        return marker if isinstance(marker, dict) else None

    @staticmethod
    def covers(marker: Optional[dict], spec: ShardSpec) -> bool:
        """The marker describes this shard's file from its first row through at least ``spec.stop``."""
        return (marker is not None and marker.get("file") == spec.filename and marker.get("start") == spec.start
                and marker.get("stop", -1) >= spec.stop)

    def finished(self, spec: ShardSpec) -> Optional[dict[str, Any]]:
        """The marker of the shard's verified file when it holds at least ``spec``'s rows, else None.

        A shard cut short by an earlier ``--limit`` holds a prefix of its rows: it is done for a
        spec that stops no later, and :meth:`kept_rows` gives its rows to the build that completes it.
        """
        marker = self.read_marker(spec)
        if not self.covers(marker, spec):
            return None
        return marker if check_shard(self.store, spec.filename, marker) is None else None

    def is_done(self, spec: ShardSpec) -> bool:
        return self.finished(spec) is not None

    def marked_many(self, specs: Sequence[ShardSpec]) -> dict[int, dict[str, Any]]:
        """The markers of ``specs``' shards that cover their shard and whose file has the marker's
        size: the cheap check for shards another process made (it wrote the file whole, then hashed
        and marked it). A few requests: one listing of the markers and of ``data/``, then the listed
        markers read together. Shard index -> marker."""
        names, sizes = self.marker_names(), self.data_sizes()
        listed = [spec for spec in specs if f"{spec.name}.json" in names]
        raw = self.store.read_many([self.marker_rel(spec) for spec in listed])
        out = {}
        for spec in listed:
            try:
                marker = json.loads(raw[self.marker_rel(spec)] or b"null")
            except ValueError:
                continue
            if isinstance(marker, dict) and self.covers(marker, spec) and \
                    sizes.get(spec.filename.rsplit("/", 1)[-1]) == marker.get("bytes"):
                out[spec.index] = marker
        return out

    def data_sizes(self) -> dict[str, int]:
        return self.store.listing("data")

    def marker_names(self) -> set[str]:
        return set(self.store.listing(MARKERS))

    def problem(self, spec: ShardSpec) -> Optional[str]:
        """Why a shard that has a marker is not done (None without a marker, or when it is fine)."""
        marker = self.read_marker(spec)
        if marker is None:
            return None
        if marker.get("file") != spec.filename or marker.get("start") != spec.start:
            return f"its marker describes {marker.get('file')} rows from {marker.get('start')}"
        return check_shard(self.store, spec.filename, marker)

    def kept_rows(self, spec: ShardSpec) -> Optional[pa.Table]:
        """The verified rows of a shard an earlier partial build cut short (``start .. stop'``,
        ``stop' < spec.stop``), to be kept byte for byte while the rest is generated."""
        marker = self.read_marker(spec)
        if marker is None or marker.get("file") != spec.filename or marker.get("start") != spec.start:
            return None
        if not spec.start < marker.get("stop", -1) < spec.stop:
            return None
        if check_shard(self.store, spec.filename, marker) is not None:
            return None
        with self.store.open_read(spec.filename) as f:
            table = pq.read_table(f)
        return table if table.schema.equals(self.features.arrow_schema, check_metadata=False) else None

    def unplanned_files(self, planned: Iterable[ShardSpec]) -> list[str]:
        """Files in ``data/`` that are neither a planned shard nor our temp files: the dataset card's
        ``data/<split>-*.parquet`` pattern would load a stray one as extra (duplicate) rows."""
        names = {spec.filename.rsplit("/", 1)[-1] for spec in planned}
        return sorted(f"data/{n}" for n in self.store.listing("data") if n not in names and not n.startswith(TMP_PREFIX))

    # ---------------------------------------------------------------------------------------------
    def to_table(self, rows: Sequence[ShardRow]) -> pa.Table:
        def encode(row: ShardRow) -> dict:
            image = row.image if self.stored is None else resize_to_stored(row.image, self.stored)
            return {"bytes": encode_image(image, self.image_format, self.jpeg_quality), "path": None}

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

    def encode(self, spec: ShardSpec, rows: Iterable[ShardRow], kept: Optional[pa.Table] = None) -> pa.Table:
        """The shard's table: ``kept`` (rows an earlier build made) then ``rows``, encoded."""
        rows = sorted(rows, key=lambda r: r.index)
        head = kept.num_rows if kept is not None else 0
        expected = list(range(spec.start + head, spec.stop))
        got = [r.index for r in rows]
        if got != expected:
            raise ValueError(f"shard {spec.name} expects indices {spec.start + head}..{spec.stop - 1}, got {got[:5]}...")
        table = self.to_table(rows)
        if kept is not None:
            table = pa.concat_tables([kept.cast(table.schema), table]).combine_chunks()
        return table

    def commit(self, spec: ShardSpec, table: pa.Table, extra: dict[str, Any] | None = None) -> dict:
        """Write the shard's file whole, then its marker; returns the marker."""
        buffer = io.BytesIO()
        # Row groups of ~100 images keep the Hub viewer and random access responsive.
        pq.write_table(table, buffer, row_group_size=100)
        data = buffer.getvalue()
        retries = table.column("retries").to_pylist()
        self.store.write_bytes(spec.filename, data)
        # what the card needs, kept in the marker so that no one reads the shards again for it
        summary: dict[str, Any] = {"uncompressed_bytes": parquet_uncompressed_bytes(pq.read_metadata(pa.BufferReader(data)))}
        if self.has_labels:
            labels = table.column("label").to_pylist()
            summary["label_counts"] = label_counts(labels)
            # the classes that needed regenerations (black, non-finite, flagged): the card lists the most
            summary["retried_label_counts"] = shard_retried_label_counts(labels, retries)
        info = {
            "shard": spec.name,
            "file": spec.filename,
            "rows": table.num_rows,
            "start": spec.start,
            "stop": spec.stop,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "retries": sum(retries),
            "retried_images": sum(1 for r in retries if r),
            **summary,
            "settings_hash": self.settings_hash,
            **(extra or {}),
        }
        _remember_written(self.store, spec.filename, info)
        self.store.write_text(self.marker_rel(spec), json.dumps(info, indent=1))
        return info

    def write(
        self,
        spec: ShardSpec,
        rows: Iterable[ShardRow],
        extra: dict[str, Any] | None = None,
        kept: Optional[pa.Table] = None,
    ) -> dict:
        """Write shard ``spec`` from ``rows`` (after ``kept``, rows an earlier build made) and mark it done."""
        return self.commit(spec, self.encode(spec, rows, kept), extra)
