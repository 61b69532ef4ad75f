"""Reading a built dataset folder back: its manifest, one row, one row regenerated from its fields."""

from __future__ import annotations

import json

from pathlib import Path
from typing import Any, Optional

from synthgen.dataset.folder import MANIFEST, PLAN_FILE
from synthgen.dataset.plan import ShardPlan, ShardSpec
from synthgen.dataset.storage import STATE_DIR
from synthgen.errors import SynthgenError


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
