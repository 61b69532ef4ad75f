"""Publish a ``save_pretrained`` folder (a diffusers pipeline, a transformers or timm model) to a
Hub model repo, the same way as datasets: one commit, tagged, with a model card that names the
data the model was trained on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from huggingface_hub import ModelCard, ModelCardData, constants

from synthgen.dataset.build import MANIFEST
from synthgen.dataset.card import generator_license
from synthgen.dataset.writer import atomic_write_text
from synthgen.errors import SynthgenError
from synthgen.hub.publish import (
    PushResult,
    Remote,
    RemoteCheck,
    check_push_args,
    index_files,
    link_file,
    publish_folder,
    require_token,
    staging_folder,
)
from synthgen.hub.retry import Backoff

CONFIG_FILES = ("model_index.json", "config.json")  # diffusers pipeline / single model
MODEL_PATTERNS = ["*"]  # a model push owns the whole repo: files the new version lacks are deleted


def model_config(folder: Path) -> tuple[str, dict[str, Any]]:
    for name in CONFIG_FILES:
        path = folder / name
        if path.is_file():
            try:
                return name, json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise SynthgenError(f"{path} is not valid JSON ({exc.msg})") from None
    raise SynthgenError(f"{folder} is not a save_pretrained folder (no {' or '.join(CONFIG_FILES)})")


def model_class(config: dict[str, Any]) -> Optional[str]:
    """What a config describes: a diffusers ``_class_name``, a transformers architecture or model
    type, or a timm ``architecture``."""
    architectures = config.get("architectures") or [None]
    return config.get("_class_name") or architectures[0] or config.get("model_type") or config.get("architecture")


def training_data(refs: list[str]) -> list[dict[str, Optional[str]]]:
    """``org/name``, ``org/name@revision`` or a local dataset folder (whose manifest names the Hub
    version it was published as, if it was) -> [{"repo_id", "revision", "local"}]."""
    out = []
    for ref in refs:
        path = Path(ref)
        if (path / MANIFEST).is_file():
            manifest = json.loads((path / MANIFEST).read_text())
            pushes = manifest.get("pushes") or []
            if pushes:
                last = pushes[-1]
                out.append({"repo_id": last["repo_id"], "revision": last["tag"] or last["commit"], "local": ref})
            else:
                out.append({"repo_id": None, "revision": None, "local": f"{ref} ({manifest['recipe']['name']})"})
            continue
        repo_id, _, revision = ref.partition("@")
        if repo_id.count("/") != 1:
            raise SynthgenError(f"training data {ref!r}: give a Hub dataset as org/name[@revision] or a dataset folder")
        out.append({"repo_id": repo_id, "revision": revision or None, "local": None})
    return out


def render_model_card(
    folder: Path,
    config_name: str,
    config: dict[str, Any],
    data: list[dict[str, Optional[str]]],
    *,
    repo_id: str,
    tag: Optional[str],
    base_model: Optional[str],
) -> ModelCard:
    """The folder's own card (kept) or a new one, with metadata naming the training data."""
    existing = folder / "README.md"
    card = ModelCard.load(existing) if existing.is_file() else None
    card_data = card.data if card is not None else ModelCardData()
    hub_ids = [d["repo_id"] for d in data if d["repo_id"]]
    card_data.datasets = sorted(set(list(card_data.datasets or []) + hub_ids))
    card_data.tags = sorted(set(list(card_data.tags or []) + ["synthgen", "synthetic-data"]))
    if base_model:
        card_data.base_model = base_model
    if not card_data.license and base_model:  # a fine-tune inherits its base model's license
        for key, value in generator_license(base_model).items():
            setattr(card_data, key, value)
    if config_name == "model_index.json":
        card_data.library_name = card_data.library_name or "diffusers"
    cls = model_class(config) or "model"
    lines = [f"# {repo_id.split('/')[-1]}", "", f"A `{cls}` published with synthgen."] if card is None else [card.text.rstrip(), ""]
    lines += ["", "## Training data", ""]
    for d in data:
        if d["repo_id"]:
            at = f" at revision `{d['revision']}`" if d["revision"] else ""
            lines.append(f"- [`{d['repo_id']}`]({constants.ENDPOINT}/datasets/{d['repo_id']}){at}")
        else:
            lines.append(f"- a local dataset, not published: `{d['local']}`")
    revision = f', revision="{tag}"' if tag else ""
    from synthgen.generate.classcond import PIPELINE_CLASS

    if config.get("_class_name") == PIPELINE_CLASS:  # not a diffusers class: loaded by synthgen's own
        load = ["from synthgen import ClassConditionedPipeline",
                f'pipeline = ClassConditionedPipeline.from_pretrained("{repo_id}"{revision})']
    elif config_name == "model_index.json":
        load = ["from diffusers import DiffusionPipeline", f'pipeline = DiffusionPipeline.from_pretrained("{repo_id}"{revision})']
    else:
        load = ["from huggingface_hub import snapshot_download",
                f'folder = snapshot_download("{repo_id}"{revision})  # then from_pretrained(folder)']
    lines += ["", "## Load this version", "", "```python", *load, "```", ""]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))


def push_model(
    folder: str | Path,
    repo_id: str,
    *,
    datasets: list[str],
    tag: Optional[str] = None,
    branch: Optional[str] = None,
    create_pr: bool = False,
    private: bool = False,
    message: Optional[str] = None,
    base_model: Optional[str] = None,
    force: bool = False,
    token: Optional[str] = None,
    backoff: Backoff = Backoff(),
) -> PushResult:
    """Publish the ``save_pretrained`` folder ``folder`` to the Hub model repo ``repo_id``, tagged
    ``tag``, with a model card naming ``datasets`` (Hub ids ``org/name[@rev]`` or dataset folders)
    as its training data. A repo holding another kind of model is refused unless ``force``."""
    folder = Path(folder)
    check_push_args(repo_id, tag, branch, create_pr)
    if not datasets:
        raise SynthgenError("name the data the model was trained on: --dataset ORG/NAME[@REVISION] or a dataset folder")
    token = require_token(token)
    config_name, config = model_config(folder)
    data = training_data(datasets)
    card = render_model_card(folder, config_name, config, data, repo_id=repo_id, tag=tag, base_model=base_model)
    cls = model_class(config)
    with staging_folder(folder) as stage:
        for rel, local in index_files(folder).items():
            if rel != "README.md":
                link_file(local.path, stage / rel)
        atomic_write_text(stage / "README.md", str(card))
        return publish_folder(
            stage,
            repo_id,
            repo_type="model",
            message=message or f"synthgen: {cls or 'model'}{' ' + tag if tag else ''}",
            description="trained on " + ", ".join(d["repo_id"] or d["local"] or "?" for d in data),
            tag=tag,
            branch=branch,
            create_pr=create_pr,
            private=private,
            delete_patterns=MODEL_PATTERNS,
            check_remote=same_model_check(config_name, cls, force),
            token=token,
            backoff=backoff,
        )


def same_model_check(config_name: str, cls: Optional[str], force: bool) -> RemoteCheck:
    """The repo may be empty, hold earlier versions of the same kind of model, or what an
    interrupted push of this one left; anything else needs ``force``."""

    def check(remote: Remote, head: Optional[str], tree: dict[str, Any], ours: set[str]) -> None:
        others = set(tree) - {".gitattributes", "README.md"}
        if not others or force:
            return
        if config_name in tree:
            other = model_class(remote.read_json(config_name, head))
            if other == cls:
                return
            problem = f"holds a {other or 'different'} model"
        elif others <= ours:
            return
        else:
            problem = "holds files that are not this kind of model"
        raise SynthgenError(f"{remote.repo_id} {problem}, not a {cls}; push to another repo, or pass --force")

    return check
