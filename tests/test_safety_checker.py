"""``generator.safety_checker``: a real (tiny, random-weight) Stable Diffusion safety checker saved in
a local pipeline folder and loaded through ``load_pipeline``'s normal path (no mocks).

The checker flags an image when a cosine similarity (in [-1, 1]) minus a concept's threshold
(``concept_embeds_weights``) is above 0. Thresholds of -2 flag every image, of +2 none; the
special-care thresholds stay at +2 so they add nothing. Both are exact, whatever the random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from synthgen.cli import main as cli_main
from synthgen.dataset import read_manifest, regenerate_row
from synthgen.generate import ImageGenerator, load_pipeline
from synthgen.generate.generator import FLAGGED
from synthgen.prompts.base import PromptRecord
from synthgen.recipe import OutputConfig, recipe_from_dict
from test_build import changed, load_rows
from test_resume import TINY

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HINT = "raise generator.max_retries or set generator.safety_checker: false"


def save_with_checker(tiny_pipeline_path: Path, folder: Path, concept_threshold: float) -> Path:
    """The tiny pipeline plus a real StableDiffusionSafetyChecker and its CLIPImageProcessor, saved
    as safetensors the way Hub SD checkpoints ship them (``requires_safety_checker: true``)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from synthgen.generate.pipeline import quiet_loading

    torch.manual_seed(0)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(small, vocab_size=64),
        vision_config=dict(small, image_size=32, patch_size=8),
        projection_dim=8,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    checker.concept_embeds_weights.fill_(concept_threshold)
    checker.special_care_embeds_weights.fill_(2.0)
    with quiet_loading():
        pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_path)
        pipe.register_modules(
            safety_checker=checker,
            feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        )
        pipe.register_to_config(requires_safety_checker=True)
        pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def flags_all(tmp_path_factory, tiny_pipeline_path) -> Path:
    return save_with_checker(tiny_pipeline_path, tmp_path_factory.mktemp("flags-all") / "model", -2.0)


@pytest.fixture(scope="module")
def flags_none(tmp_path_factory, tiny_pipeline_path) -> Path:
    return save_with_checker(tiny_pipeline_path, tmp_path_factory.mktemp("flags-none") / "model", 2.0)


def recipe_data(model: Path, **changes) -> dict:
    return changed(TINY, **{"count": 4, "output.images_per_shard": 4, "generator.model": str(model),
                            "generator.max_retries": 1, **changes})


def build(tmp_path: Path, data: dict, name: str) -> tuple[int, Path]:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / name
    return cli_main(["build", str(recipe), "--out", str(out), "--quiet"]), out


def test_a_checker_that_flags_every_seed_stops_the_build_with_a_way_out(flags_all, tmp_path, capsys):
    code, _ = build(tmp_path, recipe_data(flags_all), "flagged")
    assert code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: image 0 (and 3 more) still rejected after 2 attempt(s)")
    assert f"(generator.max_retries=1): {FLAGGED}; prompt " in lines[0]
    assert lines[0].endswith(HINT)


def test_without_the_checker_the_same_recipe_builds_and_regenerates(flags_all, tmp_path, caplog):
    flagged = recipe_data(flags_all)
    code, out = build(tmp_path, recipe_data(flags_all, **{"generator.safety_checker": False}), "unchecked")
    assert code == 0
    manifest = read_manifest(out)
    assert manifest["model"]["safety_checker"] is False
    assert manifest["recipe"]["generator"]["safety_checker"] is False
    assert manifest["retries"] == 0
    assert "- Safety checker: none ran (images are unfiltered)." in (out / "README.md").read_text()
    rows = load_rows(out)
    assert rows["retries"] == [0, 0, 0, 0]
    assert all(np.asarray(im).max() > 1 for im in rows["image"])  # nothing blacked out
    # another dataset: the settings hash (and the recipe hash a resume checks) differ from the checked recipe's
    assert recipe_from_dict(flagged).settings_hash(manifest["model"]) != manifest["settings_hash"]
    assert recipe_from_dict(flagged).recipe_hash() != recipe_from_dict(manifest["recipe"]).recipe_hash()
    # regenerate loads the pipeline as the build did: without the checker (which would flag the row black)
    caplog.clear()
    again = regenerate_row(out, 2)
    assert np.array_equal(np.asarray(again.convert("RGB")), np.asarray(rows[2]["image"].convert("RGB")))
    assert not diffusers_warnings(caplog)


def diffusers_warnings(caplog) -> list[str]:
    """diffusers' "you have disabled the safety checker" and "arguments not expected" warnings."""
    return [r.getMessage() for r in caplog.records if "safety checker" in r.getMessage() or "not expected" in r.getMessage()]


def test_the_checker_is_not_loaded_when_off_and_only_decides_rejection(flags_none, tiny_generator_config, caplog):
    cfg = tiny_generator_config.model_copy(update={"model": str(flags_none), "steps": 2})
    checked = load_pipeline(cfg)
    assert checked.safety_checker and checked.provenance()["safety_checker"] is True
    calls = []
    checked.pipe.safety_checker.register_forward_hook(lambda *_: calls.append(1))

    caplog.clear()
    unchecked = load_pipeline(cfg.model_copy(update={"safety_checker": False}))
    assert unchecked.pipe.safety_checker is None and unchecked.provenance()["safety_checker"] is False
    assert unchecked.pipe.config.requires_safety_checker is False
    assert not diffusers_warnings(caplog)
    builtin = load_pipeline(tiny_generator_config.model_copy(update={"steps": 2}))
    assert builtin.provenance()["safety_checker"] is False  # the tiny pipeline has none, whatever the recipe says

    records = [PromptRecord(index=i, prompt=f"a photo of a {i}") for i in range(3)]
    images = {}
    for name, loaded in (("checked", checked), ("unchecked", unchecked), ("builtin", builtin)):
        gen = ImageGenerator(loaded, cfg, OutputConfig(), 5)
        out = gen.generate(records)
        assert [g.retries for g in out] == [0, 0, 0]
        images[name] = np.stack([np.asarray(g.image) for g in out])
    assert calls == [1]  # one batch, checked once
    assert images["checked"].max() > 1
    assert np.array_equal(images["checked"], images["unchecked"])
    assert np.array_equal(images["checked"], images["builtin"])


def test_an_in_memory_pipeline_drops_its_checker_when_off(flags_none, tiny_generator_config):
    from diffusers import StableDiffusionPipeline

    from synthgen.generate.pipeline import prepare_pipeline

    cfg = tiny_generator_config.model_copy(update={"safety_checker": False})
    pipe = StableDiffusionPipeline.from_pretrained(flags_none)
    assert pipe.safety_checker is not None
    loaded = prepare_pipeline(pipe, cfg, revision="in-memory")
    assert loaded.pipe.safety_checker is None and json.loads(json.dumps(loaded.provenance()))["safety_checker"] is False


def test_other_rejections_keep_their_message(tiny_generator_config):
    from synthgen.errors import SynthgenError

    cfg = tiny_generator_config.model_copy(update={"steps": 1, "max_retries": 0})
    loaded = load_pipeline(cfg)  # a fresh pipeline: its VAE now decodes every image to black
    loaded.pipe.vae.decoder.conv_out.register_forward_hook(lambda module, inputs, output: torch.full_like(output, -1.0))
    with pytest.raises(SynthgenError) as info:
        ImageGenerator(loaded, cfg, OutputConfig(), 5).generate([PromptRecord(index=3, prompt="a cat")])
    assert str(info.value) == "image 3 still rejected after 1 attempt(s) (generator.max_retries=0): black image; prompt 'a cat'"
