"""Class-conditioned pipelines in `synthgen build`: the class sampler, the generator path, regenerate.

A real class-conditioned pipeline (the tiny Stable Diffusion with a random class encoder, saved with
save_pretrained), real parquet shards, real load_dataset, the real CLI.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from synthgen.errors import SynthgenError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --------------------------------------------------------------------------------------------------
# the sampler
def sampler(count, **prompts):
    from synthgen.prompts import ClassSampler
    from synthgen.recipe import ClassPrompts

    return ClassSampler(ClassPrompts(**prompts), count)


def test_balanced_plan_is_round_robin_and_records_have_no_prompt():
    s = sampler(23, classes="cifar10")
    assert s.class_names == NAMES and s.counts == [3, 3, 3] + [2] * 7
    records = list(s)
    assert [r.class_id for r in records] == [i % 10 for i in range(23)]
    r = records[13]
    assert r.prompt is None and r.label == r.class_id == 3 and r.label_name == "cat" and r.meta == {"class_name": "cat"}
    assert sampler(5, classes=["b", "a"]).class_names == ["b", "a"]


def test_dataset_distribution_by_largest_remainder_and_every_prefix_keeps_it(tmp_path):
    import datasets
    from PIL import Image

    labels = [0] * 50 + [1] * 30 + [2] * 20  # 50% / 30% / 20%
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y", "z"])})
    img = Image.new("RGB", (4, 4))
    datasets.Dataset.from_dict({"image": [img] * 100, "label": labels}, features=feats).to_parquet(tmp_path / "real.parquet")
    s = sampler(37, distribution="dataset", dataset=str(tmp_path / "real.parquet"))
    assert s.class_names == ["x", "y", "z"]
    assert s.counts == [19, 11, 7]  # 18.5, 11.1, 7.4 -> floors 18, 11, 7; the one left to the largest remainder (x)
    order = [s[i].class_id for i in range(37)]
    assert Counter(order) == {0: 19, 1: 11, 2: 7}
    for k in range(1, 38):  # within one image of the planned share at every prefix
        seen = Counter(order[:k])
        assert all(abs(seen[c] - k * s.counts[c] / 37) <= 1 for c in range(3)), (k, seen)
    # a subset of the dataset's classes, in another order: counts follow the names
    sub = sampler(10, classes=["z", "x"], distribution="dataset", dataset=str(tmp_path / "real.parquet"))
    assert sub.class_names == ["z", "x"] and sub.counts == [3, 7]


@pytest.mark.parametrize(
    "prompts, match",
    [
        ({"classes": []}, "prompts.classes: .*at least one"),
        ({"classes": ["a", "a"]}, "prompts.classes: .*unique"),
        ({"distribution": "dataset"}, "prompts.dataset is needed when classes is null"),
        ({"classes": "cifar10", "distribution": "uniform"}, "prompts.distribution"),
    ],
)
def test_bad_class_prompts_are_one_line(prompts, match):
    from synthgen.prompts import build_sampler
    from synthgen.recipe import recipe_from_dict

    data = {"name": "x", "count": 4, "prompts": {"kind": "classes", **prompts}, "generator": {"model": "builtin:tiny-sd"}}
    with pytest.raises(SynthgenError, match=match) as err:
        build_sampler(recipe_from_dict(data))
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------------
# the build
@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory, tiny_pipeline_path):
    from synthgen.classcond import ClassConditionedPipeline, ClassEncoder
    from synthgen.classcond.base import load_base_components

    torch.manual_seed(0)
    encoder = ClassEncoder.for_unet(load_base_components(tiny_pipeline_path).unet, len(NAMES))
    with torch.no_grad():
        encoder.hidden[0].bias.normal_()
    pipe = ClassConditionedPipeline.from_base(tiny_pipeline_path, encoder, NAMES, resolution=32,
                                              training={"run": "test", "encoder_epoch": 7, "unet_epoch": None})
    folder = tmp_path_factory.mktemp("ccpipe") / "pipeline"
    pipe.save_pretrained(folder)
    return folder


def write_recipe(path: Path, model: Path, **prompts) -> Path:
    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "cifar10-classcond.yaml").read_text())
    recipe.update(count=23, name="cc-test")
    recipe["prompts"].update(prompts)
    recipe["generator"].update(model=str(model), steps=3, guidance_scale=2.0, height=32, width=32, batch_size=8,
                               device="cpu", dtype="float32")
    recipe["output"].update(images_per_shard=10, image_size=16)
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory, saved_pipeline):
    from synthgen.cli import main

    tmp = tmp_path_factory.mktemp("ccbuild")
    recipe = write_recipe(tmp / "cc.yaml", saved_pipeline)
    assert main(["build", str(recipe), "--out", str(tmp / "ds"), "--quiet"]) == 0
    return tmp / "ds"


def test_build_writes_class_rows_that_load_with_the_planned_counts(built):
    import datasets

    ds = datasets.load_dataset(str(built), split="train")
    assert ds.features["label"].names == NAMES
    assert Counter(ds["label"]) == {c: (3 if c < 3 else 2) for c in range(10)}
    assert ds["label"][:12] == [i % 10 for i in range(12)]
    assert all(p is None for p in ds["prompt"])
    assert [json.loads(m)["class_name"] for m in ds["meta"][:3]] == NAMES[:3]
    assert ds[0]["image"].size == (16, 16)
    manifest = json.loads((built / "synthgen_manifest.json").read_text())
    model = manifest["model"]
    assert model["pipeline_class"] == "ClassConditionedPipeline" and model["model_revision"].startswith("sha256:")
    assert model["class_conditioning"]["training"]["encoder_epoch"] == 7
    assert model["class_conditioning"]["class_names"] == NAMES
    assert model["safety_checker"] is False  # the class-conditioned pipeline has none, whatever the recipe says


def test_preview_captions_a_class_row_with_its_class_name(built):
    """Class rows have no prompt: the preview names the class each image was made for."""
    from synthgen.preview import read_first_rows

    rows = read_first_rows(built, 12)
    assert [r["label_name"] for r in rows] == [NAMES[i % 10] for i in range(12)]
    assert all(r["prompt"] is None for r in rows)


def test_regenerate_gives_the_stored_pixels(built, tmp_path, capsys):
    import datasets

    from synthgen.cli import main
    from synthgen.dataset import regenerate_row

    stored = datasets.load_dataset(str(built), split="train")[13]["image"]
    assert np.array_equal(np.asarray(regenerate_row(built, 13)), np.asarray(stored))
    assert main(["regenerate", str(built), "13", "--out", str(tmp_path / "r.png")]) == 0
    assert "max pixel difference from the stored image: 0" in capsys.readouterr().out


def test_generation_depends_on_class_and_seed_only(saved_pipeline):
    from synthgen.generate import ImageGenerator, load_pipeline
    from synthgen.generate.classcond import ClassConditionedGenerator
    from synthgen.prompts import ClassSampler
    from synthgen.recipe import ClassPrompts, GeneratorConfig, OutputConfig

    cfg = GeneratorConfig(model=str(saved_pipeline), steps=3, guidance_scale=2.0, height=32, width=32, batch_size=4,
                          device="cpu", dtype="float32")
    loaded = load_pipeline(cfg)
    gen = ImageGenerator(loaded, cfg, OutputConfig(), 5)
    assert isinstance(gen, ClassConditionedGenerator) and loaded.pipeline_class == "ClassConditionedPipeline"
    records = list(ClassSampler(ClassPrompts(classes=NAMES[::-1]), 4))  # the dataset's ids reversed: mapped by name
    images = gen.generate(records)
    alone = gen.generate_class(NAMES.index(records[2].label_name), images[2].seed)
    diff = np.abs(np.asarray(images[2].image, np.int16) - np.asarray(alone, np.int16))
    assert diff.max() <= 2  # batched CPU kernels may round differently (see test_generate.py)
    assert np.abs(np.asarray(images[0].image, np.int16) - np.asarray(images[1].image, np.int16)).max() > 10


def test_class_outside_the_label_set_is_refused_before_anything_is_written(tmp_path, saved_pipeline, capsys):
    from synthgen.cli import main

    recipe = write_recipe(tmp_path / "bad.yaml", saved_pipeline, classes=NAMES + ["unicorn"])
    assert main(["build", str(recipe), "--out", str(tmp_path / "ds"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class 'unicorn' is outside the label set" in err[0], err
    assert not (tmp_path / "ds").exists()
    # the generator refuses it too (e.g. for a Hub model the sampler cannot read beforehand)
    from synthgen.generate import ImageGenerator, load_pipeline
    from synthgen.prompts.base import PromptRecord
    from synthgen.recipe import GeneratorConfig, OutputConfig

    cfg = GeneratorConfig(model=str(saved_pipeline), steps=1, height=32, width=32, device="cpu", dtype="float32")
    gen = ImageGenerator(load_pipeline(cfg), cfg, OutputConfig(), 0)
    with pytest.raises(SynthgenError, match="class 'unicorn' is outside the label set"):
        gen.generate([PromptRecord(0, None, 10, "unicorn", meta={"class_name": "unicorn"})])
    with pytest.raises(SynthgenError, match="image 3 has no class"):
        gen.generate([PromptRecord(3, "a photo of a cat")])


def test_class_prompts_for_a_text_to_image_model_are_refused(tiny_pipeline_path):
    from synthgen.prompts import build_sampler
    from synthgen.recipe import recipe_from_dict

    data = {"name": "x", "count": 4, "prompts": {"kind": "classes", "classes": "cifar10"},
            "generator": {"model": str(tiny_pipeline_path)}}
    with pytest.raises(SynthgenError, match="needs a class-conditioned pipeline; generator.model .* is a StableDiffusionPipeline"):
        build_sampler(recipe_from_dict(data))



def test_a_missing_pipeline_folder_names_the_command_that_makes_it(tmp_path, capsys):
    from synthgen.cli import main

    recipe = write_recipe(tmp_path / "cc.yaml", tmp_path / "runs" / "pipeline")
    assert main(["build", str(recipe), "--out", str(tmp_path / "ds"), "--dry-run"]) == 0  # the plan needs no model
    capsys.readouterr()
    assert main(["build", str(recipe), "--out", str(tmp_path / "ds"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model folder not found" in err[0] and "`synthgen classcond run`" in err[0], err
    assert not (tmp_path / "ds").exists()
