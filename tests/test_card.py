"""The dataset card: built with huggingface_hub's DatasetCard, read back by the Hub's card parser
and by datasets (features, splits, class names), with license, sizes, counts and citations."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from datasets import ClassLabel, Features, Image, Value
from huggingface_hub import DatasetCard

from synthgen.dataset.card import (
    PAPERS,
    features_yaml,
    generator_license,
    recipe_papers,
    render_card,
    size_category,
)
from synthgen.dataset.schema import dataset_features


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_pipeline_path) -> Path:
    from synthgen.dataset import build_dataset
    from synthgen.recipe import load_recipe

    folder = tmp_path_factory.mktemp("card") / "demo"
    recipe = load_recipe("demo", ["count=30", "output.images_per_shard=20", "generator.steps=2",
                                  "generator.batch_size=10", "generator.device=cpu"])
    assert build_dataset(recipe, folder, progress=False).complete
    return folder


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "synthgen_manifest.json").read_text())


def test_build_writes_a_card_the_hub_and_datasets_read(built):
    import datasets

    card = DatasetCard.load(built / "README.md")
    data = card.data
    assert data.license == "apache-2.0" and data.size_categories == ["n<1K"]
    assert data.task_categories == ["image-classification"]
    assert "synthetic" in data.tags and "synthgen-recipe-demo" in data.tags
    assert data.configs[0]["data_files"] == [{"split": "train", "path": "data/train-*.parquet"}]
    assert data.dataset_info["splits"][0]["num_examples"] == 30
    assert data.dataset_info["download_size"] == manifest_of(built)["bytes"]
    ds = datasets.load_dataset(str(built), split="train")
    assert ds.features["label"].names[:2] == ["airplane", "automobile"] and isinstance(ds.features["image"], Image)
    assert len(ds) == 30
    # the card's features are the ones datasets itself writes for this schema (its serialiser is
    # private, so synthgen writes its own; this compares the two)
    features = dataset_features(manifest_of(built)["class_names"])
    assert data.dataset_info["features"] == features._to_yaml_list()
    assert Features._from_yaml_list(data.dataset_info["features"]) == features
    # the build's own card: how to load the local folder, no Hub version yet
    assert 'load_dataset("path/to/this/folder", split="train")' in card.text
    assert "revision=" not in card.text
    # no image was regenerated: no class to name
    assert manifest_of(built)["retried_images"] == 0 and manifest_of(built)["retried_label_counts"] == {}
    assert not regenerated_line(card.text) and "0 regeneration(s) of 0 image(s)." in card.text


def test_card_for_a_published_version(built):
    manifest = manifest_of(built)
    card = render_card(manifest, dataset_features(manifest["class_names"]), folder=built, repo_id="org/demo",
                       tag="v2.0.0", preview="preview.png")
    text = str(card)
    parsed = DatasetCard(text)  # what the Hub parses
    assert parsed.data.license == "apache-2.0"
    assert 'load_dataset("org/demo", revision="v2.0.0", split="train")' in text
    assert "![The first images with their prompts](preview.png)" in text
    # per-class counts from the shards' label column, summing to the dataset's size
    counts = [int(n) for n in re.findall(r"^\| \d+ \| \w+ \| (\d+) \|$", text, flags=re.M)]
    assert len(counts) == 10 and sum(counts) == 30
    assert manifest["settings_hash"] in text and manifest["model"]["model_revision"] in text
    assert "```bibtex\n@inproceedings{sariyildiz2023fake" in text


def test_features_yaml_covers_the_schema_and_rejects_what_it_cannot_write():
    features = Features({"image": Image(), "n": Value("int32"), "label": ClassLabel(names=["a", "b"])})
    assert features_yaml(features) == [
        {"name": "image", "dtype": "image"},
        {"name": "n", "dtype": "int32"},
        {"name": "label", "dtype": {"class_label": {"names": {"0": "a", "1": "b"}}}},
    ]
    with pytest.raises(TypeError, match="no card serialisation"):
        features_yaml(Features({"x": [Value("int32")]}))


@pytest.mark.parametrize(
    "model, expected",
    [
        ("CompVis/stable-diffusion-v1-4", "creativeml-openrail-m"),
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "creativeml-openrail-m"),
        ("runwayml/stable-diffusion-v1-5", "creativeml-openrail-m"),
        ("stabilityai/stable-diffusion-2", "openrail++"),
        ("stabilityai/stable-diffusion-2-1-base", "openrail++"),
        ("stabilityai/stable-diffusion-xl-base-1.0", "openrail++"),
        ("builtin:tiny-sd", "apache-2.0"),
    ],
)
def test_license_comes_from_the_generator_model(model, expected):
    assert generator_license(model) == {"license": expected}


def test_license_of_a_local_or_unknown_model(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# a model\n")
    assert generator_license(str(tmp_path)) == {"license": "mit"}
    assert generator_license("someone/some-model") == {
        "license": "other",
        "license_name": "generator-model-license",
        "license_link": "https://huggingface.co/someone/some-model",
    }


@pytest.mark.parametrize("rows, category", [(1, "n<1K"), (999, "n<1K"), (1_000, "1K<n<10K"),
                                            (1_200_000, "1M<n<10M"), (9_600_000, "1M<n<10M"),
                                            (10_000_000, "10M<n<100M")])
def test_size_category(rows, category):
    assert size_category(rows) == category


@pytest.mark.parametrize(
    "recipe, papers",
    [
        ("demo", ["sariyildiz2023fake"]),
        ("imagenet-sd", ["sariyildiz2023fake", "rombach2022high"]),
        ("stablerep-cc3m", ["tian2023stablerep", "rombach2022high"]),
        ("combinatorial", ["mormille2023selfsupervised", "rombach2022high"]),
    ],
)
def test_citations_follow_the_recipe(recipe, papers):
    from synthgen.recipe import load_recipe

    manifest = {"recipe": load_recipe(recipe).resolved(), "model": {}}
    assert recipe_papers(manifest) == papers
    manifest["model"]["pipeline_class"] = "ClassConditionedStableDiffusionPipeline"
    assert "lomurno2024stable" in recipe_papers(manifest)


@pytest.mark.parametrize("key", sorted(PAPERS))
def test_bibtex_entries_are_well_formed(key):
    entry = PAPERS[key]
    assert entry.startswith(("@inproceedings{" + key + ",", "@misc{" + key + ","))
    assert entry.count("{") == entry.count("}") and entry.endswith("}")
    assert re.search(r"^\s+title\s+= \{.+\},$", entry, flags=re.M)
    assert re.search(r"^\s+year\s+= \{20\d\d\}", entry, flags=re.M)


# --------------------------------------------------------------------------------------------------
# regenerated images per class
# --------------------------------------------------------------------------------------------------
CAT = 3  # cifar10's "cat": the class the tiny pipeline below keeps making broken images of


def nan_for_class(loaded, prompts: list[str]):
    """A forward hook on the real UNet: the noise prediction of an image of one of ``prompts`` (its
    text embedding in the batch) turns to NaN when that image's latents have a positive mean, so
    about half the seeds of that class give a non-finite image (rejected and regenerated with a
    derived seed) and every other class none. Which seeds fail is fixed by the seeds: deterministic."""
    import torch

    with torch.no_grad():
        targets = loaded.pipe.encode_prompt(prompts, "cpu", 1, False)[0]

    def hook(module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        noise = output[0] if isinstance(output, tuple) else output.sample
        for row, embedding in enumerate(kwargs["encoder_hidden_states"]):
            if sample[row].mean() > 0 and any(torch.allclose(embedding, t, atol=1e-5) for t in targets):
                noise[row] = float("nan")
        return output

    return loaded.pipe.unet.register_forward_hook(hook, with_kwargs=True)


def test_a_shards_regenerated_rows_are_counted_per_label():
    """The one count the writer puts in a marker and verify checks a shard against."""
    from synthgen.dataset.writer import shard_retried_label_counts

    assert shard_retried_label_counts([3, 0, 3, None, 7, 3, 10], [1, 0, 2, 1, 0, 0, 4]) == {"3": 2, "10": 1, "None": 1}
    assert shard_retried_label_counts([1, 2], [0, 0]) == {}


def regenerated_line(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("- Classes with the most regenerated", "- Regenerated images per class"))]


def test_regenerated_images_per_class_in_markers_manifest_and_card(tmp_path, tiny_pipeline_path, one_torch_thread):
    """A real build (tiny pipeline) whose images of one class come out non-finite for some seeds:
    each marker counts the shard's regenerated rows per label, the manifest sums them and the card
    names the class; old markers without the counts still resume, their images counted apart."""
    from collections import Counter

    import pyarrow.parquet as pq

    from synthgen.dataset import build_dataset, verify_dataset
    from synthgen.generate import load_pipeline
    from synthgen.prompts import build_sampler
    from test_resume import tiny

    recipe = tiny(**{"count": 30, "output.images_per_shard": 10, "prompts.templates": ["{c}"], "generator.max_retries": 8})
    sampler = build_sampler(recipe)
    prompts = sorted({sampler[i].prompt for i in range(len(sampler)) if sampler[i].label == CAT})
    loaded = load_pipeline(recipe.generator)
    folder = tmp_path / "ds"
    hook = nan_for_class(loaded, prompts)
    try:
        assert build_dataset(recipe, folder, progress=False, loaded_pipeline=loaded).dataset_complete
    finally:
        hook.remove()

    markers = {m.stem: json.loads(m.read_text()) for m in sorted((folder / ".synthgen/done").glob("*.json"))}
    expected = Counter()
    for name, marker in markers.items():
        rows = pq.read_table(folder / marker["file"], columns=["label", "retries"]).to_pylist()
        retried = Counter(r["label"] for r in rows if r["retries"])
        assert marker["retried_label_counts"] == {str(k): v for k, v in sorted(retried.items())}, name
        assert marker["retried_images"] == sum(retried.values())
        expected += retried
    cats = Counter(sampler[i].label for i in range(len(sampler)))[CAT]
    assert set(expected) == {CAT} and expected[CAT] == cats == 3  # every cat image needed regenerations here
    manifest = manifest_of(folder)
    assert manifest["retried_label_counts"] == {"3": 3} and "retried_images_unattributed" not in manifest
    assert manifest["retried_images"] == 3 and manifest["retries"] > 3
    text = (folder / "README.md").read_text()
    assert regenerated_line(text) == ["- Classes with the most regenerated images: `cat` 3 of 3."]
    assert f"given a derived seed): {manifest['retries']} regeneration(s) of 3 image(s)." in text
    assert verify_dataset(folder, decode=False).ok

    # markers of an older synthgen (no per-label counts) on one shard: the folder resumes with nothing
    # to make, its shards untouched; the manifest and card count that shard's images apart
    shards = {p.name: p.read_bytes() for p in (folder / "data").glob("*.parquet")}
    old = folder / ".synthgen/done" / f"{next(iter(markers))}.json"
    lost = markers[old.stem].pop("retried_label_counts")
    old.write_text(json.dumps(markers[old.stem]))
    for name in ("synthgen_manifest.json", "README.md"):
        (folder / name).unlink()
    result = build_dataset(recipe, folder, progress=False, loaded_pipeline=loaded)
    assert result.shards_written == 0 and result.dataset_complete
    assert {p.name: p.read_bytes() for p in (folder / "data").glob("*.parquet")} == shards
    manifest = manifest_of(folder)
    assert manifest["retried_images_unattributed"] == lost["3"] == 1
    assert manifest["retried_label_counts"] == {"3": 2}
    assert regenerated_line((folder / "README.md").read_text()) == [
        "- Classes with the most regenerated images: `cat` 2 of 3; 1 more in shards an older synthgen made, not broken down by class."]
    assert verify_dataset(folder, decode=False).ok
    tampered = manifest_of(folder)
    entry = next(s for s in tampered["shards"] if s.get("retried_label_counts"))
    entry["retried_label_counts"] = {"5": 1}
    (folder / "synthgen_manifest.json").write_text(json.dumps(tampered))
    assert verify_dataset(folder, decode=False).problems == [
        f"{entry['file']}: its regenerated rows are not the per-class counts the manifest records"]

    # the card names the classes with the most, largest first, at most five
    first, *rest = manifest["shards"]
    crafted = {"0": 1, "1": 4, "2": 2, "4": 4, "5": 1, "6": 3, "7": 9}
    many = {**manifest, "shards": [{**first, "retried_label_counts": crafted}, *({**s, "retried_label_counts": {}} for s in rest)]}
    text = str(render_card(many, dataset_features(manifest["class_names"])))
    assert regenerated_line(text) == ["- Classes with the most regenerated images: `horse` 9 of 3, `automobile` 4 of 3, "
                                      "`deer` 4 of 3, `frog` 3 of 3, `bird` 2 of 3 (2 more class(es) had some)."]
    unknown = {**manifest, "shards": [{k: v for k, v in s.items() if k != "retried_label_counts"} for s in manifest["shards"]]}
    assert regenerated_line(str(render_card(unknown, dataset_features(manifest["class_names"])))) == [
        "- Regenerated images per class: not recorded (shards made by an older synthgen)."]
