"""The dataset card (README.md), built with ``huggingface_hub``'s :class:`DatasetCard`.

Its YAML header gives the Hub what it indexes and what the viewer and ``load_dataset`` read:
license (the generator model's), task and size categories, tags, ``configs`` (which files make
which split) and ``dataset_info`` (features, with the class names of the ``label`` column). The body
is for people: a sample grid, per-class counts, how the images were made (with the classes that
needed the most regenerations), provenance, how to load a given published version, and the BibTeX
of the papers the recipe follows.

The build writes the card into the folder; ``synthgen push`` renders it again for the repository
and tag it publishes to, so the card says how to load exactly that version.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Optional

from datasets import ClassLabel, Features, Image, Value
from huggingface_hub import DatasetCard, DatasetCardData

from synthgen.dataset.storage import Store, open_store
from synthgen.dataset.writer import parquet_uncompressed_bytes, retried_label_counts

# --------------------------------------------------------------------------------------------------
# license: the generator model's
# --------------------------------------------------------------------------------------------------
# (substring of the model id, Hub license id), first match wins. Stable Diffusion 1.x checkpoints
# carry the CreativeML OpenRAIL-M license, 2.x and XL the CreativeML Open RAIL++-M license.
MODEL_LICENSES = (
    ("stable-diffusion-v1", "creativeml-openrail-m"),
    ("stable-diffusion-2", "openrail++"),
    ("stable-diffusion-xl", "openrail++"),
)
BUILTIN_LICENSE = "apache-2.0"  # builtin:* pipelines are synthgen's own random weights


def generator_license(model: str) -> dict[str, str]:
    """Card license fields for a dataset made by ``model`` (a Hub id, a local folder or builtin:*).

    A local folder's own model card license is used when it has one. An unknown model gives
    ``other`` with a link to the model, whose license governs what was generated.
    """
    if model.startswith("builtin:"):
        return {"license": BUILTIN_LICENSE}
    lowered = model.lower()
    for needle, license_id in MODEL_LICENSES:
        if needle in lowered:
            return {"license": license_id}
    readme = Path(model) / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        try:
            found = ModelCard.load(readme).data.license
        except Exception:  # noqa: BLE001 - a folder's malformed card just leaves the license unknown
            found = None
        if isinstance(found, str) and found:
            return {"license": found}
    link = model if "://" in model else f"https://huggingface.co/{model}"
    return {"license": "other", "license_name": "generator-model-license", "license_link": link}


# --------------------------------------------------------------------------------------------------
# citations: the papers a recipe follows
# --------------------------------------------------------------------------------------------------
PAPERS = {
    "sariyildiz2023fake": """@inproceedings{sariyildiz2023fake,
  title     = {Fake it till you make it: Learning transferable representations from synthetic ImageNet clones},
  author    = {Sar{\\i}y{\\i}ld{\\i}z, Mert B{\\"u}lent and Alahari, Karteek and Larlus, Diane and Kalantidis, Yannis},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2023}
}""",
    "tian2023stablerep": """@inproceedings{tian2023stablerep,
  title     = {StableRep: Synthetic Images from Text-to-Image Models Make Strong Visual Representation Learners},
  author    = {Tian, Yonglong and Fan, Lijie and Isola, Phillip and Chang, Huiwen and Krishnan, Dilip},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2023}
}""",
    "mormille2023selfsupervised": """@misc{mormille2023selfsupervised,
  title  = {Self-Supervised Pre-training of Vision Transformers Using Stable Diffusion-Generated Images},
  author = {Mormille, Luiz H. and Atsumi, Masayasu},
  year   = {2023}
}""",
    "lomurno2024stable": """@misc{lomurno2024stable,
  title         = {Stable Diffusion Dataset Generation for Downstream Classification Tasks},
  author        = {Lomurno, Eugenio and D'Oria, Matteo and Matteucci, Matteo},
  year          = {2024},
  eprint        = {2405.02698},
  archivePrefix = {arXiv}
}""",
    "rombach2022high": """@inproceedings{rombach2022high,
  title     = {High-Resolution Image Synthesis with Latent Diffusion Models},
  author    = {Rombach, Robin and Blattmann, Andreas and Lorenz, Dominik and Esser, Patrick and Ommer, Bj{\\"o}rn},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {10684--10695},
  year      = {2022}
}""",
}
# The prompt sampler names the method: WordNet prompts are Sariyildiz et al.'s, captions StableRep's,
# combinatorial prompts Mormille & Atsumi's.
PAPERS_BY_PROMPTS = {
    "wordnet": ["sariyildiz2023fake"],
    "captions": ["tian2023stablerep"],
    "combinatorial": ["mormille2023selfsupervised"],
}


def recipe_papers(manifest: dict[str, Any]) -> list[str]:
    """Keys of :data:`PAPERS` for the dataset a manifest describes."""
    recipe = manifest["recipe"]
    keys = list(PAPERS_BY_PROMPTS.get(recipe["prompts"]["kind"], []))
    pipeline_class = str(manifest.get("model", {}).get("pipeline_class") or "")
    if "ClassConditioned" in pipeline_class:  # Lomurno et al.'s class-encoder pipeline
        keys.append("lomurno2024stable")
    if not str(recipe["generator"]["model"]).startswith("builtin:"):
        keys.append("rombach2022high")  # Stable Diffusion itself
    return keys


# --------------------------------------------------------------------------------------------------
# YAML header
# --------------------------------------------------------------------------------------------------
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))


def size_category(rows: int) -> str:
    for limit, name in SIZE_CATEGORIES:
        if rows < limit:
            return name
    return "n>1B"


def features_yaml(features: Features) -> list[dict[str, Any]]:
    """The ``dataset_info.features`` list of a Hub card for synthgen's columns (Value, Image,
    ClassLabel), in the form ``datasets`` reads back into the same :class:`Features`."""
    out: list[dict[str, Any]] = []
    for name, feature in features.items():
        if isinstance(feature, ClassLabel):
            dtype: Any = {"class_label": {"names": {str(i): label for i, label in enumerate(feature.names)}}}
        elif isinstance(feature, Image):
            dtype = "image"
        elif isinstance(feature, Value):
            dtype = feature.dtype
        else:
            raise TypeError(f"column {name!r}: no card serialisation for {type(feature).__name__}")
        out.append({"name": name, "dtype": dtype})
    return out


def card_data(manifest: dict[str, Any], features: Features, num_bytes: int) -> DatasetCardData:
    """The card's YAML header; ``num_bytes``: the split's uncompressed size."""
    recipe = manifest["recipe"]
    split = manifest["plan"]["split"]
    labelled = "label" in features
    return DatasetCardData(
        pretty_name=f"synthgen: {recipe['name']}",
        **generator_license(str(recipe["generator"]["model"])),
        task_categories=["image-classification"] if labelled else ["image-feature-extraction"],
        size_categories=[size_category(manifest["rows"])],
        language=["en"],  # of the prompts
        annotations_creators=["machine-generated"],
        source_datasets=["original"],
        tags=["synthetic", "stable-diffusion", "synthgen", f"synthgen-recipe-{recipe['name']}",
              f"prompts-{recipe['prompts']['kind']}"],
        configs=[{"config_name": "default", "data_files": [{"split": split, "path": f"data/{split}-*.parquet"}]}],
        dataset_info={
            "features": features_yaml(features),
            "splits": [{"name": split, "num_bytes": num_bytes, "num_examples": manifest["rows"]}],
            "download_size": manifest["bytes"],
            "dataset_size": num_bytes,
        },
    )


# --------------------------------------------------------------------------------------------------
# body
# --------------------------------------------------------------------------------------------------
def _shards_store(folder: str | Path | Store | None) -> Optional[Store]:
    return None if folder is None else open_store(folder, reading=True)


def class_counts(folder: str | Path | Store | None, manifest: dict[str, Any]) -> Optional[Counter]:
    """Images per label id (None without labels): from the ``label_counts`` the writer keeps in
    each shard's marker (and so in the manifest), else from the shards' ``label`` column in
    ``folder`` (a path, URL or store; a folder built before markers held the counts)."""
    import pyarrow.parquet as pq

    if manifest.get("class_names") is None:
        return None
    shards = manifest["shards"]
    counts: Counter = Counter()
    if all(isinstance(s.get("label_counts"), dict) for s in shards):
        for shard in shards:
            counts.update({int(label): n for label, n in shard["label_counts"].items() if label != "None"})
        return counts
    store = _shards_store(folder)
    if store is None:
        return None
    for shard in shards:
        try:
            with store.open_read(shard["file"]) as f:
                counts.update(pq.read_table(f, columns=["label"]).column("label").to_pylist())
        except FileNotFoundError:
            return None
    return counts


def uncompressed_bytes(folder: str | Path | Store | None, manifest: dict[str, Any]) -> int:
    """The shards' uncompressed size: from their markers' ``uncompressed_bytes``, else from the
    parquet footers in ``folder`` (no data read); the files' size when the shards are not at hand."""
    import pyarrow.parquet as pq

    shards = manifest["shards"]
    if shards and all(isinstance(s.get("uncompressed_bytes"), int) for s in shards):
        return sum(s["uncompressed_bytes"] for s in shards)
    store = _shards_store(folder)
    if store is None or not shards:
        return int(manifest["bytes"])
    total = 0
    for shard in shards:
        try:
            with store.open_read(shard["file"]) as f:
                total += parquet_uncompressed_bytes(pq.ParquetFile(f).metadata)
        except FileNotFoundError:
            return int(manifest["bytes"])
    return total


def _load_section(manifest: dict[str, Any], repo_id: Optional[str], tag: Optional[str]) -> list[str]:
    split = manifest["plan"]["split"]
    if repo_id is None:
        return [
            "## Load it",
            "",
            "```python",
            "from datasets import load_dataset",
            f'ds = load_dataset("path/to/this/folder", split="{split}")',
            "```",
            "",
        ]
    revision = f', revision="{tag}"' if tag else ""
    lines = [
        "## Load a version",
        "",
        "```python",
        "from datasets import load_dataset",
        f'ds = load_dataset("{repo_id}"{revision}, split="{split}")',
    ]
    if manifest.get("class_names") is not None:
        lines.append('class_names = ds.features["label"].names')
    lines += [
        "```",
        "",
        "Every published version of this dataset is a git tag of this repository"
        + (f" (this one is `{tag}`)" if tag else "")
        + ". A tag is never moved, so `revision=` with a tag (or a commit sha) always returns the same"
        " rows and pixels; without `revision` you get the newest version on `main`.",
        "",
    ]
    return lines


def _class_section(manifest: dict[str, Any], counts: Optional[Counter]) -> list[str]:
    names = manifest.get("class_names")
    if names is None:
        return []
    lines = [f"## Classes ({len(names)})", ""]
    if counts is None:
        return lines + [", ".join(f"`{n}`" for n in names), ""]
    lines += ["| label | name | images |", "| ---: | --- | ---: |"]
    lines += [f"| {i} | {name} | {counts.get(i, 0):,} |" for i, name in enumerate(names)]
    present = [counts.get(i, 0) for i in range(len(names))]
    lines += ["", f"Images per class: min {min(present):,}, max {max(present):,}; classes with no image: "
              f"{sum(1 for c in present if c == 0)}.", ""]
    return lines


#: how many classes the card names as needing the most regenerations
REGENERATED_CLASSES_SHOWN = 5


def _regenerated_classes(manifest: dict[str, Any], counts: Optional[Counter]) -> list[str]:
    """A line naming the classes with the most regenerated images (a class the generator keeps
    making black or flagged images of), when any image was regenerated."""
    names = manifest.get("class_names")
    if names is None:
        return []
    per_label, unknown = retried_label_counts(manifest["shards"])
    known = sorted(((n, int(label)) for label, n in per_label.items() if label != "None" and n), key=lambda t: (-t[0], t[1]))
    if not known and not unknown:
        return []
    if not known:
        return ["- Regenerated images per class: not recorded (shards made by an older synthgen)."]
    parts = []
    for n, label in known[:REGENERATED_CLASSES_SHOWN]:
        total = counts.get(label) if counts is not None else None
        parts.append(f"`{names[label]}` {n:,}" + (f" of {total:,}" if total else ""))
    line = f"- Classes with the most regenerated images: {', '.join(parts)}"
    if len(known) > REGENERATED_CLASSES_SHOWN:
        line += f" ({len(known) - REGENERATED_CLASSES_SHOWN} more class(es) had some)"
    if unknown:
        line += f"; {unknown:,} more in shards an older synthgen made, not broken down by class"
    return [line + "."]


def render_card(
    manifest: dict[str, Any],
    features: Features,
    *,
    folder: str | Path | Store | None = None,
    repo_id: Optional[str] = None,
    tag: Optional[str] = None,
    preview: Optional[str] = None,
) -> DatasetCard:
    """The card of the dataset ``manifest`` describes.

    ``folder`` (the build folder: a path, URL or store) gives per-class counts where the manifest
    does not hold them (folders built before it did); ``repo_id``/``tag`` the published version
    the card describes; ``preview`` the path (relative to the card) of the sample grid.
    """
    recipe = manifest["recipe"]
    plan = manifest["plan"]
    gen = recipe["generator"]
    out = recipe["output"]
    model = manifest.get("model", {})
    data = card_data(manifest, features, uncompressed_bytes(folder, manifest))
    counts = class_counts(folder, manifest)
    is_builtin = str(gen["model"]).startswith("builtin:")
    lines = [
        f"# {recipe['name']}",
        "",
        recipe.get("description") or "A synthetic image dataset built by synthgen.",
        "",
    ]
    if preview:
        lines += [f"![The first images with their prompts]({preview})", ""]
    if is_builtin:
        lines += [
            "> This dataset was made with a tiny random-weight pipeline built by synthgen for demos and",
            "> tests. Its images are noise-like and say nothing about image quality.",
            "",
        ]
    lines += _load_section(manifest, repo_id, tag)
    lines += _class_section(manifest, counts)
    revision = model.get("model_revision") or gen.get("revision") or "default"
    lines += [
        "## How it was made",
        "",
        f"- Images: {manifest['rows']:,} in {plan['num_shards']} parquet shard(s), split `{plan['split']}`.",
        f"- Prompts: `{recipe['prompts']['kind']}` sampler, recipe seed {recipe['seed']}.",
        f"- Model: `{gen['model']}` (revision `{revision}`), pipeline `{model.get('pipeline_class') or '?'}`,"
        f" scheduler `{model.get('scheduler') or gen['scheduler']}`, {gen['steps']} steps,"
        f" guidance {gen['guidance_scale']}, generated at {gen['width']}x{gen['height']},"
        f" dtype `{model.get('dtype') or gen['dtype']}` on `{model.get('device') or gen['device']}`.",
        f"- Stored as {out['image_format'].upper()}"
        + (f" at {out['image_size']}x{out['image_size']} ({out['resize_filter']} resize)." if out["image_size"] else " at the generated size."),
        "- Prompts longer than the text encoder's context (77 CLIP tokens) are truncated by the"
        " pipeline; the `prompt` column stores the full text.",
        f"- Regenerated images (black, non-finite or flagged outputs, given a derived seed): {manifest.get('retries', 0)}"
        f" regeneration(s) of {manifest.get('retried_images', 0)} image(s).",
        *_regenerated_classes(manifest, counts),
    ]
    if "safety_checker" in model:  # manifests of older synthgen do not say
        checked = "the pipeline's own, on every image" if model["safety_checker"] else "none ran (images are unfiltered)"
        lines.append(f"- Safety checker: {checked}.")
    lines += [
        "",
        "## Provenance",
        "",
        "Every row regenerates from its own fields (`prompt`, `seed`) and the settings in"
        " `synthgen_manifest.json`, which also holds the resolved recipe, the model revision, the"
        " device, the library versions and the sha256 of every shard.",
        "",
        f"- Settings hash: `{manifest['settings_hash']}` (the `settings_hash` column of every row);"
        f" recipe hash: `{manifest['recipe_hash'][:16]}`.",
        f"- Built: {manifest.get('created', '?')}.",
        f"- Library versions: {', '.join(f'{k} {v}' for k, v in manifest.get('versions', {}).items())}.",
        "",
        "```python",
        "from synthgen.dataset import regenerate_row",
        "image = regenerate_row('path/to/a/local/copy', index=0)",
        "```",
        "",
        "## Columns",
        "",
        "- `image`: the image.",
        "- `index`: the image's global index; with the recipe seed it fixes the seed.",
        "- `prompt`: the text prompt given to the pipeline.",
    ]
    if "label" in features:
        lines.append("- `label`: the class (names in the card's `dataset_info` and the table above).")
    lines += [
        "- `group`: images sharing a group id come from the same prompt source (e.g. the same caption).",
        "- `seed`: the seed of the image's `torch.Generator` (a derived seed when `retries` > 0).",
        "- `retries`: how many times the image was regenerated.",
        "- `settings_hash`: hash of the generation settings in `synthgen_manifest.json`.",
        "- `meta`: JSON of the prompt's parts (template, hypernym, background, axes, ...).",
        "",
        "## License",
        "",
    ]
    if data.license == "other":
        lines.append(f"The license of the generator model `{gen['model']}` applies ({data.license_link}).")
    elif is_builtin:
        lines.append(f"`{data.license}`: the generator is synthgen's own random-weight pipeline.")
    else:
        lines.append(f"`{data.license}`, the license of the generator model `{gen['model']}`.")
    lines.append("")
    papers = recipe_papers(manifest)
    if papers:
        lines += ["## Citation", "", "The recipe follows these papers:", "", "```bibtex"]
        lines += ["\n\n".join(PAPERS[key] for key in papers), "```", ""]
    body = "\n".join(lines)
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_card(folder: str | Path | Store, manifest: dict[str, Any], features: Features) -> None:
    """Write the build's card into ``folder`` (README.md, written whole), embedding ``preview.png``
    if the folder has one."""
    store = open_store(folder)
    preview = "preview.png" if store.exists("preview.png") else None
    store.write_text("README.md", str(render_card(manifest, features, folder=store, preview=preview)))
