"""Reading a built dataset folder back (a local path or any fsspec URL, through its :class:`Store`):
its manifest, one row, one row regenerated from its fields."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from synthgen.dataset.folder import MANIFEST, PLAN_FILE
from synthgen.dataset.plan import ShardPlan, ShardSpec
from synthgen.dataset.storage import STATE_DIR, Store, open_store
from synthgen.errors import SynthgenError


def unfinished_build_error(display: str) -> SynthgenError:
    return SynthgenError(f"{display} is an unfinished build (no {MANIFEST} yet): run the same build command to finish it")


def refuse_unfinished(folder: str | Path | Store, storage_options: Optional[dict[str, Any]] = None) -> None:
    """Raise when ``folder`` is a build that has started (its plan is written) but not finished (no
    manifest): its finished shards are a part of the dataset, which nothing should read as the whole."""
    store = open_store(folder, storage_options, reading=True)
    if not store.exists(MANIFEST) and store.exists(f"{STATE_DIR}/{PLAN_FILE}"):
        raise unfinished_build_error(store.display)


def read_manifest(folder: str | Path | Store, storage_options: Optional[dict[str, Any]] = None) -> dict:
    """The manifest of the built folder ``folder`` (a path, an fsspec URL or a store)."""
    store = open_store(folder, storage_options, reading=True)
    if store.local is not None and Path(store.local).is_file():
        raise SynthgenError(f"{store.display} is a file, not a synthgen dataset folder")
    try:
        text = store.read_text(MANIFEST)
    except FileNotFoundError:
        if store.exists(f"{STATE_DIR}/{PLAN_FILE}"):
            raise unfinished_build_error(store.display) from None
        raise SynthgenError(f"{store.display} is not a synthgen dataset folder (no {MANIFEST})") from None
    except (IsADirectoryError, NotADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise SynthgenError(f"{store.display}/{MANIFEST} is unreadable ({exc})") from None
    try:
        manifest = json.loads(text)
        why = None if isinstance(manifest, dict) else "not a JSON object"
    except ValueError as exc:
        why = str(exc)
    if why is not None:
        raise SynthgenError(f"{store.display}/{MANIFEST} is unreadable ({why}); run the same build command to rewrite it")
    return manifest


def _manifest_shard(folder: str, manifest: dict, index: int) -> tuple[ShardSpec, dict]:
    plan = ShardPlan(manifest["plan"]["total"], manifest["plan"]["per_shard"], manifest["plan"]["split"])
    rows = manifest.get("rows", plan.total)
    if not 0 <= index < rows:
        raise SynthgenError(f"index {index} out of range: the dataset has {rows} rows, indices 0..{rows - 1}")
    spec = plan.shard(index // plan.per_shard)
    marker = next((m for m in manifest.get("shards", []) if m.get("file") == spec.filename), None)
    if marker is None:
        raise SynthgenError(f"{folder}/{MANIFEST} does not list shard {spec.filename}")
    return spec, marker


def read_row(folder: str | Path | Store, index: int, manifest: Optional[dict] = None,
             storage_options: Optional[dict[str, Any]] = None) -> dict:
    """One row of a built dataset (a path, URL or store), by global index, straight from its shard
    (checked first: size, sha256 and indices against the manifest)."""
    from synthgen.dataset.writer import read_checked_shard

    store = open_store(folder, storage_options, reading=True)
    manifest = manifest or read_manifest(store)
    spec, marker = _manifest_shard(store.display, manifest, index)
    problem, table = read_checked_shard(store, spec.filename, marker)
    if problem is not None:
        raise SynthgenError(
            f"shard {spec.filename} is damaged ({problem}); run `synthgen build` on the folder's recipe to rebuild it"
        )
    row = table.slice(index - spec.start, 1).to_pylist()[0]
    if row["index"] != index:
        raise SynthgenError(f"shard {spec.filename} is out of order at index {index}")
    return row


def regenerate_row(folder: str | Path | Store, index: int, loaded_pipeline: Any = None, row: Optional[dict] = None,
                   storage_options: Optional[dict[str, Any]] = None):
    """Regenerate image ``index`` from its row's prompt and seed and the folder's recipe settings
    (``folder``: a path, an fsspec URL or a store).

    Returns the PIL image at the stored size (before storage encoding, which for PNG is lossless).
    Refuses when the model (its resolved revision) or dtype differ from the ones the row was made with.
    Compiles the UNet and VAE decoder (``torch.compile``, minutes on a GPU) only when the row's
    shard was made compiled: the same kernels as the build, for the same pixels.
    """
    from synthgen.generate import ImageGenerator, load_pipeline
    from synthgen.recipe import recipe_from_dict

    store = open_store(folder, storage_options, reading=True)
    manifest = read_manifest(store)
    recipe = recipe_from_dict(manifest["recipe"], source=f"{store.display}/{MANIFEST}")
    row = row or read_row(store, index, manifest)
    if row["settings_hash"] != manifest["settings_hash"]:
        raise SynthgenError(f"row {index} was made with other settings ({row['settings_hash']}) than the manifest's")
    _, marker = _manifest_shard(store.display, manifest, index)
    made_with = marker.get("model") if isinstance(marker.get("model"), dict) else manifest.get("model") or {}
    cfg = recipe.generator
    if made_with.get("compiled") is False:  # e.g. built on a CPU: compiling here would cost minutes, for other kernels
        cfg = cfg.model_copy(update={"compile": False})  # how it loads, not what it hashes: the recipe's hash is checked
    loaded = loaded_pipeline if loaded_pipeline is not None else load_pipeline(cfg)
    now = recipe.settings_hash(loaded.provenance())
    if now != row["settings_hash"]:
        stored = manifest.get("model", {})
        raise SynthgenError(
            f"the model now loads as {loaded.model_revision} ({str(loaded.dtype).replace('torch.', '')}); row {index} "
            f"was made with {stored.get('model_revision')} ({stored.get('dtype')}): its pixels cannot be reproduced"
        )
    generator = ImageGenerator(loaded, cfg, recipe.output, recipe.seed)
    return generator.regenerate_row(row)
