"""The dataset card (README.md): YAML ``configs`` + ``dataset_info`` so ``load_dataset(folder)`` and
the Hub viewer get features, splits and class names right, then a human-readable summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from datasets import DatasetInfo, Features, SplitDict, SplitInfo

from synthgen.dataset.writer import atomic_write_text


def card_yaml(features: Features, split: str, num_rows: int, num_bytes: int, pretty_name: str) -> dict:
    info = DatasetInfo(
        features=features,
        splits=SplitDict({split: SplitInfo(name=split, num_examples=num_rows, num_bytes=num_bytes)}),
    )
    dataset_info = info._to_yaml_dict()  # the same serialisation datasets uses for Hub cards
    return {
        "pretty_name": pretty_name,
        "task_categories": ["image-classification"] if "label" in features else ["image-to-text"],
        "tags": ["synthetic", "stable-diffusion", "synthgen"],
        "configs": [
            {"config_name": "default", "data_files": [{"split": split, "path": f"data/{split}-*.parquet"}]}
        ],
        "dataset_info": dataset_info,
    }


def render_card(manifest: dict[str, Any], features: Features) -> str:
    recipe = manifest["recipe"]
    plan = manifest["plan"]
    gen = recipe["generator"]
    out = recipe["output"]
    header = card_yaml(
        features,
        plan["split"],
        manifest["rows"],
        manifest["bytes"],
        pretty_name=f"synthgen: {recipe['name']}",
    )
    yaml_text = yaml.safe_dump(header, sort_keys=False, allow_unicode=True)
    model = manifest.get("model", {})
    is_builtin = str(gen["model"]).startswith("builtin:")
    lines = [
        "---",
        yaml_text.rstrip(),
        "---",
        f"# {recipe['name']}",
        "",
        recipe.get("description") or "A synthetic image dataset built by synthgen.",
        "",
        "## How it was made",
        "",
        f"- Images: {manifest['rows']:,} in {plan['num_shards']} parquet shard(s), split `{plan['split']}`.",
        f"- Prompts: `{recipe['prompts']['kind']}` sampler, recipe seed {recipe['seed']}.",
        f"- Model: `{gen['model']}` (revision `{model.get('model_revision') or gen.get('revision') or 'default'}`),"
        f" scheduler `{model.get('scheduler') or gen['scheduler']}`, {gen['steps']} steps,"
        f" guidance {gen['guidance_scale']}, generated at {gen['width']}x{gen['height']},"
        f" dtype `{model.get('dtype') or gen['dtype']}`.",
        f"- Stored as {out['image_format'].upper()}"
        + (f" at {out['image_size']}x{out['image_size']} ({out['resize_filter']} resize)." if out["image_size"] else " at the generated size."),
        "- Prompts longer than the text encoder's context (77 CLIP tokens) are truncated by the"
        " pipeline; the `prompt` column stores the full text.",
        f"- Regenerated images (black or non-finite outputs, given a derived seed): {manifest.get('retries', 0)}.",
        f"- Settings hash: `{manifest['settings_hash']}`; recipe hash: `{manifest['recipe_hash'][:16]}`.",
        "",
    ]
    if is_builtin:
        lines += [
            "> This dataset was made with a tiny random-weight pipeline built by synthgen for demos and",
            "> tests. Its images are noise-like and say nothing about image quality.",
            "",
        ]
    lines += [
        "## Columns",
        "",
        "- `image`: the image.",
        "- `index`: the image's global index; with the recipe seed it fixes the seed.",
        "- `prompt`: the text prompt given to the pipeline.",
    ]
    if "label" in features:
        lines.append("- `label`: the class (names in the card's `dataset_info`).")
    lines += [
        "- `group`: images sharing a group id come from the same prompt source (e.g. the same caption).",
        "- `seed`: the seed of the image's `torch.Generator` (a derived seed when `retries` > 0).",
        "- `retries`: how many times the image was regenerated.",
        "- `settings_hash`: hash of the generation settings in `synthgen_manifest.json`.",
        "- `meta`: JSON of the prompt's parts (template, hypernym, background, axes, ...).",
        "",
        "## Reproduce",
        "",
        "Every row regenerates from its own fields and the settings in `synthgen_manifest.json`:",
        "",
        "```python",
        "from synthgen.dataset import regenerate_row",
        "image = regenerate_row('path/to/this/folder', index=0)",
        "```",
        "",
        f"Library versions: {', '.join(f'{k} {v}' for k, v in manifest.get('versions', {}).items())}.",
        "",
    ]
    return "\n".join(lines)


def write_card(folder: Path, manifest: dict[str, Any], features: Features) -> None:
    atomic_write_text(Path(folder) / "README.md", render_card(manifest, features))
