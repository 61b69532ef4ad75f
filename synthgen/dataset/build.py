"""``build_dataset``: recipe -> prompt sampler -> shard plan -> generator -> shard writer -> folder.

Resumable and safe to run in several processes at once on one folder: each shard is claimed with
an advisory file lock (released by the OS if the process dies, even on ``kill -9``), finished shards
carry a completion marker and are skipped, and whichever process finishes the last shard writes the
manifest and the dataset card.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import platform
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

from synthgen.dataset.card import write_card
from synthgen.dataset.plan import ShardPlan, ShardSpec
from synthgen.dataset.schema import dataset_features
from synthgen.dataset.writer import STATE_DIR, ShardRow, ShardWriter, atomic_write_text
from synthgen.errors import OutputFolderError, SynthgenError
from synthgen.provenance import library_versions
from synthgen.prompts.base import PromptSampler
from synthgen.recipe import Recipe

MANIFEST = "synthgen_manifest.json"
PLAN_FILE = "plan.json"
# Files a build owns in its folder; --overwrite removes these and nothing else.
OWNED = ("data", STATE_DIR, "README.md", MANIFEST)


@dataclass
class BuildPlan:
    recipe: Recipe
    folder: Path
    sampler: PromptSampler
    plan: ShardPlan
    state: str  # "new", "resume" or "overwrite"
    done: list[int] = field(default_factory=list)  # shards already finished

    @property
    def todo(self) -> list[ShardSpec]:
        done = set(self.done)
        return [s for s in self.plan.shards() if s.index not in done]


@dataclass
class BuildResult:
    folder: Path
    rows_planned: int
    shards_written: int
    shards_skipped: int
    complete: bool
    retries: int
    seconds: float
    manifest: Optional[dict] = None


# --------------------------------------------------------------------------------------------------
# planning and the output folder
# --------------------------------------------------------------------------------------------------
def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def changed_keys(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _inspect_folder(folder: Path, recipe: Recipe, overwrite: bool) -> str:
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"output path {folder} exists and is not a folder")
    if not folder.exists() or not any(folder.iterdir()):
        return "new"
    plan_file = folder / STATE_DIR / PLAN_FILE
    if not plan_file.exists() and [p.name for p in folder.iterdir()] == [STATE_DIR]:
        # Another process sharing the folder is writing its plan this instant (or was killed
        # before it did): _prepare_folder re-checks the plan under the folder lock.
        return "new"
    if not plan_file.is_file():
        raise OutputFolderError(
            f"output folder {folder} is not empty and holds no synthgen build; choose an empty or new folder"
        )
    try:
        stored = json.loads(plan_file.read_text())
    except (OSError, json.JSONDecodeError):
        stored = {}
    if stored.get("recipe_hash") == recipe.recipe_hash():
        return "resume"
    if overwrite:
        return "overwrite"
    old = stored.get("recipe", {})
    keys = changed_keys(old, recipe.resolved()) if old else ["(unreadable plan)"]
    shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    raise OutputFolderError(
        f"output folder {folder} holds recipe '{old.get('name', '?')}' with other settings "
        f"(differs in: {shown}); use --overwrite to replace it or --out to choose another folder"
    )


def plan_build(recipe: Recipe, out: str | Path, overwrite: bool = False) -> BuildPlan:
    """Everything a build decides before it touches the disk: raises on any bad input."""
    from synthgen.prompts import build_sampler

    folder = Path(out)
    sampler = build_sampler(recipe)
    if len(sampler) != recipe.count:
        raise SynthgenError(f"prompt sampler gives {len(sampler)} prompts for count {recipe.count}")
    plan = ShardPlan(recipe.count, recipe.output.images_per_shard, recipe.output.split)
    state = _inspect_folder(folder, recipe, overwrite)
    build = BuildPlan(recipe, folder, sampler, plan, state)
    if state == "resume":
        writer = _writer(build)
        build.done = [s.index for s in plan.shards() if writer.is_done(s)]
    return build


def _writer(build: BuildPlan) -> ShardWriter:
    out = build.recipe.output
    return ShardWriter(
        build.folder,
        dataset_features(build.sampler.class_names),
        build.recipe.settings_hash(),
        image_format=out.image_format,
        jpeg_quality=out.jpeg_quality,
    )


FOLDER_LOCK = "folder.lock"


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Serialises folder-wide changes (plan, clean-up, manifest) between processes sharing it.

    The lock file is never deleted, not even by ``--overwrite``: a process that opened a fresh
    file at the same path would not exclude one holding the old inode.
    """
    (folder / STATE_DIR).mkdir(parents=True, exist_ok=True)
    with open(folder / STATE_DIR / FOLDER_LOCK, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prepare_folder(build: BuildPlan, writer: ShardWriter) -> None:
    """Overwrite if asked, write the plan, and remove temp files no live process is writing."""
    folder = build.folder
    with _folder_lock(folder):
        if build.state == "overwrite":
            for name in OWNED:
                path = folder / name
                if name == STATE_DIR and path.is_dir():
                    for child in path.iterdir():
                        if child.name == FOLDER_LOCK:
                            continue
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
                elif path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        plan_file = folder / STATE_DIR / PLAN_FILE
        if build.state == "new" and plan_file.exists():
            # a process sharing the folder wrote its plan after we looked: it must be ours
            _inspect_folder(folder, build.recipe, overwrite=False)
        if not plan_file.exists() or build.state == "overwrite":
            payload = {
                "recipe": build.recipe.resolved(),
                "recipe_hash": build.recipe.recipe_hash(),
                "settings_hash": build.recipe.settings_hash(),
                "plan": build.plan.to_dict(),
            }
            atomic_write_text(plan_file, json.dumps(payload, indent=1))
        _remove_stray_files(build, writer)


def _remove_stray_files(build: BuildPlan, writer: ShardWriter) -> None:
    # Called under the folder lock, so the folder's own state files are nobody's work in progress.
    # A shard's temp files may belong to a live process on this folder: touch them only while
    # holding that shard's lock, which a dead process no longer holds.
    specs = {spec.name: spec for spec in build.plan.shards()}
    for shard, paths in writer.stray_files().items():
        spec = specs.get(shard)  # None for the folder's state files and for unplanned names
        with _claim(build.folder, spec) if spec is not None else contextlib.nullcontext(True) as free:
            if free:
                for path in paths:
                    path.unlink(missing_ok=True)


@contextlib.contextmanager
def _claim(folder: Path, spec: ShardSpec) -> Iterator[bool]:
    """An exclusive, non-blocking advisory lock on one shard; the OS drops it if we die."""
    locks = folder / STATE_DIR / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{spec.name}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# versions and manifest
# --------------------------------------------------------------------------------------------------
def _finalize(build: BuildPlan, writer: ShardWriter, model_info: dict[str, Any]) -> Optional[dict]:
    with _folder_lock(build.folder):
        return _write_manifest(build, writer, model_info)


def _write_manifest(build: BuildPlan, writer: ShardWriter, model_info: dict[str, Any]) -> Optional[dict]:
    shards = build.plan.shards()
    if not all(writer.is_done(s) for s in shards):
        return None
    markers = [writer.read_marker(s) for s in shards]
    manifest = {
        "synthgen_manifest": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": build.recipe.resolved(),
        "recipe_hash": build.recipe.recipe_hash(),
        "settings_hash": build.recipe.settings_hash(),
        "generation_settings": build.recipe.generation_settings(),
        "plan": build.plan.to_dict(),
        "class_names": list(build.sampler.class_names) if build.sampler.class_names is not None else None,
        "rows": sum(m["rows"] for m in markers),
        "bytes": sum(m["bytes"] for m in markers),
        "retries": sum(m.get("retries", 0) for m in markers),
        "retried_images": sum(m.get("retried_images", 0) for m in markers),
        "model": model_info,
        "versions": library_versions(),
        "shards": markers,
    }
    atomic_write_text(build.folder / MANIFEST, json.dumps(manifest, indent=1))
    write_card(build.folder, manifest, writer.features)
    return manifest


# --------------------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------------------
def build_dataset(
    recipe: Recipe,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    num_workers: int = 1,
    worker_index: int = 0,
    loaded_pipeline: Any = None,
) -> BuildResult:
    """Build (or resume) the dataset ``recipe`` describes into the folder ``out``.

    ``num_workers``/``worker_index`` split the shards statically between processes (e.g. one per
    node); processes sharing a folder on one machine also cooperate through shard locks.
    ``loaded_pipeline`` reuses an already loaded pipeline (tests, notebooks).
    """
    from synthgen.generate import ImageGenerator, load_pipeline

    if not 0 <= worker_index < num_workers:
        raise SynthgenError(f"--worker-index must be in [0, {num_workers}), got {worker_index}")
    started = time.perf_counter()
    build = plan_build(recipe, out, overwrite=overwrite)
    mine = [s for s in build.todo if s.index % num_workers == worker_index]
    writer = _writer(build)
    if not mine:
        _prepare_folder(build, writer)
        manifest = _finalize(build, writer, _model_info_from_markers(build, writer))
        return BuildResult(build.folder, recipe.count, 0, len(build.done), manifest is not None, 0,
                           time.perf_counter() - started, manifest)

    # Load the model before creating anything on disk: a bad model id leaves no folder behind.
    loaded = loaded_pipeline if loaded_pipeline is not None else load_pipeline(recipe.generator)
    generator = ImageGenerator(loaded, recipe.generator, recipe.output, recipe.seed)
    model_info = loaded.provenance()  # model, resolved revision, scheduler, device, dtype
    _prepare_folder(build, writer)

    written = skipped = retries = 0
    batch = recipe.generator.batch_size
    with _progress(progress, recipe.name, sum(len(s) for s in mine)) as advance:
        for spec in mine:
            with _claim(build.folder, spec) as claimed:
                if not claimed or writer.is_done(spec):  # another process has it, or just did it
                    skipped += 1
                    advance(len(spec))
                    continue
                shard_started = time.perf_counter()
                rows: list[ShardRow] = []
                for start in range(spec.start, spec.stop, batch):
                    records = [build.sampler[i] for i in range(start, min(start + batch, spec.stop))]
                    for record, image in zip(records, generator.generate(records)):
                        rows.append(
                            ShardRow(
                                index=record.index,
                                image=image.image,
                                prompt=record.prompt,
                                label=record.label,
                                group=record.group,
                                seed=image.seed,
                                retries=image.retries,
                                meta=record.meta,
                            )
                        )
                    advance(len(records))
                info = writer.write(
                    spec,
                    rows,
                    extra={
                        "seconds": round(time.perf_counter() - shard_started, 3),
                        "device": model_info["device"],
                        "host": platform.node(),
                    },
                )
                retries += info["retries"]
                written += 1
    manifest = _finalize(build, writer, model_info)
    return BuildResult(build.folder, recipe.count, written, skipped + len(build.done), manifest is not None,
                       retries, time.perf_counter() - started, manifest)


def _model_info_from_markers(build: BuildPlan, writer: ShardWriter) -> dict[str, Any]:
    existing = build.folder / MANIFEST
    if existing.is_file():
        with contextlib.suppress(Exception):
            return json.loads(existing.read_text()).get("model", {})
    return {"model": build.recipe.generator.model}


@contextlib.contextmanager
def _progress(enabled: bool, name: str, total: int):
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.2f} img/s" if speed else "-- img/s")

    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(name, total=total)
        yield lambda n: bar.advance(task, n)


# --------------------------------------------------------------------------------------------------
# reading back
# --------------------------------------------------------------------------------------------------
def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        plan_file = Path(folder) / STATE_DIR / PLAN_FILE
        if plan_file.is_file():
            return json.loads(plan_file.read_text())
        raise SynthgenError(f"{folder} is not a synthgen dataset folder (no {MANIFEST})")
    return json.loads(path.read_text())


def read_row(folder: str | Path, index: int, manifest: Optional[dict] = None) -> dict:
    """One row of a built dataset, by global index, straight from its shard."""
    import pyarrow.parquet as pq

    manifest = manifest or read_manifest(folder)
    plan = ShardPlan(manifest["plan"]["total"], manifest["plan"]["per_shard"], manifest["plan"]["split"])
    if not 0 <= index < plan.total:
        raise SynthgenError(f"index {index} out of range: the dataset has {plan.total} rows")
    spec = plan.shard(index // plan.per_shard)
    table = pq.read_table(Path(folder) / spec.filename)
    row = table.slice(index - spec.start, 1).to_pylist()[0]
    if row["index"] != index:
        raise SynthgenError(f"shard {spec.filename} is out of order at index {index}")
    return row


def regenerate_row(folder: str | Path, index: int, loaded_pipeline: Any = None):
    """Regenerate image ``index`` from its row's prompt and seed and the folder's recipe settings.

    Returns the PIL image at the stored size (before storage encoding, which for PNG is lossless).
    """
    from synthgen.generate import ImageGenerator, load_pipeline
    from synthgen.recipe import recipe_from_dict

    manifest = read_manifest(folder)
    recipe = recipe_from_dict(manifest["recipe"], source=f"{folder}/{MANIFEST}")
    row = read_row(folder, index, manifest)
    if row["settings_hash"] != recipe.settings_hash():
        raise SynthgenError(f"row {index} was made with other settings ({row['settings_hash']})")
    loaded = loaded_pipeline if loaded_pipeline is not None else load_pipeline(recipe.generator)
    generator = ImageGenerator(loaded, recipe.generator, recipe.output, recipe.seed)
    return generator.generate_one(row["prompt"], row["seed"])
