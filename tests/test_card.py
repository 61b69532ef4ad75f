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
