"""Planning and folder state: what a build decides before it writes, and the folder-wide files.

The plan is always the recipe's whole plan; ``limit`` builds a prefix of it (see ``plan.py``) that a
later build extends. A folder resumes across settings that do not change the dataset (batch size,
device, ... see ``Recipe.RUNTIME``) and refuses any other change, naming the key. The model's
resolved revision (a Hub commit or a content fingerprint) and dtype are part of the settings hash
the folder records (``.synthgen/plan.json``), so a model that changed between a crash and the
resume is refused instead of mixed in.

Folder-wide writes (plan, clean-up, manifest and card) happen under the folder lock on a local
folder; on an object store, where no lock exists, each of them is idempotent: the plan is written
when absent and read back, and every process that finds all shards marked writes the same manifest.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from synthgen.dataset.card import write_card
from synthgen.dataset.plan import ShardPlan, ShardSpec
from synthgen.dataset.schema import dataset_features
from synthgen.dataset.storage import FOLDER_LOCK, STATE_DIR, Store, disk_errors, open_store
from synthgen.dataset.writer import ShardWriter, retried_label_counts
from synthgen.errors import OutputFolderError, RecipeError, SynthgenError
from synthgen.prompts.base import PromptSampler
from synthgen.recipe import Recipe

MANIFEST = "synthgen_manifest.json"
PLAN_FILE = "plan.json"
PLAN_REL = f"{STATE_DIR}/{PLAN_FILE}"
CARD = "README.md"
# Files a build owns in its folder; --overwrite removes these and nothing else.
OWNED = ("data", STATE_DIR, CARD, MANIFEST)


@dataclass
class BuildPlan:
    recipe: Recipe
    store: Store
    sampler: PromptSampler
    plan: ShardPlan
    state: str  # "new", "resume" or "overwrite"
    limit: Optional[int] = None  # build only the first ``limit`` rows of the plan
    done: list[int] = field(default_factory=list)  # target shards already finished
    damaged: dict[str, str] = field(default_factory=dict)  # shard name -> why its file was not trusted
    stored: Optional[dict] = None  # the folder's plan.json (resume)
    overwrite: bool = False  # --overwrite: also start again when the same recipe's model settings changed

    @property
    def may_restart(self) -> bool:
        """``--overwrite`` on a folder of this recipe: the settings it records are the loaded model's,
        so only loading it tells whether the folder starts again (another model or precision)."""
        return self.overwrite and self.state == "resume"

    @property
    def folder(self) -> Path | str:
        """The folder as the user named it: a path, or a URL (without credentials)."""
        return self.store.local if self.store.local is not None else self.store.display

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

    def writer(self, settings_hash: str = "") -> ShardWriter:
        out = self.recipe.output
        return ShardWriter(
            self.store,
            dataset_features(self.sampler.class_names),
            settings_hash,
            image_format=out.image_format,
            jpeg_quality=out.jpeg_quality,
            stored=out,
        )


# --------------------------------------------------------------------------------------------------
# planning
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


def shown_keys(keys: list[str]) -> str:
    """The first five of ``keys`` and how many more, for a one-line message."""
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _check_writable_path(folder: Path) -> None:
    """Fail before any work when the folder cannot be created: a parent is a file."""
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = "output path" if parent == folder else f"{parent} (a parent of the output folder)"
                raise OutputFolderError(f"cannot use {folder} as the dataset folder: {what} is a file, not a folder")
            return


def _read_plan_file(store: Store) -> Optional[dict]:
    stored = store.read_json(PLAN_REL)
    return stored if isinstance(stored, dict) else None


def _inspect_folder(store: Store, recipe: Recipe, overwrite: bool) -> tuple[str, Optional[dict]]:
    """(state, stored plan): ``new``, ``resume`` (the same dataset) or ``overwrite``; refuses the rest."""
    from synthgen.recipe import recipe_from_dict

    if store.local is not None:
        _check_writable_path(store.local)
    names = store.names()
    if not names:
        return "new", None
    plan_exists = store.exists(PLAN_REL)
    if not plan_exists and names == [STATE_DIR]:
        # Another process sharing the folder is writing its plan this instant (or was killed
        # before it did): prepare_folder re-checks the plan under the folder lock.
        return "new", None
    if not plan_exists:
        raise OutputFolderError(
            f"output folder {store.display} is not empty and holds no synthgen build; choose an empty or new folder"
        )
    stored = _read_plan_file(store)
    problem = None
    old: dict = {}
    if stored is None:
        problem = f"its plan file {PLAN_REL} is unreadable"
    else:
        try:
            old = recipe_from_dict(stored.get("recipe") or {}, source="plan").content()
        except RecipeError:
            problem = f"its plan file {PLAN_REL} holds no valid recipe (edited, or another synthgen version)"
    if problem is None:
        new = recipe.content()
        if old == new and stored.get("plan") == ShardPlan(recipe.count, recipe.output.images_per_shard, recipe.output.split).to_dict():
            return "resume", stored
        keys = changed_keys(old, new)
        problem = (f"differs in: {shown_keys(keys)}" if keys else
                   f"its plan file {PLAN_REL} was edited (its shard plan does not match its recipe)")
    if overwrite:
        return "overwrite", stored
    name = (stored or {}).get("recipe", {}).get("name", "?") if isinstance((stored or {}).get("recipe"), dict) else "?"
    raise OutputFolderError(
        f"output folder {store.display} holds recipe '{name}' with other settings ({problem}); "
        "use --overwrite to replace it or --out to choose another folder"
    )


def plan_build(
    recipe: Recipe,
    out: str | Path | Store,
    overwrite: bool = False,
    limit: Optional[int] = None,
    *,
    storage_options: Optional[dict[str, Any]] = None,
    verify: Optional[Callable[[ShardSpec], bool]] = None,
    scan: bool = True,
) -> BuildPlan:
    """Everything a build decides before it writes anything: raises on any bad input.

    ``out`` is a folder path or an fsspec URL (``storage_options`` open it). On a resume it checks
    the finished shards: those ``verify`` selects (default: all) fully, file against marker (size,
    sha256, rows, indices), the others cheaply (marker and size; another process checks them
    fully). A shard that fails is listed in ``damaged`` and rebuilt. ``scan=False`` skips this
    (a process that is handed its shards one by one checks each when it claims it).
    """
    from synthgen.prompts import build_sampler

    if limit is not None and limit <= 0:
        raise RecipeError(f"--limit must be positive, got {limit}")
    store = out if isinstance(out, Store) else open_store(out, storage_options)
    sampler = build_sampler(recipe)
    if len(sampler) != recipe.count:
        raise SynthgenError(f"prompt sampler gives {len(sampler)} prompts for count {recipe.count}")
    plan = ShardPlan(recipe.count, recipe.output.images_per_shard, recipe.output.split)
    with disk_errors(store.display):
        state, stored = _inspect_folder(store, recipe, overwrite)
    build = BuildPlan(recipe, store, sampler, plan, state, limit=limit, stored=stored, overwrite=overwrite)
    if state == "resume":
        writer = build.writer()
        stray = writer.unplanned_files(plan.shards())
        if stray:
            more = f" and {len(stray) - 1} more" if len(stray) > 1 else ""
            raise OutputFolderError(
                f"{stray[0].rsplit('/', 1)[-1]}{more} in {store.display}/data {'are' if more else 'is'} not "
                f"{'shards' if more else 'a shard'} of this build's plan ({plan.num_shards} shards; data/ holds shards "
                f"only, and a stray parquet file would load as extra rows): remove {'them' if more else 'it'}, or use --overwrite"
            )
        if limit is not None:
            with disk_errors(store.display):
                build.limit = _limit_keeping_made_rows(build, writer, limit)
        if scan:
            with disk_errors(store.display):
                _scan_finished(build, writer, verify)
    return build


def _limit_keeping_made_rows(build: BuildPlan, writer: ShardWriter, limit: int) -> Optional[int]:
    """``limit``, raised to the last row the folder's shards already hold: a ``--limit`` build never
    writes a manifest that leaves made shards out (they would load as rows the card does not list)."""
    names = writer.marker_names()
    marked = [s for s in build.plan.shards() if f"{s.name}.json" in names]
    if not marked:
        return limit
    last = marked[-1]
    made = (writer.read_marker(last) or {}).get("stop", last.stop)
    if made <= limit:
        return limit
    return None if made >= build.plan.total else made


def _scan_finished(build: BuildPlan, writer: ShardWriter, verify: Optional[Callable[[ShardSpec], bool]]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    names = writer.marker_names()
    listed = [s for s in build.targets if f"{s.name}.json" in names]
    full = [s for s in listed if verify is None or verify(s)]
    cheap = [s for s in listed if not (verify is None or verify(s))]
    # Full checks read every byte (sha256): several shards at once, for object stores' latency.
    with ThreadPoolExecutor(max(1, min(8, len(full)))) as pool:
        checked = list(pool.map(writer.finished, full))
    for spec, marker in zip(full, checked):
        if marker is not None:
            build.done.append(spec.index)
        elif (why := writer.problem(spec)) is not None:
            build.damaged[spec.name] = why
    marked = writer.marked_many(cheap) if cheap else {}
    for spec in cheap:
        if spec.index in marked:
            build.done.append(spec.index)
        elif writer.covers(writer.read_marker(spec), spec):
            build.damaged[spec.name] = "file missing or not the size its marker says"
    build.done.sort()


# --------------------------------------------------------------------------------------------------
# the folder before shards are made
# --------------------------------------------------------------------------------------------------
def _plan_payload(build: BuildPlan, settings: dict[str, Any], settings_hash: str) -> dict[str, Any]:
    return {
        "recipe": build.recipe.resolved(),
        "recipe_hash": build.recipe.recipe_hash(),
        "plan": build.plan.to_dict(),
        "settings": settings,
        "settings_hash": settings_hash,
    }


def reset_folder(build: BuildPlan, writer: ShardWriter) -> None:
    """Before shards are made (no model needed): replace another recipe's build (``--overwrite``)
    and remove temp files dead processes left. Safe to run in every process: the overwrite is
    re-checked against the folder as it is now, so a process never removes what another just planned."""
    store = build.store
    with store.folder_lock():
        # the folder as it is now: another process may have planned it since we looked
        state, _ = _inspect_folder(store, build.recipe, overwrite=build.state == "overwrite")
        if state == "overwrite":
            _remove_owned(store)
        _remove_stray_files(build, writer)


def _remove_owned(store: Store) -> None:
    for name in OWNED:
        if name == STATE_DIR and store.local is not None:
            state = store.local / STATE_DIR
            for child in state.iterdir() if state.is_dir() else []:
                if child.name != FOLDER_LOCK:  # see LocalStore.folder_lock
                    store.remove_tree(f"{STATE_DIR}/{child.name}")
        else:
            store.remove_tree(name)


def record_settings(build: BuildPlan, writer: ShardWriter, model: Optional[dict[str, Any]]) -> None:
    """Write the plan with the generation settings (``model``: the loaded pipeline's provenance,
    whose resolved revision and dtype are in the settings hash), or check the folder's plan: a
    resume with a model whose files changed, or another precision, is refused here. Then drop a
    manifest and card that would describe fewer rows than the folder is about to hold."""
    store = build.store
    settings = build.recipe.generation_settings(model) if model is not None else None
    settings_hash = writer.settings_hash
    with store.folder_lock():
        stored = _read_plan_file(store)
        if stored is not None:
            # a process sharing the folder wrote its plan after we looked: it must be ours
            _inspect_folder(store, build.recipe, overwrite=False)
            if build.overwrite and settings is not None and stored.get("settings_hash") != settings_hash:
                _remove_owned(store)  # the same recipe with another model or precision: start again
                stored = None
        if stored is None:
            store.write_text(PLAN_REL, json.dumps(_plan_payload(build, settings or {}, settings_hash), indent=1))
            if store.local is None:
                stored = _read_plan_file(store)  # no lock here: whoever wrote last is the plan
                _inspect_folder(store, build.recipe, overwrite=False)
        _forget_finished_if_restarted(build, stored)
        if stored is not None and settings is not None and stored.get("settings_hash") != settings_hash:
            keys = changed_keys(stored.get("settings") or {}, settings)
            detail = "; ".join(f"{k}: {_flatten(stored.get('settings') or {}).get(k)!r} -> {_flatten(settings).get(k)!r}"
                               for k in keys[:3]) or "settings hash differs"
            raise OutputFolderError(
                f"output folder {store.display} was started with other generation settings ({detail}); its images "
                "would mix two models or precisions. Restore them (e.g. pin generator.revision / "
                "generator.dtype), or use --overwrite to start again, or --out for another folder"
            )
        for name in (MANIFEST, CARD):
            store.remove(name)


def _forget_finished_if_restarted(build: BuildPlan, stored: Optional[dict]) -> None:
    if (build.stored or {}).get("settings_hash") != (stored or {}).get("settings_hash"):
        build.done.clear()  # started again since this process scanned it: its finished shards are gone
        build.damaged.clear()


def forget_finished_if_restarted(build: BuildPlan) -> None:
    """For a process that plans but loads no model (the Ray driver): after a worker recorded the
    settings, forget the shards it found finished if that started the folder again."""
    with disk_errors(build.store.display):
        _forget_finished_if_restarted(build, _read_plan_file(build.store))


def prepare_folder(build: BuildPlan, writer: ShardWriter, model: Optional[dict[str, Any]] = None) -> None:
    """:func:`reset_folder` then :func:`record_settings`: what a process does before its first shard."""
    reset_folder(build, writer)
    record_settings(build, writer, model)


def _remove_stray_files(build: BuildPlan, writer: ShardWriter) -> None:
    # Called under the folder lock, so the folder's own state files are nobody's work in progress.
    # A shard's temp files may belong to a live process on this folder: touch them only while
    # holding that shard's claim, which a dead process no longer holds.
    specs = {spec.name: spec for spec in build.plan.shards()}
    for shard, paths in build.store.temp_files().items():
        spec = specs.get(shard) if shard is not None else None  # None: state files, unplanned names
        with build.store.claim(spec.name) if spec is not None else contextlib.nullcontext(True) as free:
            if free:
                for rel in paths:
                    build.store.remove(rel)


def remove_shard_temp_files(build: BuildPlan, spec: ShardSpec) -> None:
    """Temp files of ``spec`` a dead writer left; call it while holding the shard's claim."""
    for rel in build.store.temp_files().get(spec.name, []):
        build.store.remove(rel)


# --------------------------------------------------------------------------------------------------
# manifest and card: written once, by whoever finds every target shard marked
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
    manifest = build.store.read_json(MANIFEST)
    if not isinstance(manifest, dict):
        return None
    key = [(m.get("file"), m.get("sha256")) for m in markers]
    listed = [(m.get("file"), m.get("sha256")) for m in manifest.get("shards", [])]
    current = listed == key and manifest.get("recipe_hash") == build.recipe.recipe_hash()
    return manifest if current and build.store.exists(CARD) else None


def target_markers(build: BuildPlan, writer: ShardWriter) -> Optional[list[dict]]:
    """Every target shard's marker when all are marked (cheap check: one listing of the markers,
    then, once they are all there, one of ``data/`` and the markers read together), else None."""
    names = writer.marker_names()
    if any(f"{spec.name}.json" not in names for spec in build.targets):
        return None
    marked = writer.marked_many(build.targets)
    if len(marked) != len(build.targets):
        return None
    return [marked[spec.index] for spec in build.targets]


def finalize(build: BuildPlan, writer: ShardWriter) -> Optional[dict]:
    """Write manifest and card once every target shard is done; None while some are not."""
    markers = target_markers(build, writer)
    if markers is None:
        return None
    current = _manifest_is_current(build, markers)
    if current is not None:
        return current  # nothing to write: a finished build on read-only storage is a no-op
    with build.store.folder_lock():
        if build.store.local is not None:  # under the lock: another process may have just written it
            markers = target_markers(build, writer)
            if markers is None:
                return None
        _remove_stray_files(build, writer)  # e.g. the temp manifest of a run killed while writing it
        for lease in build.store.listing(f"{STATE_DIR}/leases"):  # leases of processes killed after marking
            build.store.remove(f"{STATE_DIR}/leases/{lease}")
        return _write_manifest(build, writer, markers)


def _retried_by_label(build: BuildPlan, markers: list[dict]) -> dict[str, Any]:
    """Regenerated images per label id (labelled datasets), and those that markers of an older
    synthgen do not break down by label (only when there are any)."""
    if build.sampler.class_names is None:
        return {}
    counts, unknown = retried_label_counts(markers)
    return {"retried_label_counts": counts, **({"retried_images_unattributed": unknown} if unknown else {})}


def _write_manifest(build: BuildPlan, writer: ShardWriter, markers: list[dict]) -> dict:
    hashes = sorted({m.get("settings_hash", "") for m in markers})
    if len(hashes) != 1:
        raise OutputFolderError(
            f"shards of {build.store.display} were made with different generation settings ({', '.join(hashes)}); "
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
        **_retried_by_label(build, markers),
        "model": model,
        "versions": model.get("versions") or {},
        "shards": markers,
    }
    store = build.store
    store.write_text(MANIFEST, json.dumps(manifest, indent=1))
    write_card(store, manifest, writer.features)  # per-class counts from the markers: no shard is read
    return manifest
