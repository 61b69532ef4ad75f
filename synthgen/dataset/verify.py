"""``verify_dataset``: check a built folder end to end before it is trusted or published.

Checks, against the manifest: every listed shard is there with its size and sha256; each shard is
readable parquet holding exactly its rows (the ``index`` column is ``start .. stop-1``, so no row is
missing or duplicated), made with the manifest's settings hash; the shards cover ``0 .. rows-1``
without gaps; labels are class ids, as many per class (and regenerated rows per class) as the
manifest records; every image decodes; no other file in ``data/`` would load as extra rows; the
card's row count and per-class counts match. It reads every byte, so it is the slow, thorough
check; a resume does the cheap part (size, sha256, indices) of finished shards on its own.

The folder is a local path or any fsspec URL (``s3://bucket/ds``), read through its
:class:`~synthgen.dataset.storage.Store`: the same checks either way.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from synthgen.dataset.folder import CARD, MANIFEST, PLAN_REL
from synthgen.dataset.read import read_manifest
from synthgen.dataset.schema import PROVENANCE_COLUMNS
from synthgen.dataset.storage import TMP_PREFIX, Store, open_store
from synthgen.dataset.writer import label_counts, shard_retried_label_counts

# a row of the card's class table: "| 3 | cat | 1,204 |"
CARD_CLASS_ROW = re.compile(r"^\| (\d+) \| .* \| ([\d,]+) \|$", re.M)


@dataclass
class VerifyReport:
    folder: Path | str  # a path, or the URL without credentials
    rows: int = 0  # rows found in readable shards
    shards: int = 0  # shards checked
    images_decoded: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_dataset(
    folder: str | Path | Store,
    decode: bool = True,
    progress: Optional[Callable[[int], None]] = None,
    *,
    storage_options: Optional[dict[str, Any]] = None,
) -> VerifyReport:
    """Check ``folder`` (a path, an fsspec URL opened with ``storage_options``, or a store; see the
    module doc); problems are listed in the report, never raised.

    Raises :class:`~synthgen.errors.SynthgenError` only when the folder cannot be opened (unknown
    protocol, its package missing, no such bucket) or is no synthgen dataset at all.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = open_store(folder, storage_options, reading=True)
    report = VerifyReport(store.local if store.local is not None else store.display)
    if not store.exists(MANIFEST) and store.exists(PLAN_REL):
        report.problems.append(f"no {MANIFEST}: an unfinished build (run the same build command to finish it)")
        return report
    manifest = read_manifest(store)  # raises for a folder that is no dataset
    listed = manifest.get("shards") or []
    settings_hash = manifest.get("settings_hash")
    class_count = len(manifest["class_names"]) if manifest.get("class_names") else None
    labels_seen: Optional[Counter] = Counter() if class_count is not None else None
    expected_start = 0
    for entry in listed:
        name = entry.get("file", "?")
        report.shards += 1
        if entry.get("start") != expected_start:
            report.problems.append(f"{name}: starts at row {entry.get('start')}, expected {expected_start} (a gap or overlap)")
        expected_start = entry.get("stop", expected_start)
        try:
            data = store.read_bytes(name)  # once: hashed, then parsed from memory
        except (FileNotFoundError, IsADirectoryError):
            report.problems.append(f"{name}: missing")
            labels_seen = None  # the card's counts cannot be checked without every shard
            continue
        if len(data) != entry.get("bytes"):
            report.problems.append(f"{name}: {len(data)} bytes, the manifest says {entry.get('bytes')}")
        elif hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            report.problems.append(f"{name}: sha256 differs from the manifest (the file changed after it was written)")
        try:
            table = pq.read_table(pa.BufferReader(data))
        except Exception as exc:  # pyarrow raises several types for a damaged file
            report.problems.append(f"{name}: unreadable parquet ({str(exc).splitlines()[0][:160]})")
            labels_seen = None
            continue
        absent = [c for c in ("image", *PROVENANCE_COLUMNS) if c not in table.column_names
                  and (c != "label" or class_count is not None)]
        if absent:  # another parquet file in a shard's place: nothing more to check in it
            report.problems.append(f"{name}: not a shard of this dataset (no column {', '.join(absent)})")
            labels_seen = None
            continue
        indices = table.column("index").to_pylist()
        report.rows += len(indices)
        want = list(range(entry.get("start", 0), entry.get("stop", 0)))
        if indices != want:
            dupes = len(indices) - len(set(indices))
            report.problems.append(
                f"{name}: holds {len(indices)} rows with indices {min(indices, default='-')}..{max(indices, default='-')}"
                + (f" ({dupes} duplicated)" if dupes else "") + f", expected {want[0] if want else '-'}..{want[-1] if want else '-'}"
            )
        other = sorted(set(table.column("settings_hash").to_pylist()) - {settings_hash})
        if other:
            report.problems.append(f"{name}: rows made with other settings ({', '.join(map(str, other))})")
        if class_count is not None and "label" in table.column_names:
            labels = table.column("label").to_pylist()
            if any(label is None or not 0 <= label < class_count for label in labels):
                report.problems.append(f"{name}: labels outside 0..{class_count - 1}")
            recorded = entry.get("label_counts")  # absent in folders built before markers held it
            if recorded is not None and recorded != label_counts(labels):
                report.problems.append(f"{name}: its labels are not the per-class counts the manifest records")
            recorded = entry.get("retried_label_counts")  # absent in folders built before markers held it
            retried = shard_retried_label_counts(labels, table.column("retries").to_pylist())
            if recorded is not None and recorded != retried:
                report.problems.append(f"{name}: its regenerated rows are not the per-class counts the manifest records")
            if labels_seen is not None:
                labels_seen.update(labels)
        if decode:
            bad = _undecodable(table, entry.get("start", 0))
            report.images_decoded += table.num_rows - len(bad)
            if bad:
                report.problems.append(f"{name}: {len(bad)} image(s) do not decode (rows {', '.join(map(str, bad[:5]))})")
        if progress is not None:
            progress(table.num_rows)
    if manifest.get("rows") != report.rows or expected_start != manifest.get("rows"):
        report.problems.append(f"the manifest says {manifest.get('rows')} rows; the shards hold {report.rows}")
    _check_data_folder(store.listing("data"), {e.get("file") for e in listed}, report)
    _check_card(store, manifest, labels_seen, report)
    return report


def _undecodable(table, start: int) -> list[int]:
    from PIL import Image

    bad = []
    for offset, cell in enumerate(table.column("image").to_pylist()):
        try:
            with Image.open(io.BytesIO(cell["bytes"])) as image:
                image.load()
        except Exception:  # PIL raises many types for broken data
            bad.append(start + offset)
    return bad


def _check_data_folder(names: dict[str, int], listed: set, report: VerifyReport) -> None:
    for name in sorted(names):
        rel = f"data/{name}"
        if rel in listed:
            continue
        if name.startswith(TMP_PREFIX):
            report.notes.append(f"{rel}: a temp file of an interrupted run (the next build removes it)")
        else:
            report.problems.append(f"{rel}: not a shard of this dataset (data/ holds shards only"
                                   + ("; it would load as extra rows)" if name.endswith(".parquet") else ")"))


def _check_card(store: Store, manifest: dict, labels: Optional[Counter], report: VerifyReport) -> None:
    """The card's row count, and its per-class counts against the labels the shards hold."""
    import yaml

    try:
        text = store.read_bytes(CARD).decode("utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        report.problems.append(f"{CARD} (the dataset card) is missing")
        return
    try:
        header = yaml.safe_load(text.split("---\n", 2)[1]) if text.startswith("---\n") else None
        splits = header["dataset_info"]["splits"]
        rows = sum(int(s["num_examples"]) for s in splits)
    except (IndexError, KeyError, TypeError, ValueError, yaml.YAMLError):
        report.problems.append(f"{CARD} has no readable dataset_info splits")
        return
    if rows != manifest.get("rows"):
        report.problems.append(f"{CARD} says {rows} rows; the manifest says {manifest.get('rows')}")
    if labels is None:
        return
    table = {int(label): int(n.replace(",", "")) for label, n in CARD_CLASS_ROW.findall(text)}
    if not table:
        report.notes.append(f"{CARD} lists no per-class counts (a card written before synthgen counted them)")
        return
    expected = {i: labels.get(i, 0) for i in range(len(manifest["class_names"]))}
    if table != expected:
        wrong = sorted(i for i in set(table) | set(expected) if table.get(i) != expected.get(i))
        report.problems.append(f"{CARD}: per-class counts differ from the shards' labels (label {wrong[0]}"
                               + (f" and {len(wrong) - 1} more)" if len(wrong) > 1 else ")"))


def format_report(report: VerifyReport) -> list[str]:
    """Lines for the CLI: problems first, then a one-line verdict."""
    lines = [f"problem: {p}" for p in report.problems] + [f"note: {n}" for n in report.notes]
    decoded = f", {report.images_decoded:,} images decoded" if report.images_decoded else ""
    verdict = "ok" if report.ok else f"{len(report.problems)} problem(s)"
    lines.append(f"{report.folder}: {verdict}; {report.rows:,} rows in {report.shards} shard(s){decoded}")
    return lines
