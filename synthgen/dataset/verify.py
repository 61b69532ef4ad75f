"""``verify_dataset``: check a built folder end to end before it is trusted or published.

Checks, against the manifest: every listed shard is there with its size and sha256; each shard is
readable parquet holding exactly its rows (the ``index`` column is ``start .. stop-1``, so no row is
missing or duplicated), made with the manifest's settings hash; the shards cover ``0 .. rows-1``
without gaps; every image decodes; no other file in ``data/`` would load as extra rows; the card's
row count matches. It reads every byte, so it is the slow, thorough check; a resume does the cheap
part (size, sha256, indices) of finished shards on its own.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from synthgen.dataset.folder import MANIFEST, PLAN_FILE
from synthgen.dataset.read import read_manifest
from synthgen.dataset.writer import STATE_DIR, TMP_PREFIX, file_sha256


@dataclass
class VerifyReport:
    folder: Path
    rows: int = 0  # rows found in readable shards
    shards: int = 0  # shards checked
    images_decoded: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_dataset(
    folder: str | Path, decode: bool = True, progress: Optional[Callable[[int], None]] = None
) -> VerifyReport:
    """Check ``folder`` (see the module doc); problems are listed in the report, never raised.

    Raises :class:`~synthgen.errors.SynthgenError` only when the folder is no synthgen dataset at all.
    """
    import pyarrow.parquet as pq

    folder = Path(folder)
    report = VerifyReport(folder)
    if not (folder / MANIFEST).is_file():
        if (folder / STATE_DIR / PLAN_FILE).is_file():
            report.problems.append(f"no {MANIFEST}: an unfinished build (run the same build command to finish it)")
            return report
    manifest = read_manifest(folder)  # raises for a folder that is no dataset
    listed = manifest.get("shards") or []
    settings_hash = manifest.get("settings_hash")
    class_count = len(manifest["class_names"]) if manifest.get("class_names") else None
    expected_start = 0
    for entry in listed:
        name = entry.get("file", "?")
        path = folder / name
        report.shards += 1
        if entry.get("start") != expected_start:
            report.problems.append(f"{name}: starts at row {entry.get('start')}, expected {expected_start} (a gap or overlap)")
        expected_start = entry.get("stop", expected_start)
        if not path.is_file():
            report.problems.append(f"{name}: missing")
            continue
        if path.stat().st_size != entry.get("bytes"):
            report.problems.append(f"{name}: {path.stat().st_size} bytes, the manifest says {entry.get('bytes')}")
        elif file_sha256(path) != entry.get("sha256"):
            report.problems.append(f"{name}: sha256 differs from the manifest (the file changed after it was written)")
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            report.problems.append(f"{name}: unreadable parquet ({str(exc).splitlines()[0][:160]})")
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
        if decode:
            bad = _undecodable(table, entry.get("start", 0))
            report.images_decoded += table.num_rows - len(bad)
            if bad:
                report.problems.append(f"{name}: {len(bad)} image(s) do not decode (rows {', '.join(map(str, bad[:5]))})")
        if progress is not None:
            progress(table.num_rows)
    if manifest.get("rows") != report.rows or expected_start != manifest.get("rows"):
        report.problems.append(f"the manifest says {manifest.get('rows')} rows; the shards hold {report.rows}")
    _check_data_folder(folder, {e.get("file") for e in listed}, report)
    _check_card(folder, manifest, report)
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


def _check_data_folder(folder: Path, listed: set, report: VerifyReport) -> None:
    data = folder / "data"
    for path in sorted(data.iterdir()) if data.is_dir() else []:
        rel = f"data/{path.name}"
        if rel in listed:
            continue
        if path.name.startswith(TMP_PREFIX):
            report.notes.append(f"{rel}: a temp file of an interrupted run (the next build removes it)")
        else:
            report.problems.append(f"{rel}: not a shard of this dataset (it would load as extra rows)")


def _check_card(folder: Path, manifest: dict, report: VerifyReport) -> None:
    import yaml

    card = folder / "README.md"
    if not card.is_file():
        report.problems.append("README.md (the dataset card) is missing")
        return
    text = card.read_text(encoding="utf-8", errors="replace")
    try:
        header = yaml.safe_load(text.split("---\n", 2)[1]) if text.startswith("---\n") else None
        splits = header["dataset_info"]["splits"]
        rows = sum(int(s["num_examples"]) for s in splits)
    except (IndexError, KeyError, TypeError, ValueError, yaml.YAMLError):
        report.problems.append("README.md has no readable dataset_info splits")
        return
    if rows != manifest.get("rows"):
        report.problems.append(f"README.md says {rows} rows; the manifest says {manifest.get('rows')}")


def format_report(report: VerifyReport) -> list[str]:
    """Lines for the CLI: problems first, then a one-line verdict."""
    lines = [f"problem: {p}" for p in report.problems] + [f"note: {n}" for n in report.notes]
    decoded = f", {report.images_decoded:,} images decoded" if report.images_decoded else ""
    verdict = "ok" if report.ok else f"{len(report.problems)} problem(s)"
    lines.append(f"{report.folder}: {verdict}; {report.rows:,} rows in {report.shards} shard(s){decoded}")
    return lines
