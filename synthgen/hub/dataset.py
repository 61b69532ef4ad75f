"""Publish a finished dataset folder as a versioned Hub dataset.

Only a complete, intact build goes up: its manifest must exist and every shard must match the
sha256 the manifest records. The upload is assembled in a staging folder (hard links to the
shards, so nothing large is copied): the shards, ``synthgen_manifest.json``, ``preview.png`` (a
sample grid) and a ``README.md`` card rendered for the repository and tag it is published as.
``.synthgen/`` (locks, plan, markers) never goes up. After the push, the folder's manifest records
the repo id, commit sha and tag under ``pushes``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from synthgen.dataset import dataset_features, read_manifest
from synthgen.dataset.build import MANIFEST
from synthgen.dataset.card import render_card
from synthgen.dataset.writer import STATE_DIR, atomic_write_text
from synthgen.errors import SynthgenError
from synthgen.hub.publish import (
    PushResult,
    Remote,
    RemoteCheck,
    check_push_args,
    link_file,
    publish_folder,
    require_token,
    staging_folder,
)
from synthgen.hub.retry import Backoff

DATA_PATTERNS = ["data/*"]  # the files a dataset push owns on the Hub (stale shards are deleted)
PUSH_RECORDS = "pushes"  # manifest key: one record per push (repo id, commit, tag, ...)


def verified_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a complete build whose shards all match their recorded sha256."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SynthgenError(f"{folder} is not a folder")
    manifest = read_manifest(folder)  # raises for a folder that holds no build at all
    if "shards" not in manifest or not (folder / MANIFEST).is_file():
        raise SynthgenError(f"{folder} is an incomplete build (no {MANIFEST}); finish it with `synthgen build` first")
    plan = manifest["plan"]
    shards = manifest["shards"]
    if len(shards) != plan["num_shards"] or sum(s["rows"] for s in shards) != plan["total"]:
        raise SynthgenError(f"{folder} is an incomplete build: its manifest lists {len(shards)} of "
                            f"{plan['num_shards']} shards")
    listed = {s["file"] for s in shards}
    extra = sorted(p.relative_to(folder).as_posix() for p in (folder / "data").iterdir()
                   if p.relative_to(folder).as_posix() not in listed) if (folder / "data").is_dir() else []
    if extra:
        raise SynthgenError(f"{folder}/data holds files its manifest does not list ({extra[0]}"
                            f"{' and more' if len(extra) > 1 else ''}): a build may still be running; nothing was pushed")
    for shard in shards:
        path = folder / shard["file"]
        if not path.is_file():
            raise SynthgenError(f"{folder} is an incomplete build: {shard['file']} is missing")
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if path.stat().st_size != shard["bytes"] or digest != shard["sha256"]:
            raise SynthgenError(f"{shard['file']} does not match the sha256 in {MANIFEST}: the folder is "
                                "corrupt; rebuild that shard (nothing was pushed)")
    return manifest


def same_dataset_check(manifest: dict[str, Any], force: bool) -> RemoteCheck:
    """A ``check_remote`` for :func:`publish_folder`: the repo may be empty, hold earlier versions
    of this dataset (same recipe name) or what an interrupted push of it left; anything else
    needs ``force``."""
    name = manifest["recipe"]["name"]

    def check(remote: Remote, head: Optional[str], tree: dict[str, Any], ours: set[str]) -> None:
        others = set(tree) - {".gitattributes", "README.md"}
        if not others:
            return  # a new, empty repo
        if MANIFEST in tree:
            other = remote.read_json(MANIFEST, head).get("recipe", {}).get("name")
            if other == name:
                return
            problem = f"holds the synthgen dataset '{other}'"
        elif others <= ours:
            return  # part of this very push, committed before it was interrupted
        else:
            problem = "holds files that are not a synthgen dataset"
        if not force:
            raise SynthgenError(f"{remote.repo_id} {problem}, not '{name}'; push to another repo, or pass "
                                "--force to publish this dataset over it")

    return check


def push_dataset(
    folder: str | Path,
    repo_id: str,
    *,
    tag: Optional[str] = None,
    branch: Optional[str] = None,
    create_pr: bool = False,
    private: bool = False,
    message: Optional[str] = None,
    force: bool = False,
    token: Optional[str] = None,
    backoff: Backoff = Backoff(),
) -> PushResult:
    """Publish the complete build in ``folder`` to the Hub dataset ``repo_id`` (``namespace/name``),
    tagged ``tag`` (e.g. ``v1.0.0``), and record the push in the folder's manifest.

    ``synthgen build --push-to-hub`` calls this after a complete build. Re-running a push that was
    interrupted completes it; pushing an existing tag is a no-op if it holds the same files and an
    error otherwise; a repo holding another dataset is refused unless ``force``.
    """
    from synthgen.preview import write_preview

    folder = Path(folder)
    check_push_args(repo_id, tag, branch, create_pr)
    token = require_token(token)
    manifest = verified_manifest(folder)
    published = {k: v for k, v in manifest.items() if k != PUSH_RECORDS}
    name = manifest["recipe"]["name"]
    message = message or f"synthgen {name}{' ' + tag if tag else ''}: {manifest['rows']:,} images"
    description = (f"recipe hash {manifest['recipe_hash']}, settings hash {manifest['settings_hash']}, "
                   f"model {manifest['recipe']['generator']['model']}")
    with staging_folder(folder / STATE_DIR) as stage:
        for shard in manifest["shards"]:
            link_file(folder / shard["file"], stage / shard["file"])
        atomic_write_text(stage / MANIFEST, json.dumps(published, indent=1))
        write_preview(folder, stage / "preview.png")
        card = render_card(published, dataset_features(manifest.get("class_names")), folder=folder,
                           repo_id=repo_id, tag=tag, preview="preview.png")
        atomic_write_text(stage / "README.md", str(card))
        result = publish_folder(
            stage,
            repo_id,
            repo_type="dataset",
            message=message,
            description=description,
            tag=tag,
            branch=branch,
            create_pr=create_pr,
            private=private,
            delete_patterns=DATA_PATTERNS,
            check_remote=same_dataset_check(manifest, force),
            known_sha256={s["file"]: s["sha256"] for s in manifest["shards"]},
            token=token,
            backoff=backoff,
        )
    record_push(folder, result)
    return result


def record_push(folder: Path, result: PushResult) -> None:
    """Add the push to the folder's manifest (once per repo, commit and tag: a re-run that found the
    push already done keeps the first record)."""
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    record = result.record()
    key = (record["repo_id"], record["commit"], record["tag"])
    pushes = manifest.get(PUSH_RECORDS, [])
    if any((p.get("repo_id"), p.get("commit"), p.get("tag")) == key for p in pushes):
        return
    manifest[PUSH_RECORDS] = pushes + [record]
    atomic_write_text(path, json.dumps(manifest, indent=1))
