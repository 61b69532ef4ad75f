"""``build_dataset``: recipe -> prompt sampler -> shard plan -> generator -> shard writer -> folder.

Resumable and safe to run in several processes at once on one folder: each shard is claimed with
an advisory file lock (released by the OS if the process dies, even on ``kill -9``), finished shards
carry a completion marker and are skipped once their file checks out against it, and whichever
process finishes the last shard writes the manifest and the dataset card.

The plan is always the recipe's whole plan; ``limit`` builds a prefix of it (see ``plan.py``) that a
later build extends. A folder resumes across settings that do not change the dataset (batch size,
device, ... see ``Recipe.RUNTIME``) and refuses any other change, naming the key. The model's
resolved revision (a Hub commit or a content fingerprint) and dtype are part of the settings hash
the folder records, so a model that changed between a crash and the resume is refused instead of
mixed in.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from synthgen.dataset.card import write_card
from synthgen.dataset.plan import ShardPlan, ShardSpec
from synthgen.dataset.schema import dataset_features
from synthgen.dataset.writer import STATE_DIR, ShardRow, ShardWriter, atomic_write_text
from synthgen.errors import OutputFolderError, RecipeError, SynthgenError
from synthgen.prompts.base import PromptSampler
from synthgen.recipe import Recipe

MANIFEST = "synthgen_manifest.json"
PLAN_FILE = "plan.json"
FOLDER_LOCK = "folder.lock"
# Files a build owns in its folder; --overwrite removes these and nothing else.
OWNED = ("data", STATE_DIR, "README.md", MANIFEST)


@dataclass
class BuildPlan:
    recipe: Recipe
    folder: Path
    sampler: PromptSampler
    plan: ShardPlan
    state: str  # "new", "resume" or "overwrite"
    limit: Optional[int] = None  # build only the first ``limit`` rows of the plan
    done: list[int] = field(default_factory=list)  # target shards already finished
    damaged: dict[str, str] = field(default_factory=dict)  # shard name -> why its file was not trusted
    stored: Optional[dict] = None  # the folder's plan.json (resume)

    @property
    def targets(self) -> list[ShardSpec]:
        """The shards this build makes: the whole plan, or the prefix ``limit`` asks for."""
        return self.plan.prefix(self.limit)

    @property
    def todo(self) -> list[ShardSpec]:
        done = set(self.done)
        return [s for s in self.targets if s.index not in done]

    @property
    def target_rows(self) -> int:
        return self.targets[-1].stop


@dataclass
class BuildResult:
    folder: Path
    rows_planned: int  # the recipe's rows
    rows_target: int  # the rows this build was asked for (rows_planned, or the --limit prefix)
    shards_written: int
    shards_skipped: int
    complete: bool  # every target shard is finished (the manifest describes them)
    retries: int
    seconds: float
    manifest: Optional[dict] = None
    left: list[str] = field(default_factory=list)  # target shards still to build (other workers')
    rebuilt: dict[str, str] = field(default_factory=dict)  # shards whose file failed its check

    @property
    def dataset_complete(self) -> bool:
        return self.complete and self.rows_target == self.rows_planned


# --------------------------------------------------------------------------------------------------
# disk errors
# --------------------------------------------------------------------------------------------------
def disk_error_message(exc: OSError, folder: Optional[Path] = None) -> str:
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
def disk_errors(folder: Optional[Path] = None) -> Iterator[None]:
    """Turn ``OSError`` (read-only folder, disk full, a file where a folder should be) into one
    line; ``folder`` names the place when the error itself does not (pyarrow's do not)."""
    try:
        yield
    except OSError as exc:
        raise OutputFolderError(disk_error_message(exc, folder)) from None


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
    """Dotted keys whose values differ (``2`` and ``2.0`` differ: the stored data says which)."""
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, KeyError) != b.get(k, KeyError) or type(a.get(k)) is not type(b.get(k)))


def _shown(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _check_writable_path(folder: Path) -> None:
    """Fail before any work when the folder cannot be created: a parent is a file."""
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = "output path" if parent == folder else f"{parent} (a parent of the output folder)"
                raise OutputFolderError(f"cannot use {folder} as the dataset folder: {what} is a file, not a folder")
            return


def _read_plan_file(folder: Path) -> Optional[dict]:
    try:
        stored = json.loads((folder / STATE_DIR / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) else None


def _inspect_folder(folder: Path, recipe: Recipe, overwrite: bool) -> tuple[str, Optional[dict]]:
    """(state, stored plan): ``new``, ``resume`` (the same dataset) or ``overwrite``; refuses the rest."""
    from synthgen.recipe import recipe_from_dict

    _check_writable_path(folder)
    if not folder.exists() or not any(folder.iterdir()):
        return "new", None
    plan_file = folder / STATE_DIR / PLAN_FILE
    if not plan_file.exists() and [p.name for p in folder.iterdir()] == [STATE_DIR]:
        # Another process sharing the folder is writing its plan this instant (or was killed
        # before it did): _prepare_folder re-checks the plan under the folder lock.
        return "new", None
    if not plan_file.is_file():
        raise OutputFolderError(
            f"output folder {folder} is not empty and holds no synthgen build; choose an empty or new folder"
        )
    stored = _read_plan_file(folder)
    problem = None
    old: dict = {}
    if stored is None:
        problem = f"its plan file {STATE_DIR}/{PLAN_FILE} is unreadable"
    else:
        try:
            old = recipe_from_dict(stored.get("recipe") or {}, source="plan").content()
        except RecipeError:
            problem = f"its plan file {STATE_DIR}/{PLAN_FILE} holds no valid recipe (edited, or another synthgen version)"
    if problem is None:
        new = recipe.content()
        if old == new and stored.get("plan") == ShardPlan(recipe.count, recipe.output.images_per_shard, recipe.output.split).to_dict():
            return "resume", stored
        keys = changed_keys(old, new)
        problem = (f"differs in: {_shown(keys)}" if keys else
                   f"its plan file {STATE_DIR}/{PLAN_FILE} was edited (its shard plan does not match its recipe)")
    if overwrite:
        return "overwrite", stored
    name = (stored or {}).get("recipe", {}).get("name", "?") if isinstance((stored or {}).get("recipe"), dict) else "?"
    raise OutputFolderError(
        f"output folder {folder} holds recipe '{name}' with other settings ({problem}); "
        "use --overwrite to replace it or --out to choose another folder"
    )


def plan_build(recipe: Recipe, out: str | Path, overwrite: bool = False, limit: Optional[int] = None) -> BuildPlan:
    """Everything a build decides before it writes anything: raises on any bad input.

    On a resume it checks every finished shard's file against its marker (size, sha256, rows,
    indices); a shard that fails is listed in ``damaged`` and rebuilt.
    """
    from synthgen.prompts import build_sampler

    if limit is not None and limit <= 0:
        raise RecipeError(f"--limit must be positive, got {limit}")
    folder = Path(out)
    sampler = build_sampler(recipe)
    if len(sampler) != recipe.count:
        raise SynthgenError(f"prompt sampler gives {len(sampler)} prompts for count {recipe.count}")
    plan = ShardPlan(recipe.count, recipe.output.images_per_shard, recipe.output.split)
    state, stored = _inspect_folder(folder, recipe, overwrite)
    build = BuildPlan(recipe, folder, sampler, plan, state, limit=limit, stored=stored)
    if state == "resume":
        writer = _writer(build)
        stray = writer.unplanned_files(plan.shards())
        if stray:
            more = f" and {len(stray) - 1} more" if len(stray) > 1 else ""
            raise OutputFolderError(
                f"{stray[0]}{more} in {folder}/data is not a shard of this build's plan "
                f"({plan.num_shards} shards; a stray file would load as extra rows): remove it, or use --overwrite"
            )
        with disk_errors(folder):
            for spec in build.targets:
                if writer.is_done(spec):
                    build.done.append(spec.index)
                elif (why := writer.problem(spec)) is not None:
                    build.damaged[spec.name] = why
    return build


def _writer(build: BuildPlan, settings_hash: str = "") -> ShardWriter:
    out = build.recipe.output
    return ShardWriter(
        build.folder,
        dataset_features(build.sampler.class_names),
        settings_hash,
        image_format=out.image_format,
        jpeg_quality=out.jpeg_quality,
    )


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


def _plan_payload(build: BuildPlan, settings: dict[str, Any], settings_hash: str) -> dict[str, Any]:
    return {
        "recipe": build.recipe.resolved(),
        "recipe_hash": build.recipe.recipe_hash(),
        "plan": build.plan.to_dict(),
        "settings": settings,
        "settings_hash": settings_hash,
    }


def _prepare_folder(build: BuildPlan, writer: ShardWriter, model: Optional[dict[str, Any]] = None) -> None:
    """Overwrite if asked, write (or check) the plan, drop a stale manifest, remove dead temp files.

    ``model`` is the loaded pipeline's provenance: the folder's settings hash includes its resolved
    revision, so a resume with a model whose files changed is refused here.
    """
    folder = build.folder
    settings = build.recipe.generation_settings(model) if model is not None else None
    settings_hash = writer.settings_hash
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
        stored = _read_plan_file(folder) if plan_file.exists() else None
        if stored is None or build.state == "overwrite":
            atomic_write_text(plan_file, json.dumps(_plan_payload(build, settings or {}, settings_hash), indent=1))
        elif settings is not None and stored.get("settings_hash") != settings_hash:
            keys = changed_keys(stored.get("settings") or {}, settings)
            detail = "; ".join(f"{k}: {_flatten(stored.get('settings') or {}).get(k)!r} -> {_flatten(settings).get(k)!r}"
                               for k in keys[:3]) or "settings hash differs"
            raise OutputFolderError(
                f"output folder {folder} was started with other generation settings ({detail}); its images "
                "would mix two models or precisions. Restore them (e.g. pin generator.revision / "
                "generator.dtype), or use --overwrite to start again, or --out for another folder"
            )
        # The folder is about to gain shards: a manifest and card from an earlier (partial) build
        # would describe fewer rows than it holds. The last shard's writer writes fresh ones.
        for name in (MANIFEST, "README.md"):
            (folder / name).unlink(missing_ok=True)
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
def _claim(folder: Path, spec: ShardSpec, wait: bool = False) -> Iterator[bool]:
    """An exclusive advisory lock on one shard; the OS drops it if we die. Without ``wait`` it
    yields False at once when another process holds it; with ``wait`` it blocks until it is free."""
    locks = folder / STATE_DIR / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{spec.name}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------------
def _model_record(build: BuildPlan, markers: list[dict]) -> dict[str, Any]:
    """The model provenance every shard's marker carries, with the devices of all shards."""
    records = [m["model"] for m in markers if isinstance(m.get("model"), dict)]
    if not records:  # markers of an older synthgen: only the recipe is known
        return {"model": build.recipe.generator.model}
    model = dict(records[0])
    devices = sorted({r.get("device") for r in records if r.get("device")})
    model["device"] = ", ".join(devices) if devices else model.get("device")
    return model


def _manifest_is_current(build: BuildPlan, markers: list[dict]) -> Optional[dict]:
    """The folder's manifest when it already lists exactly these shards (nothing to write)."""
    try:
        manifest = json.loads((build.folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    key = [(m.get("file"), m.get("sha256")) for m in markers]
    listed = [(m.get("file"), m.get("sha256")) for m in manifest.get("shards", [])]
    current = listed == key and manifest.get("recipe_hash") == build.recipe.recipe_hash()
    return manifest if current and (build.folder / "README.md").is_file() else None


def _finalize(build: BuildPlan, writer: ShardWriter) -> Optional[dict]:
    """Write manifest and card once every target shard is done; None while some are not."""
    markers = _target_markers(build, writer)
    if markers is None:
        return None
    current = _manifest_is_current(build, markers)
    if current is not None:
        return current  # nothing to write: a finished build on read-only storage is a no-op
    with _folder_lock(build.folder):
        markers = _target_markers(build, writer)
        if markers is None:
            return None
        _remove_stray_files(build, writer)  # e.g. the temp manifest of a run killed while writing it
        return _write_manifest(build, writer, markers)


def _target_markers(build: BuildPlan, writer: ShardWriter) -> Optional[list[dict]]:
    markers = []
    for spec in build.targets:
        marker = writer.finished(spec)
        if marker is None:
            return None
        markers.append(marker)
    return markers


def _write_manifest(build: BuildPlan, writer: ShardWriter, markers: list[dict]) -> dict:
    hashes = sorted({m.get("settings_hash", "") for m in markers})
    if len(hashes) != 1:
        raise OutputFolderError(
            f"shards of {build.folder} were made with different generation settings ({', '.join(hashes)}); "
            "rebuild it with --overwrite"
        )
    model = _model_record(build, markers)
    rows = sum(m["rows"] for m in markers)
    recipe = build.recipe
    manifest = {
        "synthgen_manifest": 2,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe.resolved(),
        "recipe_hash": recipe.recipe_hash(),
        "settings_hash": hashes[0],
        "generation_settings": recipe.generation_settings(model if "model_revision" in model else None),
        "plan": build.plan.to_dict(),
        "complete": rows == build.plan.total,  # False for a --limit prefix
        "class_names": list(build.sampler.class_names) if build.sampler.class_names is not None else None,
        "rows": rows,
        "bytes": sum(m["bytes"] for m in markers),
        "retries": sum(m.get("retries", 0) for m in markers),
        "retried_images": sum(m.get("retried_images", 0) for m in markers),
        "model": model,
        "versions": model.get("versions") or {},
        "shards": markers,
    }
    atomic_write_text(build.folder / MANIFEST, json.dumps(manifest, indent=1))
    write_card(build.folder, manifest, writer.features)
    return manifest


# --------------------------------------------------------------------------------------------------
# one shard: the unit of work
# --------------------------------------------------------------------------------------------------
def make_shard(
    spec: ShardSpec,
    *,
    sampler: PromptSampler,
    generator: Any,
    writer: ShardWriter,
    model: dict[str, Any],
    advance: Callable[[int], None] = lambda n: None,
) -> dict[str, Any]:
    """Generate and write shard ``spec`` completely; returns its marker. Safe to run twice: the same
    spec gives the same file. Rows an earlier ``--limit`` build made for it are kept as they are."""
    started = time.perf_counter()
    kept = writer.kept_rows(spec)
    first = spec.start + (kept.num_rows if kept is not None else 0)
    batch = generator.cfg.batch_size
    rows: list[ShardRow] = []
    for start in range(first, spec.stop, batch):
        records = [sampler[i] for i in range(start, min(start + batch, spec.stop))]
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
    extra = {"seconds": round(time.perf_counter() - started, 3), "model": model}
    return writer.write(spec, rows, extra=extra, kept=kept)


def _rows_to_make(spec: ShardSpec, writer: ShardWriter) -> int:
    kept = writer.read_marker(spec)
    if kept and kept.get("start") == spec.start and spec.start < kept.get("stop", -1) < spec.stop:
        return spec.stop - kept["stop"]
    return len(spec)


# --------------------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------------------
def build_dataset(
    recipe: Recipe,
    out: str | Path,
    *,
    limit: Optional[int] = None,
    overwrite: bool = False,
    progress: bool = True,
    num_workers: int = 1,
    worker_index: int = 0,
    loaded_pipeline: Any = None,
) -> BuildResult:
    """Build (or resume, or extend) the dataset ``recipe`` describes into the folder ``out``.

    ``limit`` builds only the plan's first ``limit`` rows; a later call without it completes the
    plan, keeping those rows byte for byte. ``num_workers``/``worker_index`` split the shards
    statically between processes (e.g. one per node): a worker whose share is done while other
    shares are not returns ``complete=False`` with the shards ``left``. Processes sharing a folder
    on one machine also cooperate through shard locks: a shard another process holds is waited for,
    and taken over if that process dies. ``loaded_pipeline`` reuses a loaded pipeline (tests, notebooks).
    """
    from synthgen.generate import ImageGenerator, load_pipeline

    if not 0 <= worker_index < num_workers:
        raise SynthgenError(f"--worker-index must be in [0, {num_workers}), got {worker_index}")
    started = time.perf_counter()
    build = plan_build(recipe, out, overwrite=overwrite, limit=limit)
    writer = _writer(build)

    def result(written: int, skipped: int, retries: int, manifest: Optional[dict]) -> BuildResult:
        left = [s.name for s in build.targets if not writer.is_done(s)] if manifest is None else []
        return BuildResult(build.folder, recipe.count, build.target_rows, written, skipped, manifest is not None,
                           retries, time.perf_counter() - started, manifest, left, dict(build.damaged))

    mine = [s for s in build.todo if s.index % num_workers == worker_index]
    if not mine:  # nothing for this process: finish the manifest if the others are done
        with disk_errors(build.folder):
            return result(0, len(build.done), 0, _finalize(build, writer))
    _check_can_write(build.folder)

    # Load the model before creating anything on disk: a bad model id leaves no folder behind.
    loaded = loaded_pipeline if loaded_pipeline is not None else load_pipeline(recipe.generator)
    model = loaded.provenance()  # model, resolved revision, scheduler, device, dtype, versions
    writer.settings_hash = recipe.settings_hash(model)
    generator = ImageGenerator(loaded, recipe.generator, recipe.output, recipe.seed)

    written = skipped = retries = 0
    with disk_errors(build.folder):
        _prepare_folder(build, writer, model)
        to_make = {spec.index: _rows_to_make(spec, writer) for spec in mine}
        with _progress(progress, recipe.name, sum(to_make.values())) as bar:

            def attempt(spec: ShardSpec, wait: bool) -> bool:
                """Make ``spec`` unless another process holds it (False) or has made it."""
                nonlocal written, skipped, retries
                with _claim(build.folder, spec, wait=wait) as claimed:
                    if not claimed:
                        return False
                    if writer.is_done(spec):
                        skipped += 1
                        bar.skip(to_make[spec.index])
                        return True
                    info = make_shard(spec, sampler=build.sampler, generator=generator, writer=writer,
                                      model=model, advance=bar.advance)
                    retries += info["retries"]
                    written += 1
                    return True

            busy = [spec for spec in mine if not attempt(spec, wait=False)]
            for spec in busy:  # held by another process: wait for it, and take over if it died
                attempt(spec, wait=True)
        manifest = _finalize(build, writer)
    return result(written, skipped + len(build.done), retries, manifest)


def _check_can_write(folder: Path) -> None:
    """A read-only destination fails at once, before the model loads (not after minutes)."""
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputFolderError(
            f"cannot write {folder}: {existing} is read-only (choose another folder with --out)"
        )


class _Bar:
    def __init__(self, advance: Callable[[int], None], skip: Callable[[int], None]) -> None:
        self.advance, self.skip = advance, skip


@contextlib.contextmanager
def _progress(enabled: bool, name: str, total: int) -> Iterator[_Bar]:
    """A progress bar over the images this process generates; shards another process made are
    taken off its total, so the rate counts generated images only."""
    if not enabled:
        yield _Bar(lambda n: None, lambda n: None)
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
    from rich.console import Console
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            if not speed and task.completed and task.elapsed:
                speed = task.completed / task.elapsed  # too few updates for rich's moving average
            return Text(f"{speed:.2f} img/s" if speed else "")

    class EtaColumn(TimeRemainingColumn):
        max_refresh = None  # rich caches this column for 0.5 s, which would keep a stale "ETA" at the end

        def render(self, task) -> Text:
            return Text("") if task.finished else Text("ETA ") + super().render(task)

    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        EtaColumn(),
    ]
    with Progress(*columns, transient=False, console=Console(stderr=True)) as bar:
        task = bar.add_task(name, total=total)

        def skip(n: int) -> None:
            bar.update(task, total=max(0, bar.tasks[0].total - n))

        yield _Bar(lambda n: bar.advance(task, n), skip)


# --------------------------------------------------------------------------------------------------
# reading back
# --------------------------------------------------------------------------------------------------
def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        plan_file = Path(folder) / STATE_DIR / PLAN_FILE
        if plan_file.is_file():
            raise SynthgenError(
                f"{folder} is an unfinished build (no {MANIFEST} yet): run the same build command to finish it"
            )
        raise SynthgenError(f"{folder} is not a synthgen dataset folder (no {MANIFEST})")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SynthgenError(f"{path} is unreadable ({exc}); run the same build command to rewrite it") from None


def _manifest_shard(folder: Path, manifest: dict, index: int) -> tuple[ShardSpec, dict]:
    plan = ShardPlan(manifest["plan"]["total"], manifest["plan"]["per_shard"], manifest["plan"]["split"])
    if not 0 <= index < manifest.get("rows", plan.total):
        raise SynthgenError(f"index {index} out of range: the dataset has {manifest.get('rows', plan.total)} rows")
    spec = plan.shard(index // plan.per_shard)
    marker = next((m for m in manifest.get("shards", []) if m.get("file") == spec.filename), None)
    if marker is None:
        raise SynthgenError(f"{folder}/{MANIFEST} does not list shard {spec.filename}")
    return spec, marker


def read_row(folder: str | Path, index: int, manifest: Optional[dict] = None) -> dict:
    """One row of a built dataset, by global index, straight from its shard (checked first)."""
    import pyarrow.parquet as pq

    from synthgen.dataset.writer import check_shard_file

    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    spec, marker = _manifest_shard(folder, manifest, index)
    problem = check_shard_file(folder / spec.filename, marker)
    if problem is not None:
        raise SynthgenError(
            f"shard {spec.filename} is damaged ({problem}); run `synthgen build` on the folder's recipe to rebuild it"
        )
    table = pq.read_table(folder / spec.filename)
    row = table.slice(index - spec.start, 1).to_pylist()[0]
    if row["index"] != index:
        raise SynthgenError(f"shard {spec.filename} is out of order at index {index}")
    return row


def regenerate_row(folder: str | Path, index: int, loaded_pipeline: Any = None, row: Optional[dict] = None):
    """Regenerate image ``index`` from its row's prompt and seed and the folder's recipe settings.

    Returns the PIL image at the stored size (before storage encoding, which for PNG is lossless).
    Refuses when the model (its resolved revision) or dtype differ from the ones the row was made with.
    """
    from synthgen.generate import ImageGenerator, load_pipeline
    from synthgen.recipe import recipe_from_dict

    manifest = read_manifest(folder)
    recipe = recipe_from_dict(manifest["recipe"], source=f"{folder}/{MANIFEST}")
    row = row or read_row(folder, index, manifest)
    if row["settings_hash"] != manifest["settings_hash"]:
        raise SynthgenError(f"row {index} was made with other settings ({row['settings_hash']}) than the manifest's")
    loaded = loaded_pipeline if loaded_pipeline is not None else load_pipeline(recipe.generator)
    now = recipe.settings_hash(loaded.provenance())
    if now != row["settings_hash"]:
        stored = manifest.get("model", {})
        raise SynthgenError(
            f"the model now loads as {loaded.model_revision} ({str(loaded.dtype).replace('torch.', '')}); row {index} "
            f"was made with {stored.get('model_revision')} ({stored.get('dtype')}): its pixels cannot be reproduced"
        )
    generator = ImageGenerator(loaded, recipe.generator, recipe.output, recipe.seed)
    return generator.regenerate_row(row)
